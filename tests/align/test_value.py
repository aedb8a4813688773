"""Per-token value heads (lmforge.align.value) and advantages (lmforge.align.advantages).

Value heads: the values are the head over the final-norm hidden state at every position (causal: padding after
a position never changes it; packed rows as separate documents); PolicyWithValue's (logits, values) come from
one trunk forward and equal the separate calls bit for bit; the engine generates with it exactly what it
generates with the bare policy; both kinds save and load bit-exactly through lmforge.checkpoint, in full and
adapter-only over a base (the head saved with the adapters); the Trainer trains a PolicyWithValue (its head in
the optimizer as a submodule) and its checkpoint loads back as the trained model, also from 2 FSDP2 processes.

Advantages: GAE against TRL's PPO conventions (restated below in our words: TRL 1.16, the installed version,
no longer ships its PPO trainer, so neither its loop nor masked_whiten is importable; they were inline in
PPOTrainer.train(), trl/trainer/ppo_trainer.py, later trl/experimental/ppo/ppo_trainer.py) and
against a plain double loop over eq. 16's sum; GRPO and RLOO advantages against TRL 1.16's GRPOTrainer /
RLOOTrainer (inline there too, so replicated around TRL's own nanstd, which is imported).
"""

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.adapt.lora import LoRAConfig, apply_lora, lora_layers
from lmforge.align.advantages import gae, group_advantages, masked_whiten, outcome_rewards, rloo_advantages
from lmforge.align.logprobs import masked_mean, model_inputs, response_mask, token_logprobs
from lmforge.align.value import PolicyAndCritic, PolicyWithValue, ValueModel, values_of
from lmforge.errors import ConfigError
from lmforge.infer.engine import EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.model.meta import packed_positions
from lmforge.optim import build_optimizer
from lmforge.optim.config import OptimConfig
from lmforge.tokenizer.byte import ByteTokenizer
from lmforge.train.config import LoopConfig
from lmforge.train.trainer import Trainer

from .helpers import sequences, tiny_model


def _randomised(model):
    """A head with weights that are not zero (a fresh one gives 0 everywhere)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.value_head.weight.copy_(torch.randn(model.value_head.weight.shape, generator=g))
        model.value_head.bias.fill_(0.25)
    return model


def _by_hand(lm, head, ids):
    h = lm.final_norm(lm.hidden(ids)[0])
    return (h @ head.weight.T + head.bias).squeeze(-1)


def test_values_are_the_head_at_every_position_causal_and_packed():
    lm = tiny_model(0)
    ids = torch.randint(0, 41, (2, 9))
    assert torch.equal(ValueModel(lm).values(ids), torch.zeros(2, 9))  # zero init: every value starts at 0
    critic = _randomised(ValueModel(lm))
    v = critic.values(ids)
    assert v.shape == (2, 9) and v.dtype == torch.float32
    torch.testing.assert_close(v, _by_hand(lm, critic.value_head, ids), rtol=0, atol=1e-6)
    padded = ids.clone()
    padded[:, 5:] = 0  # right padding after position 4 leaves values up to 4 alone (causal)
    assert torch.equal(critic.values(padded)[:, :5], v[:, :5])
    # packed rows: two documents in one row read as each on its own
    doc = torch.tensor([[0] * 4 + [1] * 5])
    packed = values_of(critic, {"input_ids": ids[:1], "doc_ids": doc, "positions": packed_positions(doc)})
    alone = torch.cat([critic.values(ids[:1, :4]), critic.values(ids[:1, 4:])], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_a_frozen_backbone_trains_the_head_alone_and_a_bare_model_is_refused():
    critic = _randomised(ValueModel(tiny_model(0), train_backbone=False))
    critic.values(torch.randint(0, 41, (2, 5))).sum().backward()
    assert critic.value_head.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in critic.backbone.parameters())
    with pytest.raises(ConfigError, match="ValueModel\\(model\\) or PolicyWithValue\\(model\\)"):
        values_of(tiny_model(0), {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ConfigError, match="pass its .backbone"):
        PolicyWithValue(critic)


def test_one_trunk_forward_gives_the_policys_logits_and_the_values(monkeypatch):
    policy = tiny_model(0)
    ac = _randomised(PolicyWithValue(policy))
    ids = torch.randint(0, 41, (3, 8))
    calls = []
    hidden = policy.hidden
    monkeypatch.setattr(policy, "hidden", lambda *a, **k: calls.append(1) or hidden(*a, **k))
    logits, values = ac.policy_and_values(ids)
    assert len(calls) == 1  # ONE trunk forward for both
    assert torch.equal(logits, policy(ids)) and torch.equal(ac(ids), logits)
    assert torch.equal(values, ac.values(ids))
    torch.testing.assert_close(values, _by_hand(policy, ac.value_head, ids), rtol=0, atol=1e-6)
    loss = values.square().mean() + logits.logsumexp(-1).mean()
    loss.backward()
    assert ac.value_head.weight.grad.abs().sum() > 0 and policy.blocks[0].attn.wq.weight.grad.abs().sum() > 0
    roles = ac.param_roles()
    assert roles["value_head.weight"] == roles["value_head.bias"] == "value"
    assert roles["backbone.lm_head.weight"] == "head"
    assert ac.cfg is policy.cfg and ac.cache_spec() == policy.cache_spec()


def test_the_engine_generates_with_a_policy_with_value_as_with_the_bare_policy():
    policy = tiny_model(0, vocab_size=257, max_seq_len=48, init_std=0.3)
    prompts = [[104, 105, 32], [97, 98, 99, 100, 101]]
    cfg = EngineConfig(block_size=4, max_num_seqs=8, num_kv_tokens=512)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0)
    policy.eos_token_ids = (LLM(policy, ByteTokenizer(), config=cfg).generate(prompts[:1], greedy)[0].token_ids[2],)
    ac = _randomised(PolicyWithValue(policy))
    assert ac.eos_token_ids == policy.eos_token_ids
    outs = {}
    for name, model in (("bare", policy), ("wrapped", ac)):
        llm = LLM(model, ByteTokenizer(), config=cfg)
        llm.update_weights()
        sampled = SamplingParams(n=3, max_tokens=6, seed=5, logprobs=0)
        runs = [llm.generate(prompts, greedy), llm.generate(prompts, sampled)]
        outs[name] = [(c.token_ids, c.logprobs, c.finish_reason) for run in runs for o in run for c in o.outputs]
    assert outs["wrapped"] == outs["bare"]
    assert outs["bare"][0][2] == "stop" and len(outs["bare"][0][0]) < 6  # the eos id the wrapper passes on
    with torch.no_grad():  # the drafters' option passes through
        ids = torch.tensor([prompts[1]])
        assert all(torch.equal(a, b) for a, b in zip(ac(ids, return_hidden=True), policy(ids, return_hidden=True)))


def test_value_models_save_and_load_bit_exactly(tmp_path):
    ids = torch.randint(0, 41, (2, 7))
    for i, model in enumerate([_randomised(ValueModel(tiny_model(0), train_backbone=False)),
                               _randomised(PolicyWithValue(tiny_model(1)))]):
        path = ckpt.save_checkpoint(tmp_path / str(i), 1, model)
        back, _ = ckpt.load_model(path)
        assert type(back) is type(model) and back.head_record() == model.head_record()
        with torch.no_grad():
            assert torch.equal(back.values(ids), model.eval().values(ids))
            if isinstance(model, PolicyWithValue):
                assert torch.equal(back(ids), model(ids))
    import json

    assert json.loads((path / "config.json").read_text())["head"] == {"kind": "value", "shared": True}


def test_an_adapter_only_checkpoint_keeps_the_trained_head(tmp_path):
    """LoRA on the policy, then the head: the adapters and the fresh head train, the checkpoint holds exactly
    them over the base's path and checksum, and load_model rebuilds the same policy and values."""
    base = ckpt.save_checkpoint(tmp_path / "base", 0, tiny_model(0))
    policy, _ = ckpt.load_model(base)
    ac = _randomised(PolicyWithValue(apply_lora(policy, LoRAConfig(r=2, targets=("wq", "wv")))))
    with torch.no_grad():
        for n, p in ac.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()
    path = ckpt.save_checkpoint(tmp_path / "run", 1, ac, base=ckpt.base_record(base))
    from safetensors.torch import load_file

    saved = set(load_file(path / "model.safetensors"))
    assert saved == {n for n, p in ac.named_parameters() if p.requires_grad}
    assert {"value_head.weight", "value_head.bias"} <= saved and len(saved) == 6
    back, _ = ckpt.load_model(path)
    ids = torch.randint(0, 41, (2, 7))
    with torch.no_grad():
        ac.eval()
        assert torch.equal(back(ids), ac(ids)) and torch.equal(back.values(ids), ac.values(ids))
        assert not torch.equal(back(ids), tiny_model(0)(ids))  # the adapters are on
    # the KL anchor of a LoRA actor-critic: its policy with the adapters off (the head trains, so not `ac` itself)
    from lmforge.align.frozen import BaseReference

    with pytest.raises(ConfigError, match=r"value_head.weight is trained.*the policy alone: BaseReference\(model"
                                          r"\.backbone\)$"):  # not dpo/kto's advice to freeze the head
        BaseReference(ac)
    batch = sequences(2, 7, 41, [2, 3], seed=1)
    want = token_logprobs(tiny_model(0)(batch["input_ids"]), batch["targets"])
    torch.testing.assert_close(BaseReference(ac.backbone).token_logps(batch), want, rtol=0, atol=1e-6)


def test_base_reference_of_an_actor_critic_whose_lora_trains_a_backbone_tensor_names_the_general_fix():
    """LoRAConfig.trainable on an actor-critic's backbone: BaseReference(model.backbone) would be refused too
    (final_norm trains there as well), so that hint is only for a trained value head; the general one here."""
    from lmforge.align.frozen import BaseReference

    ac = apply_lora(PolicyWithValue(tiny_model(0)), LoRAConfig(r=2, targets=("wq",), trainable=("final_norm",)))
    with pytest.raises(ConfigError, match=r"^BaseReference: backbone\.final_norm\.weight is trained \(LoRAConfig"
                                          r"\.trainable or requires_grad\).*separate reference model") as got:
        BaseReference(ac)
    assert "BaseReference(model.backbone)" not in str(got.value)
    with pytest.raises(ConfigError, match=r"^BaseReference: final_norm\.weight is trained \(LoRAConfig"):
        BaseReference(ac.backbone)


class ActorCritic:
    """A PPO-shaped objective (per-token policy term + value regression on GAE returns), enough to train
    both heads through the Trainer; the real PPO objective is the RL issue's."""

    def loss(self, model, batch):
        ids, kwargs = model_inputs(batch)
        logits, values = model.policy_and_values(ids, **kwargs)
        mask = response_mask(batch)
        logps = token_logprobs(logits, batch["targets"])
        rewards = outcome_rewards(batch["scores"], mask)
        adv, ret = gae(rewards, values.detach(), mask, gamma=1.0, lam=0.95)
        loss = -masked_mean(adv * logps, mask) + 0.5 * masked_mean((values - ret) ** 2, mask)
        return loss, {"value_error": masked_mean((values - ret).abs(), mask).detach()}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Fixed:
    def __init__(self, batch):
        self.batch = batch

    def next_batch(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_the_trainer_trains_a_policy_with_value_and_its_checkpoint_loads_back(tmp_path):
    ac = PolicyWithValue(tiny_model(0))
    batch = {**sequences(4, 10, 41, [2, 3, 4, 2], seed=0), "scores": torch.tensor([1.0, -1.0, 0.5, 0.0])}
    cfg = LoopConfig(run_dir=str(tmp_path / "run"), max_steps=4, log_every=1, eval_every=100, ckpt_every=4,
                     device="cpu", progress=False, plot=False, seed=0, optim=OptimConfig(lr=1e-2, weight_decay=0.0))
    optimizer = build_optimizer(ac, cfg.optim)  # the head is the model's: the Trainer's check passes
    assert any(ac.value_head.weight is p for g in optimizer.param_groups if g["role"] == "value" for p in g["params"])
    result = Trainer(ac, optimizer, Fixed(batch), ActorCritic(), config=cfg).fit()
    errors = [r["value_error"] for r in result.history if "value_error" in r]
    assert errors[-1] < errors[0] and ac.value_head.weight.abs().sum() > 0
    back, _ = ckpt.load_model(result.checkpoint)
    with torch.no_grad():
        ac.eval()
        assert isinstance(back, PolicyWithValue) and torch.equal(back.values(batch["input_ids"]),
                                                                 ac.values(batch["input_ids"]))


def test_a_policy_and_a_separate_critic_train_sample_and_load_as_one_model(tmp_path):
    """PolicyAndCritic (InstructGPT's separate critic): its forward is the policy's (the engine samples the
    same tokens and log-probs as from the bare policy), policy_and_values is (policy(ids), critic(ids)); the
    Trainer trains both trunks through one optimizer, and load_model rebuilds the pair from its checkpoint
    (the critic's config is in the head record; its trunk may differ from the policy's) bit-exactly."""
    policy = tiny_model(0, vocab_size=257)  # the byte tokenizer's vocabulary, for the engine
    critic = _randomised(ValueModel(tiny_model(1, vocab_size=257, n_layers=1)))
    pc = PolicyAndCritic(policy, critic)
    ids = torch.randint(0, 41, (3, 8))
    with torch.no_grad():
        logits, values = pc.policy_and_values(ids)
        assert torch.equal(logits, policy(ids)) and torch.equal(pc(ids), logits)
        assert torch.equal(values, critic(ids)) and torch.equal(pc.values(ids), values)
    assert pc.cfg is policy.cfg and pc.cache_spec() == policy.cache_spec()
    roles = pc.param_roles()
    assert roles["critic.value_head.weight"] == "value" and roles["backbone.lm_head.weight"] == "head"
    prompts, params = [[1, 2, 3], [4, 5]], SamplingParams(n=2, max_tokens=4, seed=3, logprobs=0)
    cfg = EngineConfig(block_size=4, max_num_seqs=8, num_kv_tokens=256)
    tok = ByteTokenizer()
    got = [[(c.token_ids, c.logprobs) for c in o.outputs] for m in (policy, pc)
           for o in LLM(m, tok, config=cfg).generate(prompts, params)]
    assert got[:2] == got[2:]
    with pytest.raises(ConfigError, match="must be a ValueModel"):
        PolicyAndCritic(policy, tiny_model(1))

    batch = {**sequences(4, 10, 41, [2, 3, 4, 2], seed=0), "scores": torch.tensor([1.0, -1.0, 0.5, 0.0])}
    loop = LoopConfig(run_dir=str(tmp_path / "run"), max_steps=3, log_every=1, eval_every=100, ckpt_every=3,
                      device="cpu", progress=False, plot=False, seed=0, optim=OptimConfig(lr=1e-2, weight_decay=0.0))
    before = [p.detach().clone() for p in (policy.lm_head.weight, critic.backbone.blocks[0].attn.wq.weight)]
    result = Trainer(pc, build_optimizer(pc, loop.optim), Fixed(batch), ActorCritic(), config=loop).fit()
    after = (policy.lm_head.weight, critic.backbone.blocks[0].attn.wq.weight)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # both trunks trained
    back, _ = ckpt.load_model(result.checkpoint)
    assert isinstance(back, PolicyAndCritic) and back.critic.cfg.n_layers == 1
    with torch.no_grad():
        pc.eval()
        for a, b in zip(back.policy_and_values(ids), pc.policy_and_values(ids)):
            assert torch.equal(a, b)
    # LoRA on both trunks: the critic's adapters travel in the head record and come back with it
    apply_lora(pc.backbone, LoRAConfig(r=2, targets=("wq",)))
    apply_lora(pc.critic.backbone, LoRAConfig(r=2, targets=("wv",)))
    with torch.no_grad():
        for p in pc.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # (B = 0 at first: make the adapters count)
    back, _ = ckpt.load_model(ckpt.save_checkpoint(tmp_path / "lora", 1, pc))
    assert sorted(lora_layers(back)) == sorted(lora_layers(pc))  # policy's wq and critic's wv
    assert any(n.startswith("critic.") for n in lora_layers(back))
    with torch.no_grad():
        for a, b in zip(back.policy_and_values(ids), pc.policy_and_values(ids)):
            assert torch.equal(a, b)


def _fit(run_dir: str, layout: dict | None = None) -> tuple[list[float], str, dict]:
    """ActorCritic on a PolicyWithValue for 3 steps on this process's layout (None: one process), then its
    rollout engine synced (lmforge.train.distributed.sync_rollout): the names sent and the engine's weights."""
    from lmforge.infer.detok import IdTokenizer
    from lmforge.parallel.config import ParallelConfig
    from lmforge.train.distributed import distribute, rollout_model, sync_rollout

    batch = {**sequences(4, 10, 41, [2, 3, 4, 2], seed=0), "scores": torch.tensor([1.0, -1.0, 0.5, 0.0])}
    par = ParallelConfig(**layout) if layout else None
    ac = PolicyWithValue(tiny_model(0))
    llm = LLM(rollout_model(ac, par), IdTokenizer(41), config=EngineConfig(block_size=4, max_num_seqs=2,
                                                                            num_kv_tokens=32))
    model, src, runner = distribute(ac, Fixed(batch), par, device=torch.device("cpu"), seq_len=10, batch_size=4)
    cfg = LoopConfig(run_dir=run_dir, max_steps=3, log_every=1, eval_every=100, ckpt_every=3, device="cpu",
                     progress=False, plot=False, seed=0, optim=OptimConfig(lr=1e-2, weight_decay=0.0))
    result = Trainer(model, build_optimizer(model, cfg.optim), src, ActorCritic(), config=cfg, runner=runner).fit()
    sent, update = [], llm.update_weights
    llm.update_weights = lambda w=None, partial=False: (sent.append(sorted(w or ())), update(w, partial=partial))
    sync_rollout(llm, model)
    synced = {"sent": sent[0], "kind": type(llm.model).__name__,
              "weights": {k: v.clone() for k, v in llm.model.state_dict().items()}}
    return [r["loss"] for r in result.history if "loss" in r], str(result.checkpoint), synced


def _fsdp_worker(rank: int, world: int, run_dir: str) -> tuple[list[float], str, dict]:
    return _fit(run_dir, {"dp_shard": 2})


def test_fsdp_shards_a_policy_with_value_and_writes_its_checkpoint(tmp_path):
    """2 gloo processes under FSDP2 (the backbone's blocks sharded, the head with the root): policy_and_values
    goes through forward, so the root's parameters are gathered; the losses are the one process's and rank 0's
    gathered checkpoint loads as the same PolicyWithValue."""
    from lmforge.parallel.launch import run_local

    one, one_ckpt, one_sync = _fit(str(tmp_path / "one"))
    ranks = run_local(_fsdp_worker, 2, str(tmp_path / "two"), timeout=120, start_method="fork")
    two, two_ckpt, _ = ranks[0]
    assert two == pytest.approx(one, abs=1e-6)
    (a, _), (b, _) = ckpt.load_model(one_ckpt), ckpt.load_model(two_ckpt)
    ids = torch.randint(0, 41, (2, 8))
    with torch.no_grad():
        assert isinstance(b, PolicyWithValue)
        torch.testing.assert_close(b.policy_and_values(ids), a.policy_and_values(ids), rtol=0, atol=1e-6)
    # each rank's rollout engine holds a copy of the policy alone, synced to the trained one; no critic was sent
    assert one_sync["kind"] == "PolicyWithValue" and one_sync["sent"] == []  # one process: the module itself
    policy = b.backbone.state_dict()
    for _, _, sync in ranks:
        assert sync["kind"] == "Transformer" and sync["sent"] == sorted(policy)
        assert sync["weights"].keys() == policy.keys()
        assert max(float((v - policy[k]).abs().max()) for k, v in sync["weights"].items()) < 1e-6


def test_rollouts_copy_and_sync_the_policy_alone():
    """Under data parallelism (a ParallelConfig: here one process stands for each rank) the rollout engine's
    copy is the policy (`.backbone`) without the critic or value head, and sync_rollout sends the policy's
    tensors only, under their own names; the copy then equals the policy."""
    from lmforge.infer.detok import IdTokenizer
    from lmforge.parallel.config import ParallelConfig
    from lmforge.train.distributed import rollout_model, sync_rollout

    for ac in (PolicyWithValue(tiny_model(0)), PolicyAndCritic(tiny_model(0), ValueModel(tiny_model(1, n_layers=1)))):
        rollout = rollout_model(ac, ParallelConfig())
        policy = ac.backbone.state_dict()
        assert type(rollout) is type(ac.backbone) and rollout.state_dict().keys() == policy.keys()
        assert not {p.data_ptr() for p in rollout.parameters()} & {p.data_ptr() for p in ac.parameters()}
        llm = LLM(rollout, IdTokenizer(41), config=EngineConfig(block_size=4, max_num_seqs=2, num_kv_tokens=32))
        with torch.no_grad():
            for p in ac.parameters():
                p.add_(1.0)
        sent, update = [], llm.update_weights
        llm.update_weights = lambda w=None, partial=False: (sent.append(sorted(w)), update(w, partial=partial))
        sync_rollout(llm, ac)
        assert sent == [sorted(policy)]  # no "critic." / "value_head." names
        assert all(torch.equal(v, policy[k]) for k, v in rollout.state_dict().items())


def test_the_value_head_has_its_own_learning_rate_and_no_weight_decay():
    """Role "value" (lmforge.optim.groups): OptimConfig.value_lr sets the value head's rate (0 = the optimizer's
    default, as for the other roles); never decayed; Muon and Dion update it with AdamW, like the LM head."""
    for model in (PolicyWithValue(tiny_model(0)), PolicyAndCritic(tiny_model(0), ValueModel(tiny_model(1)))):
        head = model.value_head if isinstance(model, PolicyWithValue) else model.critic.value_head
        for name, lrs in (("adamw", {}), ("muon", {"adam_lr": 3e-3}), ("dion", {})):
            for value_lr in (0.0, 5e-4):
                cfg = OptimConfig(name=name, lr=0.02, head_lr=1e-3, weight_decay=0.1, value_lr=value_lr, **lrs)
                groups = {g["role"]: g for g in build_optimizer(model, cfg).param_groups}
                value = groups["value"]
                assert {id(p) for p in value["params"]} == {id(head.weight), id(head.bias)}
                assert value["lr"] == (value_lr or lrs.get("adam_lr", 0.02)) and value["weight_decay"] == 0.0
                assert groups["head"]["lr"] == 1e-3 and groups["matrix"]["weight_decay"] == 0.1
                if name != "adamw":
                    flag = f"use_{name}"
                    assert not value[flag] and not groups["head"][flag] and groups["matrix"][flag]
    with pytest.raises(ConfigError, match="optim.value_lr must be >= 0"):
        OptimConfig(value_lr=-1.0)


class RankRollout:
    """A per_rank source holding its rank's rows of a rollout between optimizer steps (as a PPO source does
    over its epochs): its state differs per rank (per_rank_state)."""

    per_rank = per_rank_state = True

    def __init__(self):
        self.rank, self.steps = None, 0
        self.rows = None

    def begin_step(self, trainer):
        self.rank = trainer.runner.dp_rank
        if self.rows is None:  # "sample" this rank's rows once; later steps train on them again
            self.rows = {**sequences(2, 10, 41, [2, 3], seed=10 + self.rank), "scores": torch.tensor([1.0, -1.0])}
        self.steps += 1

    def next_batch(self):
        return self.rows

    def state_dict(self):
        return {"steps": self.steps, "rows": self.rows and dict(self.rows), "rank": self.rank}

    def load_state_dict(self, state):
        self.steps, self.rows, self.rank = state["steps"], state["rows"], state["rank"]


def _rank_state_worker(rank: int, world: int, run_dir: str, steps: int) -> dict:
    from lmforge.parallel.config import ParallelConfig
    from lmforge.train.distributed import distribute

    model, src, runner = distribute(PolicyWithValue(tiny_model(0)), RankRollout(), ParallelConfig(dp_replicate=2),
                                    device=torch.device("cpu"), seq_len=10, batch_size=4)
    cfg = LoopConfig(run_dir=run_dir, max_steps=steps, log_every=1, eval_every=100, ckpt_every=2, device="cpu",
                     progress=False, plot=False, seed=0, optim=OptimConfig(lr=1e-2, weight_decay=0.0))
    trainer = Trainer(model, build_optimizer(model, cfg.optim), src, ActorCritic(), config=cfg, runner=runner)
    resumed = src.state_dict()
    trainer.fit()
    return {"resumed_rank": resumed["rank"], "resumed_ids": resumed["rows"] and resumed["rows"]["input_ids"]}


def test_a_source_with_per_rank_state_resumes_each_ranks_own_rollout(tmp_path):
    """2 DDP processes, each training on its own rows of a rollout held in its source's state: the checkpoint
    at step 2 holds both ranks' states and each rank resumes its own (without per_rank_state every rank would
    get rank 0's rows, and train on them twice); another number of processes is refused."""
    from lmforge.parallel.launch import run_local

    run = str(tmp_path / "run")
    first = run_local(_rank_state_worker, 2, run, 2, timeout=120, start_method="fork")
    assert [r["resumed_rank"] for r in first] == [None, None]  # a fresh start
    again = run_local(_rank_state_worker, 2, run, 3, timeout=120, start_method="fork")
    assert [r["resumed_rank"] for r in again] == [0, 1]
    for rank, r in enumerate(again):
        assert torch.equal(r["resumed_ids"], sequences(2, 10, 41, [2, 3], seed=10 + rank)["input_ids"])
    one = PolicyWithValue(tiny_model(0))
    with pytest.raises(ConfigError, match="each of its 2 processes"):
        Trainer(one, build_optimizer(one, OptimConfig()), RankRollout(), ActorCritic(),
                config=LoopConfig(run_dir=run, max_steps=3, device="cpu", progress=False, plot=False))


# advantages --------------------------------------------------------------------------------------------

def trl_masked_whiten(x, mask, shift_mean=True):
    """TRL's PPO whitening convention, restated: the masked mean, the masked variance with Bessel's
    correction n / (n - 1), eps 1e-8 inside the square root; the mean added back without shift_mean."""
    m = mask.to(x.dtype)
    n = m.sum()
    mu = (x * m).sum() / n
    var = ((x - mu) ** 2 * m).sum() / n * (n / (n - 1))
    out = (x - mu) / torch.sqrt(var + 1e-8)
    return out if shift_mean else out + mu


def trl_gae(rewards, values, gamma, lam):
    """TRL's PPO advantage convention, restated: one backward recursion over the whole (right-padded)
    response width, the value after the last column taken as 0 (rewards and values zeroed past each
    response, so padding contributes nothing)."""
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    carry = torch.zeros_like(rewards[:, 0])
    for t in range(T - 1, -1, -1):
        after = values[:, t + 1] if t + 1 < T else torch.zeros_like(carry)
        carry = rewards[:, t] + gamma * after - values[:, t] + gamma * lam * carry
        adv[:, t] = carry
    return adv, adv + values


def _rollout(B=5, T=9, seed=0, prompt=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g)) if prompt else 0
        mask[b, start:start + int(torch.randint(2, T - start + 1, (1,), generator=g))] = True
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 * mask  # a per-token KL-like term
    return rewards + outcome_rewards(torch.randn(B, generator=g, dtype=torch.float64), mask), values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_is_trls_ppo_loop_on_right_padded_responses(gamma, lam):
    rewards, values, mask = _rollout()
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # TRL's layout: values and rewards zero after the response (its masked_fill), the loop over every position
    t_adv, t_ret = trl_gae(rewards * mask, values * mask, gamma, lam)
    torch.testing.assert_close(adv, t_adv * mask, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, t_ret * mask, rtol=0, atol=1e-12)
    # TRL's Bessel factor is an int / int tensor division: float32, so 1e-7 apart at most in fp64
    torch.testing.assert_close(masked_whiten(adv, mask), trl_masked_whiten(adv, mask) * mask, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(masked_whiten(rewards, mask, shift_mean=False),
                               trl_masked_whiten(rewards, mask, shift_mean=False) * mask, rtol=1e-7, atol=1e-9)


def test_gae_is_the_sum_of_discounted_td_residuals_per_episode():
    """A plain double loop over eq. 16's sum, on rows with a prompt before the response (and a row with two
    response segments: two episodes, each ending with V = 0 after it)."""
    gamma, lam = 0.97, 0.9
    rewards, values, mask = _rollout(B=6, T=10, seed=3, prompt=True)
    mask[5] = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    rewards[5] = torch.tensor([0, 0.1, 0, 1, 0, 0, 0.2, -1, 0, 0], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    want = torch.zeros_like(adv)
    B, T = mask.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            end = t
            while end + 1 < T and mask[b, end + 1]:
                end += 1
            total = 0.0
            for k in range(t, end + 1):  # delta_k with V = 0 after the episode's last token
                nxt = float(values[b, k + 1]) if k < end else 0.0
                total += (gamma * lam) ** (k - t) * (float(rewards[b, k]) + gamma * nxt - float(values[b, k]))
            want[b, t] = total
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, (want + values) * mask, rtol=0, atol=1e-12)
    mc, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # lam = 1: the return-to-go minus V
    togo = rewards[0].flip(-1).cumsum(-1).flip(-1)  # rewards are 0 outside the mask
    torch.testing.assert_close(mc[0][mask[0]], (togo - values[0])[mask[0]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("pad", [float("nan"), float("inf")])
def test_values_outside_the_mask_are_ignored_even_nan_or_inf(pad):
    """A critic's padding may hold anything: GAE and whitening read the masked entries only."""
    mask = torch.tensor([[True, True, False]])
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    adv, ret = gae(rewards, torch.tensor([[0.5, 0.2, pad]]), mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46, 0.8, 0.0]]))  # A_1 = 1 - 0.2, A_0 = (0.2 - 0.5) + 0.95 A_1
    torch.testing.assert_close(ret, torch.tensor([[0.96, 1.0, 0.0]]))
    white = masked_whiten(torch.tensor([[1.0, 2.0, pad]]), mask)
    torch.testing.assert_close(white, torch.tensor([[-0.5 ** 0.5, 0.5 ** 0.5, 0.0]]))
    kept = masked_whiten(torch.tensor([[1.0, 2.0, pad]]), mask, shift_mean=False)
    torch.testing.assert_close(kept, torch.tensor([[1.5 - 0.5 ** 0.5, 1.5 + 0.5 ** 0.5, 0.0]]))


def test_advantage_inputs_are_checked():
    rewards, values, mask = _rollout()
    bad = rewards.clone()
    bad[0, -1] = 1.0
    mask[0, -1] = False
    with pytest.raises(ConfigError, match="rewards\\[0, 8\\] = 1 lies outside the mask"):
        gae(bad, values, mask)
    with pytest.raises(ConfigError, match="shaped like the mask"):
        gae(rewards[:, :-1], values, mask)
    with pytest.raises(ConfigError, match="at least 2 masked entries"):
        masked_whiten(values, torch.arange(mask.numel()).view(mask.shape) == 0)
    with pytest.raises(ConfigError, match="group_size=3 must be >= 2 and divide the 8 rewards"):
        group_advantages(torch.zeros(8), 3)


@pytest.mark.parametrize("eps", [1e-4, 0.0])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_group_of_equal_rewards_has_exactly_zero_advantage(scale, eps):
    """fp32's mean of 7 rewards of 0.7 misses 0.7 by an ulp: divided by the group's std (an ulp too) + eps, that
    was an advantage of 6e-4 for every completion (eps=1e-4) or NaN / +-0.93 (eps=0), a push with no signal."""
    rewards = torch.tensor([0.7] * 7 + [0.1] * 7 + [1.0, 0, 1, 0, 0, 0, 1])
    adv = group_advantages(rewards, 7, scale=scale, eps=eps)
    assert torch.equal(adv[:14], torch.zeros(14))
    assert torch.equal(rloo_advantages(rewards, 7)[:14], torch.zeros(14))
    mixed = rewards[14:] - rewards[14:].mean()  # the mixed group is untouched
    want = {"group": mixed / (rewards[14:].std() + eps), "batch": mixed / (rewards.std() + eps), "none": mixed}
    torch.testing.assert_close(adv[14:], want[scale], rtol=1e-6, atol=1e-6)


def test_whitening_equal_entries_gives_exactly_zero():
    """The same ulp through masked_whiten: 14 entries of 0.7 whitened to 1.2e-3 each, not 0 (0.7012 kept)."""
    x, mask = torch.full((2, 8), 0.7), torch.ones(2, 8, dtype=torch.bool)
    x[1, -1], mask[1, -1] = float("nan"), False  # outside the mask: ignored
    assert torch.equal(masked_whiten(x, mask), torch.zeros(2, 8))
    assert torch.equal(masked_whiten(x, mask, shift_mean=False), torch.where(mask, 0.7, 0.0))


def test_bad_group_and_score_arguments_are_one_line_errors():
    with pytest.raises(ConfigError, match="group_size=2.0 must be an int"):
        group_advantages(torch.zeros(8), 2.0)
    with pytest.raises(ConfigError, match="group_size=True must be an int"):
        rloo_advantages(torch.zeros(8), True)
    for eps in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="must be a finite number >= 0"):
            group_advantages(torch.zeros(8), 2, eps=eps)
    with pytest.raises(ConfigError, match="scores must be a \\(B,\\) = \\(2,\\) tensor, one per row, got list"):
        outcome_rewards([1.0, 0.0], torch.ones(2, 3, dtype=torch.bool))
    # a NaN reward (a verifier that could not judge) would make its whole group's advantages NaN, then the loss
    for fn in (group_advantages, rloo_advantages):
        with pytest.raises(ConfigError, match=r"^rewards\[5\] = nan: every completion needs a finite score"):
            fn(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, float("nan")]), 3)
    with pytest.raises(ConfigError, match=r"^scores\[1\] = inf: every completion needs a finite score.*drop its row"):
        outcome_rewards(torch.tensor([1.0, float("inf")]), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_are_trls_grpo_and_rloo(scale):
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(12, generator=g) > 0.5).float() + 0.1 * torch.randn(12, generator=g)
    n = 4
    # TRL GRPOTrainer._generate_and_score_completions, sum_then_normalize, replicated around its nanstd
    mean = torch.nanmean(rewards.view(-1, n), dim=1).repeat_interleave(n, dim=0)
    std = (nanstd(rewards.view(-1, n), dim=1).repeat_interleave(n, dim=0) if scale != "batch"
           else nanstd(rewards).expand_as(rewards))
    want = rewards - mean if scale == "none" else (rewards - mean) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, n, scale=scale), want, rtol=0, atol=1e-6)
    # TRL RLOOTrainer: the leave-one-out baseline (sum of the others / (n - 1))
    grouped = rewards.view(-1, n)
    baseline = ((grouped.sum(1, keepdim=True) - grouped) / (n - 1)).view(-1)
    torch.testing.assert_close(rloo_advantages(rewards, n), rewards - baseline, rtol=0, atol=1e-6)
    if scale == "group":  # what docs/rl.md's sketch computes by hand per prompt
        by_hand = torch.cat([(r - r.mean()) / (r.std() + 1e-4) for r in rewards.view(-1, n)])
        torch.testing.assert_close(group_advantages(rewards, n), by_hand, rtol=0, atol=1e-6)


def test_separate_heads_freeze_the_lm_head_they_never_read():
    """ValueModel and SequenceHead read the trunk only: the backbone's LM head gets no gradient and is frozen (DDP
    replicas waited for its gradient and raised; tests/align/test_posttrain_parallel.py runs a reward model under
    DDP), unless it is tied to the embedding the trunk reads; a shared trunk (PolicyWithValue) keeps it trained."""
    import dataclasses

    from lmforge.align.reward import SequenceHead
    from lmforge.model.transformer import Transformer

    for wrap in (ValueModel, SequenceHead):
        m = wrap(tiny_model(0))
        assert not m.backbone.lm_head.weight.requires_grad and m.backbone.tok_emb.weight.requires_grad
        tied = Transformer(dataclasses.replace(tiny_model(0).cfg, tie_embeddings=True))
        assert wrap(tied).backbone.lm_head.weight.requires_grad  # it is the embedding
    assert PolicyWithValue(tiny_model(0)).backbone.lm_head.weight.requires_grad


def _branching_whiten(x, mask, shift_mean=True, eps=1e-8):
    """masked_whiten as it was before 2026-12-07: the same arithmetic, the no-spread case a Python branch."""
    m = mask.bool()
    n = int(m.sum())
    x = torch.where(m, x, 0.0)
    if bool((x[m] == x[m][0]).all()):
        return x if not shift_mean else torch.zeros_like(x)
    mean = x.sum() / n
    var = torch.where(m, (x - mean) ** 2, 0.0).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(m, out + mean if not shift_mean else out, 0.0)


def test_masked_whiten_decides_on_the_device_with_one_host_sync_and_the_same_values():
    """masked_whiten branched in Python on its masked entries (x[m] == x[m][0], bool()): two host syncs per call
    beside the count of masked entries its refusal needs. The no-spread case is a torch.where now; every value is
    the branching form's, bit for bit (NaN where it had NaN)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    _, values, mask = _rollout(B=4, T=7, seed=5, prompt=True)
    with Ops() as seen:
        masked_whiten(values, mask)
    assert seen.ops.count("_local_scalar_dense.default") == 1 and "index.Tensor" not in seen.ops, seen.ops
    equal = torch.where(mask, torch.full_like(values, 0.7), values).float()  # fp32's mean of 0.7s misses 0.7
    cases = [values, values.float(), equal, torch.where(mask, values, float("nan")),  # NaN outside: ignored
             torch.where(mask, torch.inf, values), values.masked_fill(mask & (values > 1), float("nan"))]
    for x in cases:
        for shift_mean in (True, False):
            torch.testing.assert_close(masked_whiten(x, mask, shift_mean=shift_mean),
                                       _branching_whiten(x, mask, shift_mean), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(masked_whiten(equal, mask), torch.zeros_like(equal))

"""Frozen models and the LoRA base reference: the weights checksum (0-d tensors included), a reference that
is (or shares a parameter with) the trained model refused before anything is frozen, frozen outputs from
eval mode without gradients, and BaseReference (the LoRA policy with its adapters off) against a
deep-copied base: equal DPO / KTO losses and gradients over several optimizer steps, the base's identity."""

import copy
import hashlib
import math

import pytest
import torch
from torch import nn

from lmforge.adapt.lora import LoRAConfig, LoRALinear, apply_lora
from lmforge.align.distill import DistillObjective
from lmforge.align.dpo import DPOConfig, DPOObjective
from lmforge.align.frozen import BaseReference, Frozen, weights_checksum
from lmforge.align.kto import KTOConfig, KTOObjective
from lmforge.errors import CheckpointError, ConfigError

from ..adapt.test_lora import ALL, randomise_b
from .helpers import pair_batch, sequences, tiny_model


def kto_batch(seed: int) -> dict:
    B, T, V = 4, 10, 41
    return {**sequences(B, T, V, [2, 3, 2, 4], seed), **sequences(B, T, V, [2, 3, 2, 4], seed + 50, "kl_"),
            "label": torch.tensor([True, False, True, False])}


def test_weights_checksum_covers_scalar_tensors():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 2)
            self.register_buffer("temperature", torch.tensor(0.7))  # 0-d: no dimension to view as bytes

    m = Scaled()
    h = hashlib.sha256()
    for name, t in m.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    assert weights_checksum(m) == h.hexdigest()[:16]
    m.temperature.fill_(0.8)
    assert weights_checksum(m) != h.hexdigest()[:16]


@pytest.mark.parametrize("objective", ["dpo", "kto", "distill"])
def test_the_trained_model_as_reference_is_refused_before_anything_is_frozen(objective):
    policy = tiny_model(0)
    obj = {"dpo": lambda: DPOObjective(DPOConfig(), reference=policy),
           "kto": lambda: KTOObjective(KTOConfig(), reference=policy),
           "distill": lambda: DistillObjective(teacher=policy)}[objective]()
    role = "teacher" if objective == "distill" else "reference"
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)  # built after it
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(policy.parameters())) == 12
    with pytest.raises(ConfigError, match=f"^the {role} is the model being trained; pass a separate copy") as e:
        obj.loss(policy, pair_batch())
    assert "\n" not in str(e.value) and ("BaseReference(model)" in str(e.value)) == (role == "reference")
    assert policy.training and all(p.requires_grad for p in policy.parameters())  # nothing was frozen


def test_a_reference_sharing_a_parameter_with_the_trained_model_is_refused():
    policy = tiny_model(0)
    tied = copy.deepcopy(policy)
    tied.blocks[0].attn.wq.weight = policy.blocks[0].attn.wq.weight  # the same Parameter
    aliased = tiny_model(1)
    aliased.load_state_dict(policy.state_dict(), assign=True)  # new Parameters over the policy's memory
    for ref, name in ((tied, "blocks.0.attn.wq.weight"), (aliased, "tok_emb.weight")):
        with pytest.raises(ConfigError, match=f"^the reference shares {name} with the model being trained"):
            DPOObjective(DPOConfig(), reference=ref).loss(policy, pair_batch())
    assert all(p.requires_grad for p in policy.parameters())
    loss = DPOObjective(DPOConfig(), reference=copy.deepcopy(policy)).loss(policy, pair_batch())[0]
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # a separate copy: accepted, policy = reference


def test_frozen_outputs_come_from_eval_mode_without_gradients():
    ref = tiny_model(1, dropout=0.5).train()
    batch = sequences(2, 8, 41, [2, 3], 0)
    with torch.no_grad():
        noisy = ref(batch["input_ids"])  # train mode: dropout on
    frozen = Frozen(ref, role="teacher")
    out = frozen.logits(batch)
    assert not out.requires_grad and not ref.training and not any(p.requires_grad for p in ref.parameters())
    ref.train()  # put back in train mode by someone else: still eval outputs
    again = frozen.logits(batch)
    with torch.no_grad():
        want = ref.eval()(batch["input_ids"])
    assert torch.equal(out, want) and torch.equal(again, want) and not torch.allclose(noisy, want)
    toks, mask = frozen.token_logps(batch), batch["loss_mask"] & (batch["targets"] >= 0)
    by_hand = want.log_softmax(-1).gather(-1, batch["targets"].clamp(min=0)[..., None])[..., 0]
    assert toks.shape == (2, 8) and torch.allclose(toks[mask], by_hand[mask], atol=1e-5)


def lora_run(objective: str, reference: str, steps: int = 4):
    """A LoRA policy (model and adapter dropout on) trained a few AdamW steps against its base, as
    BaseReference(policy) or as a deep copy of the base; per step: loss, margin, adapter gradients."""
    base = tiny_model(0, n_layers=2, dropout=0.1)
    copied = copy.deepcopy(base)
    torch.manual_seed(0)
    policy = apply_lora(base, LoRAConfig(r=2, alpha=4, dropout=0.1, targets=ALL))
    randomise_b(policy)
    ref = BaseReference(policy) if reference == "base" else copied
    obj = (DPOObjective(DPOConfig(beta=0.2), reference=ref) if objective == "dpo"
           else KTOObjective(KTOConfig(beta=0.2), reference=ref))
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    policy.train()
    out = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same dropout masks in both runs
        loss, metrics = obj.loss(policy, pair_batch(seed=step) if objective == "dpo" else kto_batch(step))
        loss.backward()
        assert policy.training and all(m.enabled for m in policy.modules() if isinstance(m, LoRALinear))
        out.append((loss.detach(), metrics["rewards/margins"], [p.grad.clone() for p in trainable]))
        optimizer.step()
        optimizer.zero_grad()
    return out


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_base_reference_equals_a_deep_copied_base_over_training_steps(objective):
    with_base, with_copy = lora_run(objective, "base"), lora_run(objective, "copy")
    for step, ((loss, margin, grads), (loss2, margin2, grads2)) in enumerate(zip(with_base, with_copy)):
        assert torch.equal(loss, loss2) and torch.equal(margin, margin2), step
        assert len(grads) == 2 * 2 * len(ALL) and all(torch.equal(a, b) for a, b in zip(grads, grads2)), step
    if objective == "dpo":  # the policy is not its reference: rewards move away from 0 and log 2
        assert all(abs(loss.item() - math.log(2)) > 1e-3 and margin.abs().item() > 1e-4
                   for loss, margin, _ in with_base)
    assert len({round(loss.item(), 6) for loss, _, _ in with_base}) == len(with_base)  # the adapters moved


def test_base_reference_identity_is_the_base_and_errors_name_the_fix():
    base = tiny_model(0)
    policy = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, targets=("wq", "wv")))
    randomise_b(policy)
    ref = BaseReference(policy)
    assert ref.checksum == weights_checksum(base)  # the weights outside the adapters, names as the base's
    obj = DPOObjective(DPOConfig(reference_cache=3), reference=ref, reference_path="runs/sft")
    assert obj.ref is ref and ref.cache_size == 3
    obj.loss(policy, pair_batch())
    state = obj.state_dict()
    assert state == {"reference": {"role": "reference", "path": "runs/sft", "checksum": weights_checksum(base)}}
    DPOObjective(DPOConfig(), reference=copy.deepcopy(base)).load_state_dict(state)  # the same base: accepted
    other = BaseReference(apply_lora(tiny_model(1), LoRAConfig(r=2, targets=("wq", "wv"))))
    with pytest.raises(CheckpointError, match="checksum"):
        DPOObjective(DPOConfig(), reference=other).load_state_dict(state)
    with pytest.raises(ConfigError, match="BaseReference needs a policy with LoRA adapters"):
        BaseReference(tiny_model(0))
    with pytest.raises(ConfigError, match="BaseReference: final_norm.weight is trained"):
        BaseReference(apply_lora(tiny_model(0), LoRAConfig(r=2, targets=("wq",), trainable=("final_norm",))))
    with pytest.raises(ConfigError, match="reference_device='cpu' cannot move a BaseReference"):
        DPOObjective(DPOConfig(reference_device="cpu"), reference=BaseReference(policy))
    later = DPOObjective(DPOConfig(), reference=BaseReference(policy))
    policy.lm_head.weight.requires_grad_(True)  # unfrozen after the reference was built: refused at first use
    with pytest.raises(ConfigError, match="BaseReference: lm_head.weight is trained"):
        later.loss(policy, pair_batch())


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024) as a LoRALinear subclass: a trainable per-row magnitude over the normalised
    W + scale·BA, declared an adapter parameter; with adapters off the plain Linear."""

    adapter_params = (*LoRALinear.adapter_params, "magnitude")

    def __init__(self, base: nn.Linear, r: int, scale: float):
        super().__init__(base, r, scale)
        self.magnitude = nn.Parameter(self.weight.detach().norm(dim=1).clone())

    def forward(self, x):
        if not self.enabled:
            return nn.functional.linear(x, self.weight, self.bias)
        w = self.weight + self.delta_weight()
        return nn.functional.linear(x, w * (self.magnitude / w.norm(dim=1).detach())[:, None], self.bias)


def test_an_adapter_layer_declares_its_adapter_parameters():
    """A LoRALinear subclass with an adapter parameter of its own (DoRA's magnitude) names it in
    adapter_params, and every reader follows: BaseReference accepts the policy and its checksum is the base's,
    the adapter state holds and needs it, and adapter-only checkpoints save it as they save A and B."""
    from lmforge import checkpoint as ckpt
    from lmforge.adapt.lora import adapter_names, load_lora, lora_state_dict

    base = tiny_model(0)
    policy = copy.deepcopy(base).requires_grad_(False)
    for block in policy.blocks:
        block.attn.wq = DoRALinear(block.attn.wq, 2, 2.0)
    randomise_b(policy)
    with torch.no_grad():
        policy.blocks[0].attn.wq.magnitude.mul_(1.5)
    assert adapter_names(policy) == {f"blocks.{i}.attn.wq.{p}" for i in range(len(policy.blocks))
                                     for p in ("lora_A", "lora_B", "magnitude")}
    ref = BaseReference(policy)
    assert ref.checksum == weights_checksum(base)
    batch = pair_batch()
    want = DPOObjective(DPOConfig(), reference=copy.deepcopy(base)).loss(policy, batch)[0]
    torch.testing.assert_close(DPOObjective(DPOConfig(), reference=ref).loss(policy, batch)[0], want)
    cfg = LoRAConfig(r=2, alpha=4, targets=("wq",))
    state = lora_state_dict(policy, cfg)
    assert "blocks.0.attn.wq.magnitude" in state
    other = copy.deepcopy(base)
    for block in other.blocks:
        block.attn.wq = DoRALinear(block.attn.wq, 2, 2.0)
    load_lora(other, state)
    assert torch.equal(other.blocks[0].attn.wq.magnitude, policy.blocks[0].attn.wq.magnitude)
    with pytest.raises(ConfigError, match=r"missing \['blocks.0.attn.wq.magnitude'\]"):
        load_lora(other, {n: t for n, t in state.items() if not n.endswith("magnitude")})
    policy.blocks[0].attn.wq.magnitude.requires_grad_(False)  # frozen or not, an adapter is not the base's
    assert not adapter_names(policy) & ckpt.frozen_names(policy)


def test_base_reference_stays_the_starting_model_while_expert_biases_move():
    """MoE with aux-loss-free balancing under LoRA with adapters on the router: the Trainer moves each layer's
    selection bias after every step (update_expert_biases), a buffer adapters_disabled does not touch;
    BaseReference runs with the biases it started with, so its log-probs stay the starting model's, and the policy
    keeps its own. With the router frozen (no adapter on it) the biases do not move at all."""
    from lmforge.align.logprobs import batch_logps
    from lmforge.model.config import MoEConfig
    from lmforge.model.layers.moe import update_expert_biases

    start = tiny_model(0, mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, bias_update_rate=0.05)).eval()
    frozen = apply_lora(copy.deepcopy(start), LoRAConfig(r=2, targets=("wq", "wv")))
    frozen.train()(pair_batch()["chosen_input_ids"])
    assert update_expert_biases(frozen) == 0
    assert all(torch.equal(b, dict(start.named_buffers())[n]) for n, b in frozen.named_buffers() if "e_bias" in n)
    assert all(float(m.step_load.abs().sum()) == 0 for m in frozen.modules() if hasattr(m, "step_load"))
    for m in frozen.modules():  # a router unfrozen later (a hook) moves its bias from then on
        if hasattr(m, "step_load"):
            m.router.requires_grad_(True)
    frozen.train()(pair_batch()["chosen_input_ids"])
    assert update_expert_biases(frozen) == len(frozen.blocks)
    policy = apply_lora(copy.deepcopy(start), LoRAConfig(r=2, targets=("wq", "wv", "router")))
    ref = BaseReference(policy)
    batch = pair_batch()
    for _ in range(3):  # training forwards, then the Trainer's update after the optimizer step
        policy.train()(batch["chosen_input_ids"])
        assert update_expert_biases(policy) == len(policy.blocks)
    moved = {n: b.clone() for n, b in policy.named_buffers() if n.endswith("e_bias")}
    assert all(b.abs().sum() > 0 for b in moved.values())
    with torch.no_grad():
        want = batch_logps(start, batch, ("chosen_", "rejected_"))[0]
    got = ref.sequence_logps(batch, ("chosen_", "rejected_"))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(b, moved[n]) for n, b in policy.named_buffers() if n.endswith("e_bias"))


def test_the_vocabulary_check_reads_a_hf_model_behind_the_wrapper():
    """A reference or teacher of another vocabulary (another tokenizer) is refused also when it, or the
    trained model, is a HF model behind lmforge.infer.hf_wrapper.HFCausalLM (its size is the wrapper's
    vocab_size: no lmforge config, no lm_head of its own); the same vocabulary is accepted."""
    transformers = pytest.importorskip("transformers")
    from lmforge.infer.hf_wrapper import HFCausalLM

    def hf(vocab):
        torch.manual_seed(0)
        return HFCausalLM(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32)))

    batch = pair_batch()
    with pytest.raises(ConfigError, match="reference vocab_size=64 differs from the trained model's vocab_size=41"):
        DPOObjective(DPOConfig(), reference=hf(64)).loss(tiny_model(0), batch)
    with pytest.raises(ConfigError, match="reference vocab_size=50 differs from the trained model's vocab_size=41"):
        DPOObjective(DPOConfig(), reference=tiny_model(1, vocab_size=50)).loss(hf(41), batch)
    with pytest.raises(ConfigError, match="teacher vocab_size=64 differs"):
        DistillObjective(teacher=hf(64)).loss(tiny_model(0), sequences(3, 10, 41, [2, 3, 4], 0))
    assert torch.isfinite(DPOObjective(DPOConfig(), reference=hf(41)).loss(tiny_model(0), batch)[0])

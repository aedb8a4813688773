"""The seam the RL issue attaches to: on-policy rollouts sampled by the inference engine from the very
module the Trainer updates, scored by a task verifier, trained by a GRPO objective on the one Trainer.

What must hold, each checked against the training forward in fp32:
  - the engine's sampled-token log-probs are the policy's own, before and after every optimizer step (no
    stale weights, no stale prefix cache: the classic rollout bug), so the ratio new/old at the start of
    a step is 1;
  - the rollout source checkpoints with the Trainer and resumes to the bit-identical next batch, also
    after a Ctrl-C in the middle of sampling.
The source and the objective live here, not in the library: the RL issue builds the real ones on this
seam (docs: "RL rollouts on the engine and the Trainer").
"""

from __future__ import annotations

import pytest
import torch

from lmforge.align.logprobs import masked_mean, model_inputs, response_mask, token_logprobs
from lmforge.errors import LmforgeError
from lmforge.infer.engine import EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.optim import build_optimizer
from lmforge.optim.config import OptimConfig
from lmforge.tasks.listops import Counting
from lmforge.train.config import LoopConfig
from lmforge.train.trainer import Trainer

TOL = 1e-5  # fp32: the engine's paged forward against the training forward


class CountTokenizer:
    """The counting task's answers and letters, one id per character; any other character reads as a space.
    Eight ids and end-of-text, so an untrained policy answers right often enough (1 in 9) for GRPO to have
    a signal."""

    chars = "0123ab ?"
    eot_id = len(chars)
    vocab_size = len(chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self.chars.find(c) if c in self.chars else self.chars.index(" ") for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids if i < self.eot_id)


def policy(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=CountTokenizer.vocab_size, d_model=16, n_layers=2, n_heads=2,
                                   max_seq_len=96, init_std=0.1))


class Rollouts:
    """On-policy GRPO batches: per next_batch, `prompts` task prompts with `n` samples each from the engine
    (temperature 1, seeded, sampled-token log-probs), rewards from the task's verifier, advantages
    normalised within each prompt's group. Rows are prompt + completion; the loss covers the completion."""

    def __init__(self, llm: LLM, task, examples, *, prompts: int = 4, n: int = 4, max_tokens: int = 1,
                 seed: int = 0):
        self.llm, self.task, self.examples = llm, task, examples
        self.prompts, self.n, self.max_tokens = prompts, n, max_tokens
        self.seed, self.batches = seed, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        # the policy changed since the last batch (optimizer step, resumed checkpoint): drop what the old
        # weights computed, i.e. the prefix cache; the module itself is shared, so nothing is copied
        self.llm.update_weights()
        rows = self.sample(self.batch_examples(), self.seed + self.batches)
        self.batches += 1
        return collate(rows)

    def batch_examples(self) -> list:
        """The next batch's `prompts` task examples (the whole global batch's, under data parallelism)."""
        first = self.batches * self.prompts
        return [self.examples[(first + k) % len(self.examples)] for k in range(self.prompts)]

    def sample(self, exs: list, seed: int) -> list[tuple]:
        """(prompt ids, completion ids, log-probs, reward, advantage) of each of the `n` samples per example."""
        params = SamplingParams(n=self.n, max_tokens=self.max_tokens, temperature=1.0, logprobs=0, seed=seed)
        outs = self.llm.generate([ex.prompt + " Answer: " for ex in exs], params)
        rows = []
        for ex, out in zip(exs, outs):
            rewards = torch.tensor([float(self.task.verify(ex, "Answer: " + c.text)) for c in out.outputs])
            advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # GRPO (Shao et al. 2024)
            rows += [(out.prompt_token_ids, c.token_ids, c.logprobs, r, a)
                     for c, r, a in zip(out.outputs, rewards, advantages)]
        return rows

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.batches = state["seed"], state["batches"]


def collate(rows) -> dict[str, torch.Tensor]:
    """Right-padded rows; targets, loss_mask and old_logprobs at the completion's positions only."""
    T = max(len(p) + len(c) for p, c, *_ in rows) - 1
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), -100)
    old = torch.zeros(len(rows), T)
    for b, (p, c, lps, _, _) in enumerate(rows):
        seq = torch.tensor(p + c)
        ids[b, :len(seq) - 1] = seq[:-1]
        done = slice(len(p) - 1, len(seq) - 1)  # the positions that predict the completion
        targets[b, done], old[b, done] = seq[len(p):], torch.tensor(lps)
    return {"input_ids": ids, "targets": targets, "loss_mask": targets >= 0, "old_logprobs": old,
            "rewards": torch.stack([r for *_, r, _ in rows]), "advantages": torch.stack([a for *_, a in rows])}


class GRPO:
    """The clipped surrogate (PPO's, per token) with group-normalised advantages; no KL term."""

    def __init__(self, clip: float = 0.2):
        self.clip = clip

    def loss(self, model, batch):
        ids, kwargs = model_inputs(batch)
        logps = token_logprobs(model(ids, **kwargs), batch["targets"])
        mask = response_mask(batch)
        ratio = torch.exp(logps - batch["old_logprobs"])
        adv = batch["advantages"][:, None]
        surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - self.clip, 1 + self.clip) * adv)
        ratio_error = ((ratio - 1).abs() * mask).amax().detach()  # the engine's log-probs against ours
        return -masked_mean(surrogate, mask), {"reward": batch["rewards"].mean(), "ratio_error": ratio_error}

    def state_dict(self) -> dict:
        return {"clip": self.clip}

    def load_state_dict(self, state: dict) -> None:
        self.clip = state.get("clip", self.clip)


def engine_error(llm: LLM, model, prompt: list[int], *, sync: bool = True) -> float:
    """Largest gap between the model's log-probs in a training-mode forward and the engine's: of the
    prompt's second half (prefill, after a first half the prefix cache may hold) and of a sampled
    continuation (decode)."""
    if sync:
        llm.update_weights()
    start = len(prompt) // 2
    out = llm.generate([prompt], SamplingParams(max_tokens=4, logprobs=0, prompt_logprobs=0, seed=1,
                                                prompt_logprobs_start=start, ignore_eos=True))[0]
    seq = prompt + out.token_ids
    engine = [d[t] for d, t in zip(out.prompt_logprobs[start:], prompt[start:])] + out.logprobs
    with torch.no_grad():
        own = token_logprobs(model(torch.tensor([seq[:-1]])), torch.tensor([seq[1:]]))[0, start - 1:]
    return (own - torch.tensor(engine)).abs().max().item()


class Checks:
    """A hook: each step's metrics and, given a prompt, the engine's log-probs against the updated model's."""

    def __init__(self, llm: LLM, prompt: list[int] | None = None):
        self.llm, self.prompt, self.rows = llm, prompt, []

    def on_step_end(self, trainer, stats):
        assert trainer.model.training  # the engine's eval-mode steps hand the module back as they found it
        row = {k: float(v) for k, v in stats.items()}
        if self.prompt is not None:
            row["engine_error"] = engine_error(self.llm, trainer.model, self.prompt)
        self.rows.append(row)


def setup(run_dir, seed: int = 0, steps: int = 3):
    """Policy, engine on it (small blocks: prompts share cached prefixes), rollout source and Trainer."""
    task = Counting(alphabet="ab", length=(1, 3))
    model = policy(seed)
    llm = LLM(model, CountTokenizer(), config=EngineConfig(block_size=4, max_num_seqs=16, num_kv_tokens=2048))
    src = Rollouts(llm, task, task.examples("train", 8, seed=0))
    cfg = LoopConfig(run_dir=str(run_dir), max_steps=steps, log_every=1, eval_every=100, ckpt_every=2,
                     device="cpu", progress=False, plot=False, seed=0, optim=OptimConfig(lr=3e-2, weight_decay=0.0))
    trainer = Trainer(model, build_optimizer(model, cfg.optim), src, GRPO(), config=cfg)
    return trainer, llm, src


def test_rollouts_follow_every_optimizer_step(tmp_path):
    trainer, llm, src = setup(tmp_path / "run")
    prompt = CountTokenizer().encode(src.examples[0].prompt)  # a rollout prompt's prefix: cached blocks
    checks = Checks(llm, prompt)
    trainer.hooks.append(checks)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.model.train()
    assert engine_error(llm, trainer.model, prompt) < TOL  # before any update
    trainer.fit()
    assert len(checks.rows) == 3
    for row in checks.rows:
        assert row["ratio_error"] < TOL  # new/old = 1 at the step's start: rollouts came from these weights
        assert row["engine_error"] < TOL  # and after the step the engine sees the new weights
    assert any(r["reward"] > 0 for r in checks.rows)  # the verifier gave a signal
    moved = max((p - q).abs().max().item() for p, q in zip(trainer.model.parameters(), before))
    assert moved > 1e-3


def test_a_source_that_does_not_sync_is_caught(tmp_path, monkeypatch):
    """The negative control: the same prompts every batch, and a source whose update_weights does nothing.
    From the second step on the prompts' cached keys come from older weights, and the ratio shows it."""
    trainer, llm, src = setup(tmp_path / "run", steps=2)
    src.examples = src.examples[:src.prompts]
    checks = Checks(llm)
    trainer.hooks.append(checks)
    monkeypatch.setattr(llm, "update_weights", lambda weights=None: None)
    trainer.fit()
    assert checks.rows[0]["ratio_error"] < TOL and checks.rows[1]["ratio_error"] > 1e-3


def test_the_engine_leaves_the_trainers_module_where_and_as_it_is():
    model = policy().train()
    llm = LLM(model, CountTokenizer())
    llm.generate(["ab"], SamplingParams(max_tokens=2))
    assert model.training  # building or running an engine never switches the module to eval mode for good
    model.to("meta")  # e.g. a Trainer moved it to its device after the engine was built
    with pytest.raises(LmforgeError, match="moved from cpu to meta"):
        llm.update_weights()


def test_rollout_source_resumes_to_the_identical_batch(tmp_path):
    trainer, _, src = setup(tmp_path / "run", steps=2)
    trainer.fit()  # checkpoint at step 2: weights, optimizer, the source's seed and position
    assert src.state_dict() == {"seed": 0, "batches": 2}
    expected = src.next_batch()
    resumed, _, src2 = setup(tmp_path / "run", seed=1, steps=3)  # other initial weights, then resumed
    assert resumed.step == 2 and src2.state_dict() == {"seed": 0, "batches": 2}
    got = src2.next_batch()
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_an_interrupt_inside_the_rollouts_resumes_exactly(tmp_path, monkeypatch):
    """Ctrl-C while the engine samples the second step's rollouts: LLM.generate aborts its requests, the
    Trainer rolls the source back to the step's start and checkpoints step 1; resumed, the run ends on the
    uninterrupted run's weights."""
    reference, _, _ = setup(tmp_path / "reference", steps=2)
    reference.fit()
    trainer, llm, src = setup(tmp_path / "run", steps=2)
    step = llm.engine.step

    def interrupted(*args, **kwargs):
        if trainer.step == 1:
            monkeypatch.setattr(llm.engine, "step", step)
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert not llm.engine.has_unfinished() and src.state_dict()["batches"] == 1
    resumed, _, _ = setup(tmp_path / "run", steps=2)
    resumed.fit()
    for p, q in zip(resumed.model.parameters(), reference.model.parameters()):
        assert torch.equal(p, q)

"""SFT objective: token-mean loss = HF transformers' causal-LM loss; sequence-mean = per-example means
averaged; NEFTune noise = HF's NEFTune hook (same RNG draws) and its alpha/sqrt(L*d) bound."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.sft import SFTConfig, SFTObjective, neftune, sequence_mean
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


class Fixed(torch.nn.Module):
    """A 'model' that returns fixed logits, so the loss can be compared on the same numbers."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, ids, positions=None, cache=None, meta=None):
        return self.logits


def _batch(B=3, T=9, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[:, 0] = True
    return logits, {"input_ids": targets.clone(), "targets": torch.where(mask, targets, -100), "loss_mask": mask}


def test_token_mean_equals_transformers_causal_lm_loss():
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    logits, batch = _batch()
    ours, metrics = SFTObjective().loss(Fixed(logits), batch)
    ref = loss_utils.ForCausalLMLoss(logits, None, logits.shape[-1], shift_labels=batch["targets"])
    torch.testing.assert_close(ours, ref)
    assert metrics["num_tokens"] == batch["loss_mask"].sum()
    acc = (logits.argmax(-1) == batch["targets"])[batch["loss_mask"]].float().mean()
    torch.testing.assert_close(metrics["mean_token_accuracy"], acc)


def test_sequence_mean_is_the_mean_of_per_example_means():
    logits, batch = _batch()
    ours, _ = SFTObjective(SFTConfig(loss="sequence_mean")).loss(Fixed(logits), batch)
    per_row = [F.cross_entropy(logits[b], batch["targets"][b], ignore_index=-100) for b in range(3)]
    torch.testing.assert_close(ours, torch.stack(per_row).mean())
    # packed: documents of one row count separately
    v = torch.tensor([[1.0, 2.0, 3.0, 10.0, 20.0]])
    doc = torch.tensor([[0, 0, 0, 1, 1]])
    m = torch.tensor([[True, False, True, True, True]])
    assert sequence_mean(v, m, doc).item() == pytest.approx((2.0 + 15.0) / 2)


def test_neftune_matches_hf_hook_and_its_bound():
    neft = pytest.importorskip("transformers.integrations.neftune")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=32))
    ids = torch.randint(0, 50, (2, 12))
    clean = model.tok_emb(ids)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("emb", args[0]))  # the block's input
    with neftune(model, 5.0):
        torch.manual_seed(1)
        model(ids)
    ours = seen["emb"]
    model.tok_emb.neftune_noise_alpha = 5.0
    torch.manual_seed(1)
    ref = neft.neftune_post_forward_hook(model.tok_emb, (ids,), clean)
    torch.testing.assert_close(ours, ref)
    bound = 5.0 / math.sqrt(12 * 16)
    noise = ours - clean
    assert noise.abs().max() <= bound and noise.abs().max() > 0.9 * bound
    model.eval()
    with neftune(model, 5.0):
        model(ids)
    torch.testing.assert_close(seen["emb"], clean)  # no noise outside training
    model.train()
    model(ids)
    torch.testing.assert_close(seen["emb"], clean)  # the hook is gone after the context


class _Batches:
    """A DataSource over fixed batches."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


@pytest.mark.parametrize("loss", ["token_mean", "sequence_mean"])
def test_accumulated_micro_batches_train_like_one_big_batch(tmp_path, loss):
    from lmforge.align import data as D
    from lmforge.optim.config import OptimConfig
    from lmforge.tokenizer.byte import ByteTokenizer
    from lmforge.train.config import LoopConfig
    from lmforge.train.trainer import Trainer

    enc = D.Encoder(ByteTokenizer(), "plain")
    exs = [enc.prompt_completion("q" * (i + 1), "a" * (3 * i + 1), f"x:{i}") for i in range(8)]
    small, big = D.pad_batch(exs[:3]), D.pad_batch(exs[3:])  # 3 and 5 examples
    assert small["loss_mask"].sum() != big["loss_mask"].sum()  # unequal micro-batches: weighting matters
    params = []
    for run, batches in (("one", [D.pad_batch(exs)]), ("two", [small, big])):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
        cfg = LoopConfig(run_dir=str(tmp_path / run), max_steps=1, grad_accum=len(batches), device="cpu",
                         progress=False, plot=False, optim=OptimConfig(grad_clip=0.0, warmup_steps=0))
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        Trainer(model, opt, _Batches(batches), SFTObjective(SFTConfig(loss=loss)), config=cfg).train_step()
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["token_mean", "sequence_mean"])
def test_loss_mask_may_be_absent_or_integer(loss):
    """The batch protocol's loss_mask is optional (absent: every target other than -100 trains, pretraining's
    layout) and may be 0/1 integers as HF collators give it: the same loss, metrics and batch weight."""
    logits, batch = _batch()
    obj = SFTObjective(SFTConfig(loss=loss))
    ref, ref_metrics = obj.loss(Fixed(logits), batch)
    no_mask = {k: v for k, v in batch.items() if k != "loss_mask"}
    as_int = {**batch, "loss_mask": batch["loss_mask"].long()}
    for b in (no_mask, as_int):
        got, metrics = obj.loss(Fixed(logits), b)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        assert {k: float(v) for k, v in metrics.items()} == {k: float(v) for k, v in ref_metrics.items()}
        assert obj.batch_weight(b) == obj.batch_weight(batch)
    # an integer mask with zeros where targets count still leaves those positions out
    part = {**batch, "loss_mask": (batch["loss_mask"] & (torch.arange(batch["targets"].shape[1]) % 2 == 0)).int()}
    got, _ = obj.loss(Fixed(logits), part)
    expect, _ = obj.loss(Fixed(logits), {**batch, "loss_mask": part["loss_mask"].bool()})
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_neftune_noise_is_the_same_from_a_peft_adapter_and_its_merged_export(tmp_path):
    """NEFTune's noise is random (HF's hook's draws from the global generator), fixed by the run's seed. What
    differed between an SFT run from a PEFT adapter and one from its merged export was where the generator stood:
    loading drew the random initial weights of every layer it built (the adapter's base and LoRA layers, the
    export's one model) before the file's replaced them. load_model now draws nothing from the caller's generator,
    so the same seed gives the same noise and the same loss (neither the scale nor the embedding differed)."""
    from lmforge.adapt.lora import LoRAConfig, lora_layers, merge_lora
    from lmforge.checkpoint import load_model
    from lmforge.cli import main
    from lmforge.tokenizer.byte import ByteTokenizer

    from ..test_export import adapted, lora_run, tiny  # (transformers and peft, or skipped)
    from .helpers import sequences

    tok, lora = ByteTokenizer(), LoRAConfig(r=2, targets=("wq", "wv"))
    lora_run(tmp_path / "run", adapted(tiny(tok.vocab_size), lora), tok, lora)
    for out, flags in (("peft", ["--adapter"]), ("merged", [])):
        assert main(["export", str(tmp_path / "run"), str(tmp_path / out), "--template", "plain", *flags]) == 0
    batch = sequences(2, 16, tok.vocab_size, [3, 4], seed=0)
    losses = {}
    for name in ("peft", "merged"):
        torch.manual_seed(0)
        before = torch.random.get_rng_state()
        model = load_model(tmp_path / name, tokenizer=False)[0]
        assert torch.equal(torch.random.get_rng_state(), before), name  # loading drew nothing
        if lora_layers(model):  # (as a post-training run starts from an init holding adapters: start_model)
            merge_lora(model)
        losses[name] = SFTObjective(SFTConfig(neftune_alpha=5.0)).loss(model.train(), batch)[0]
    torch.testing.assert_close(losses["peft"], losses["merged"], rtol=0, atol=1e-5)

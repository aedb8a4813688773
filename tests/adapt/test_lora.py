"""LoRA vs PEFT (same adapters: equal outputs and equal gradients of A and B; rsLoRA scale; merged
weights), merge keeps the function, adapter-only checkpoints, one-line errors, and LoRA classification
fine-tuning on the one Trainer: only adapters and the head change, and a resumed run is bit-exact."""

import copy
import math

import pytest
import torch
from torch import nn

from lmforge.adapt import (LoRAConfig, LoRALinear, apply_lora, load_lora, lora_state_dict, merge_lora,
                           trainable_parameters)
from lmforge.adapt.lora import adapters_disabled, lora_layers
from lmforge.align.reward import ClassificationObjective, SequenceHead
from lmforge.errors import ConfigError
from lmforge.model.surgery import replace_module
from lmforge.optim import build_optimizer
from lmforge.optim.config import OptimConfig
from lmforge.train.config import LoopConfig
from lmforge.train.harness import FixedBatches
from lmforge.train.trainer import Trainer

from ..align.helpers import tiny_model

ALL = ("wq", "wk", "wv", "wo", "gate", "up", "down")
IDS = torch.randint(0, 41, (3, 9), generator=torch.Generator().manual_seed(1))


def randomise_b(model: nn.Module, seed: int = 0) -> None:
    """Give every B a nonzero value (at init B = 0, so A's gradient would be zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_outputs_gradients_and_merge(rslora):
    peft = pytest.importorskip("peft")
    base = tiny_model(0, n_layers=2)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        target_modules=list(ALL), r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora))
    cfg = LoRAConfig(r=4, alpha=8, targets=ALL, rslora=rslora)
    ours = apply_lora(base, cfg)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 2 * len(ALL)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, m in layers.items():
            theirs = ref.base_model.model.get_submodule(name)
            assert theirs.scaling["default"] == pytest.approx(m.scale) == pytest.approx(8 / (2 if rslora else 4))
            theirs.lora_B["default"].weight.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
            m.lora_A.copy_(theirs.lora_A["default"].weight)
            m.lora_B.copy_(theirs.lora_B["default"].weight)
    out, want = ours(IDS), ref(IDS)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    out.square().mean().backward()
    want.square().mean().backward()
    for name, m in layers.items():
        theirs = ref.base_model.model.get_submodule(name)
        torch.testing.assert_close(m.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)
    assert {n for n, p in ours.named_parameters() if p.grad is not None} == \
        {f"{n}.lora_{x}" for n in layers for x in "AB"}
    assert trainable_parameters(ours).trainable == sum(p.numel() for p in ref.parameters() if p.requires_grad)
    merged, ref_merged = merge_lora(ours), ref.merge_and_unload()
    for name in layers:
        assert type(merged.get_submodule(name)) is nn.Linear
        torch.testing.assert_close(merged.get_submodule(name).weight, ref_merged.get_submodule(name).weight)


def test_init_is_the_base_model_and_merge_keeps_the_function():
    base = tiny_model(0)
    want = base(IDS)
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, alpha=4, targets=("attn.w?", "mlp.*")))
    for m in model.modules():
        if isinstance(m, LoRALinear):  # nn.Linear's default: Kaiming-uniform, bound 1/sqrt(fan_in)
            assert m.lora_A.abs().max() <= m.in_features ** -0.5 and m.lora_A.std() > 0 and not m.lora_B.any()
    torch.testing.assert_close(model(IDS), want, rtol=0, atol=0)
    randomise_b(model)
    adapted = model(IDS)
    assert (adapted - want).abs().max() > 1e-3
    keys = set(model.state_dict())
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == {k for k in keys if "lora_" not in k} == set(base.state_dict())
    torch.testing.assert_close(model(IDS), adapted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_into_a_half_precision_base_rounds_once_as_peft(dtype):
    """The fp32 update is added to a bf16 / fp16 weight in place, so W + scale·BA is rounded once: PEFT's
    merge bit for bit. (Cast to the weight's dtype first, it was rounded twice: 10,595 of 65,536 bf16 elements
    one ulp off, found 2026-12-05.)"""
    torch.manual_seed(0)
    lin = nn.Linear(256, 256).to(dtype)
    model = nn.Sequential(LoRALinear(copy.deepcopy(lin), r=8, scale=2.0))
    with torch.no_grad():
        model[0].lora_B.normal_(0, 0.05)
    assert model[0].lora_A.dtype == torch.float32
    once = (lin.weight.float() + 2.0 * (model[0].lora_B @ model[0].lora_A)).to(dtype)
    twice = lin.weight + (2.0 * (model[0].lora_B @ model[0].lora_A)).to(dtype)
    assert (once != twice).sum() > 1000  # the two roundings differ here, so the test can tell them apart
    merged = merge_lora(copy.deepcopy(model))[0]
    assert merged.weight.dtype == dtype and torch.equal(merged.weight, once)
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(nn.Sequential(copy.deepcopy(lin)), peft.LoraConfig(target_modules=["0"], r=8,
                                                                                  lora_alpha=16))
    with torch.no_grad():
        ref.base_model.model[0].lora_A["default"].weight.copy_(model[0].lora_A)
        ref.base_model.model[0].lora_B["default"].weight.copy_(model[0].lora_B)
    assert torch.equal(ref.merge_and_unload()[0].weight, merged.weight)


def test_disabled_adapters_give_the_plain_linear_and_the_base_model():
    """enabled=False is the base layer bit for bit; adapters_disabled(model) is the base model, and puts
    every layer's previous state back, on an error too."""
    lin = nn.Linear(6, 5)
    plain = copy.deepcopy(lin)
    lora = LoRALinear(lin, r=2, scale=2.0)
    with torch.no_grad():
        lora.lora_B.normal_()
        x = torch.randn(3, 4, 6)
        assert not torch.allclose(lora(x), plain(x))
        lora.enabled = False
        assert torch.equal(lora(x), plain(x))

    base = tiny_model(0, n_layers=2)
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, targets=ALL))
    randomise_b(model)
    layers = list(lora_layers(model).values())
    with torch.no_grad():
        adapted, want = model(IDS), base(IDS)
        assert not torch.allclose(adapted, want)
        with adapters_disabled(model) as same:
            assert same is model and torch.equal(model(IDS), want)
        assert torch.equal(model(IDS), adapted)
        layers[0].enabled = False  # already off: stays off
        with pytest.raises(RuntimeError, match="boom"), adapters_disabled(model):
            raise RuntimeError("boom")
    assert [m.enabled for m in layers] == [False] + [True] * (len(layers) - 1) and len(layers) == 2 * len(ALL)
    with pytest.raises(ConfigError, match="LoRA layer .* is disabled .*; merge outside it"):
        merge_lora(model)
    with pytest.raises(ConfigError, match="has no LoRA adapters to disable"), adapters_disabled(base):
        pass


def test_adapter_checkpoint_roundtrip_and_counts():
    cfg = LoRAConfig(r=2, targets=("wq", "wv"), trainable=("head",))
    model = apply_lora(SequenceHead(tiny_model(0), out_dim=3), cfg)
    randomise_b(model)
    state = lora_state_dict(model, cfg)
    assert sorted(state) == ["backbone.blocks.0.attn.wq.lora_A", "backbone.blocks.0.attn.wq.lora_B",
                             "backbone.blocks.0.attn.wq.lora_scale",
                             "backbone.blocks.0.attn.wv.lora_A", "backbone.blocks.0.attn.wv.lora_B",
                             "backbone.blocks.0.attn.wv.lora_scale", "head.bias", "head.weight"]
    assert float(state["backbone.blocks.0.attn.wq.lora_scale"]) == cfg.scale == 8.0
    tensors = {k: v for k, v in state.items() if not k.endswith("lora_scale")}
    count = trainable_parameters(model)
    assert count.trainable == sum(t.numel() for t in tensors.values()) == 2 * (2 * 16 + 16 * 2) + 3 * 16 + 3
    assert count.total == sum(p.numel() for p in model.parameters()) and str(count).startswith("trainable 179 of")
    other = apply_lora(SequenceHead(tiny_model(0), out_dim=3), cfg)
    load_lora(other, state)
    torch.testing.assert_close(other(IDS), model(IDS), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="missing .*wv.lora_A"):
        load_lora(other, {k: v for k, v in state.items() if "wv.lora_A" not in k})
    with pytest.raises(ConfigError, match="use the same r"):
        load_lora(apply_lora(SequenceHead(tiny_model(0), out_dim=3), LoRAConfig(r=4, targets=("wq", "wv"))), state)
    for changed in (dict(alpha=8.0), dict(rslora=True)):  # same shapes, another scale: refused, nothing copied
        third = apply_lora(SequenceHead(tiny_model(0), out_dim=3), LoRAConfig(**{**vars(cfg), **changed}))
        before = {n: p.clone() for n, p in third.named_parameters()}
        with pytest.raises(ConfigError, match="trained with scale 8, .* gives (4|11.3137); use the same alpha"):
            load_lora(third, state)
        assert all(torch.equal(p, before[n]) for n, p in third.named_parameters())
    load_lora(other, tensors)  # an adapter file from before scales were saved still loads


def test_adapter_checkpoint_holds_every_trainable_parameter_of_a_named_subtree():
    """trainable names a module whose parameters live in its submodules (a block's MLP): all of them are
    trained, so all of them are saved, and a fresh model loads the same function."""
    cfg = LoRAConfig(r=2, targets=("wq",), trainable=("blocks.0.mlp",))
    model = apply_lora(tiny_model(0), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mlp." in n:
                p.add_(0.1)  # as if trained
    state = lora_state_dict(model, cfg)
    mlp = {n for n, p in model.named_parameters() if n.startswith("blocks.0.mlp.")}
    assert mlp and mlp <= set(state)
    other = apply_lora(tiny_model(0), cfg)
    load_lora(other, state)
    torch.testing.assert_close(other(IDS), model(IDS), rtol=0, atol=0)


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="'q' matches no nn.Linear .* named down, gate, lm_head, up, wk, wo, wq, wv"):
        apply_lora(tiny_model(0), LoRAConfig(targets=("q",)))
    fused = tiny_model(0, fused_proj=True)
    with pytest.raises(ConfigError, match="'wk' matches no .*wqkv"):
        apply_lora(fused, LoRAConfig(targets=("wk",)))
    apply_lora(fused, LoRAConfig(targets=("wqkv",)))  # the stacked projection is a Linear like any other
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(fused, LoRAConfig(targets=("wo",)))
    with pytest.raises(ValueError, match="merge_lora"):  # fusing would drop the adapters of wq, wk, wv
        apply_lora(tiny_model(0), LoRAConfig()).fuse_projections()
    with pytest.raises(ConfigError, match="lm_head.weight is tied to tok_emb.weight"):
        apply_lora(tiny_model(0, tie_embeddings=True), LoRAConfig(targets=("lm_head",)))
    with pytest.raises(ConfigError, match=r"'head' matches no module of Transformer; its modules are named attn, "
                                          r"blocks, .*lm_head, .*tok_emb, .*wv$") as refused:
        apply_lora(tiny_model(0), LoRAConfig(trainable=("head",)))  # the hint said "e.g. 'head'" (2026-12-07)
    assert "'head'" not in str(refused.value).split(";")[1] and " 0," not in str(refused.value)
    with pytest.raises(ConfigError, match="unmerged LoRA adapters .*merge_lora"):  # HF files would hold the base model
        apply_lora(tiny_model(0), LoRAConfig()).save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())  # refused before writing anything
    for bad, field in [({"r": 0}, "r=0"), ({"dropout": 1.0}, "dropout"), ({"targets": ["wq", 3]}, "targets"),
                       ({"targets": ()}, "adapts nothing"), ({"rslora": "yes"}, "lora.rslora = 'yes': expected true"),
                       ({"alpha": 0.0}, r"alpha=0.0 must be a finite number > 0 \(e.g. 2 \* r\)"),
                       ({"alpha": math.inf}, r"alpha=inf must be a finite"),  # (scale inf: NaN from the first step)
                       ({"alpha": math.nan}, r"alpha=nan must be a finite")]:
        with pytest.raises(ConfigError, match=field):
            LoRAConfig(**bad)
    # one pattern as a string is that pattern (not its characters), a list a tuple (as TrainConfig's paths)
    assert LoRAConfig(targets="wq").targets == ("wq",) and LoRAConfig(targets=["wq", "wv"]).targets == ("wq", "wv")


def test_a_rank_above_every_layers_width_is_refused_before_allocating(monkeypatch):
    """`--lora.r 100000` ran out of memory with a traceback: B A's rank stops at min(in, out), so an r above that of
    every target is refused in one line, before any adapter is built; an r above only the narrow layers' min (wk's
    out here, as GQA's) still adds rank to the wide ones, as PEFT allows."""
    model = tiny_model(0, n_kv_heads=1)  # wq 16 -> 16, wk 16 -> 8
    built = []
    monkeypatch.setattr(LoRALinear, "__init__", lambda self, *a, **k: built.append(a) or nn.Module.__init__(self))
    with pytest.raises(ConfigError, match=r"r=100000 exceeds min\(in, out\) of every adapted layer \(at most 16\).*"
                                          r"give r <= 16"):
        apply_lora(model, LoRAConfig(r=100000, targets=("wq", "wk")))
    with pytest.raises(ConfigError, match=r"at most 8\).*r <= 8"):
        apply_lora(model, LoRAConfig(r=9, targets=("wk",)))
    assert built == [] and all(p.requires_grad for p in model.parameters())
    monkeypatch.undo()
    layers = lora_layers(apply_lora(model, LoRAConfig(r=12, targets=("wq", "wk"))))
    assert {n.rsplit(".", 1)[-1]: tuple(m.lora_A.shape) for n, m in layers.items()} == {"wq": (12, 16), "wk": (12, 16)}


def _classify_run(run_dir, hooks=()):
    torch.manual_seed(0)
    model = apply_lora(SequenceHead(tiny_model(0), out_dim=3),
                       LoRAConfig(r=2, dropout=0.1, targets=ALL, trainable=("head",)))
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 41, (4, 8), generator=g), "label": torch.randint(0, 3, (4,), generator=g)}
               for _ in range(3)]
    cfg = LoopConfig(optim=OptimConfig(lr=1e-2, warmup_steps=1), run_dir=str(run_dir), max_steps=4, log_every=1,
                     eval_every=100, ckpt_every=100, device="cpu", dtype="fp32", progress=False, plot=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, build_optimizer(model, cfg.optim), FixedBatches(batches), ClassificationObjective(),
                      config=cfg, hooks=hooks)
    return trainer, before


def test_trainer_changes_only_adapters_and_head_and_resumes_bit_exactly(tmp_path):
    trainer, before = _classify_run(tmp_path / "a")
    trainer.fit()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if "lora_" in n or n.startswith("head.")}

    class Stop:  # Ctrl-C after step 2: a checkpoint of that state, then resume
        def on_step_end(self, trainer, stats):
            if trainer.step == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _classify_run(tmp_path / "b", hooks=[Stop()])[0].fit()
    resumed = _classify_run(tmp_path / "b")[0]
    assert resumed.step == 2
    resumed.fit()
    for (n, p), q in zip(resumed.model.named_parameters(), trainer.model.parameters()):
        assert torch.equal(p, q), n


def test_a_lora_run_checkpoint_loads_with_its_adapters(tmp_path):
    """A checkpoint of a model with unmerged adapters records them (rank, scale per layer): load_model and
    LLM.load rebuild them and give the trained function; loading into a plain model names the fix."""
    from lmforge import checkpoint as ckpt
    from lmforge.errors import CheckpointError

    model = apply_lora(tiny_model(0), LoRAConfig(r=2, alpha=6, targets=("wq", "up")))
    randomise_b(model)
    path = ckpt.save_checkpoint(tmp_path / "run", 3, model)
    loaded, _ = ckpt.load_model(tmp_path / "run")
    assert {n for n, m in loaded.named_modules() if isinstance(m, LoRALinear)} == \
        {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    torch.testing.assert_close(loaded(IDS), model.eval()(IDS), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="it holds LoRA adapters: apply_lora"):
        ckpt.load_weights(tiny_model(0), path)


class Int8Linear(nn.Module):
    """A stand-in quantized Linear (what a quantization module would put in a Linear's place): the weight only
    as int8 codes + per-row scales (buffers), dequantized at each forward; no .weight attribute."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        self.register_buffer("codes", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scales", scale)

    def forward(self, x):
        return nn.functional.linear(x, self.codes.to(x.dtype) * self.scales[:, None].to(x.dtype))


def quantized(model: nn.Module, names=("wq", "wv", "down")) -> nn.Module:
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in names:
            replace_module(model, name, Int8Linear(m))
    return model


def test_qlora_adapters_wrap_a_quantized_base_train_and_refuse_to_merge():
    """QLoRA: LoRA onto a quantized (non-nn.Linear) base calls the base (its dequantized weight, not a bare
    .weight it does not have), starts as the quantized model, trains only A and B, saves and loads its
    adapters, and refuses merge_lora (folding B A into int8 codes would requantize); remove_lora puts the very
    base layer back."""
    base = quantized(tiny_model(0))
    want = base(IDS)
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, alpha=4, targets=("wq", "wv", "down")))
    layers = lora_layers(model)
    assert len(layers) == 3 * len(model.blocks) and all(isinstance(m.base, Int8Linear) for m in layers.values())
    torch.testing.assert_close(model(IDS), want, rtol=0, atol=0)
    adapters = sum(m.lora_A.numel() + m.lora_B.numel() for m in layers.values())
    assert trainable_parameters(model) == type(trainable_parameters(model))(adapters,
                                                                            tiny_model(0).num_params() + adapters)
    randomise_b(model)
    codes = {n: b.clone() for n, b in model.named_buffers()}
    model(IDS).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {n for n in dict(model.named_parameters()) if n.endswith((".lora_A", ".lora_B"))}
    # equal_nan: a buffer nothing writes (RoPE's inv_freq_long without LongRoPE: torch.empty) holds whatever bits
    # its memory held, at times a NaN, which torch.equal calls unequal to itself (1 run of 7 here, 2026-12-07)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, codes[n], rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{n}: {m}")
    with torch.no_grad(), adapters_disabled(model):
        torch.testing.assert_close(model(IDS), want, rtol=0, atol=0)
    cfg = LoRAConfig(r=2, alpha=4, targets=("wq", "wv", "down"))
    other = apply_lora(copy.deepcopy(base), cfg)
    load_lora(other, lora_state_dict(model, cfg))
    torch.testing.assert_close(other(IDS), model(IDS), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="wraps a Int8Linear, not an nn.Linear .* cannot be merged"):
        merge_lora(model)
    from lmforge.adapt.lora import remove_lora

    wrapped = {n: m.base for n, m in layers.items()}
    remove_lora(model)
    assert all(model.get_submodule(n) is m for n, m in wrapped.items())
    torch.testing.assert_close(model(IDS), want, rtol=0, atol=0)


def test_lora_over_a_linear_subclass_keeps_its_forward():
    """An nn.Linear subclass whose forward is more than x W^T + b keeps it under LoRA: reading its bare
    .weight (F.linear) would compute another function, silently."""

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    lin = Doubled(6, 5)
    x = torch.randn(3, 6)
    lora = LoRALinear(lin, r=2, scale=1.0)
    assert lora.base is lin and torch.equal(lora(x), lin(x))


@pytest.mark.parametrize("dora", [False, True])
def test_adapters_follow_the_mode_of_the_layer_they_wrap(dora):
    """apply_lora on a model in eval mode (what LLM.load and load_model give) built its layers in training mode:
    with dropout the eval model's logits changed from call to call (found 2026-12-07). Each layer now takes its
    base layer's mode, and model.train() / eval() still switch it."""
    model = apply_lora(tiny_model(0).eval(), LoRAConfig(r=2, targets=("wq", "up"), dropout=0.5, dora=dora))
    randomise_b(model)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), model(IDS), rtol=0, atol=0)
    assert not any(m.training for m in merge_lora(copy.deepcopy(model)).modules())  # the Linears put back too
    model.train()
    with torch.no_grad():
        assert (model(IDS) - model(IDS)).abs().max() > 1e-3  # the adapter dropout in training
    assert all(m.training for m in apply_lora(tiny_model(0).train(), LoRAConfig(targets=("wq",))).modules())

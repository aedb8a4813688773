"""Quantized models in checkpoints beyond quantized Linears: a quantized MoE `Experts` or token embedding is
recorded and rebuilt as saved (full and adapter-only checkpoints), integer codes load only into their own dtype,
a checkpoint reopens in the float dtype it was saved in, and what cannot be rebuilt is said at save."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmforge import checkpoint as ckpt
from lmforge.adapt.lora import LoRAConfig, apply_lora
from lmforge.adapt.qlora import BASE_LAYERS, base_layer_record
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.model.config import MoEConfig
from lmforge.model.layers.moe import Experts

from .adapt.test_qlora_bases import trained
from .align.helpers import tiny_model

IDS = torch.randint(0, 41, (2, 9), generator=torch.Generator().manual_seed(1))
MOE = dict(mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=16))


def _codes(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of w and their scales along `dim` (the reduced one)."""
    scale = w.detach().abs().amax(dim, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(w.detach() / scale).to(torch.int8), scale


def _filled(q: nn.Module, w: torch.Tensor) -> nn.Module:
    """q with its `codes` and per-row `scales` those of the matrix w."""
    codes, scale = _codes(w, 1)
    q.codes.copy_(codes)
    q.scales.copy_(scale)
    return q


class Int8Experts(nn.Module):
    """MoE experts as int8 codes + per-row scales (buffers), one F.linear per expert: a quantized `Experts`."""

    def __init__(self, E: int, d_model: int, d_expert: int, activation: str, dtype=torch.float32, device=None):
        super().__init__()
        self.E, self.d_model, self.d_expert, self.activation = E, d_model, d_expert, activation
        for n, shape in (("w_up", (E, d_expert, d_model)), ("w_gate", (E, d_expert, d_model)),
                         ("w_down", (E, d_model, d_expert))):
            self.register_buffer(f"{n}_q", torch.empty(shape, dtype=torch.int8, device=device))
            self.register_buffer(f"{n}_s", torch.empty(*shape[:2], 1, dtype=dtype, device=device))

    @property
    def settings(self) -> dict:
        return {"E": self.E, "d_model": self.d_model, "d_expert": self.d_expert, "activation": self.activation}

    @classmethod
    def empty(cls, **settings) -> "Int8Experts":
        return cls(**settings)

    @classmethod
    def of(cls, ex: Experts) -> "Int8Experts":
        q = cls(ex.E, ex.d_model, ex.d_expert, ex.activation)
        for n in ("w_up", "w_gate", "w_down"):
            codes, scale = _codes(getattr(ex, n), -1)
            getattr(q, f"{n}_q").copy_(codes)
            getattr(q, f"{n}_s").copy_(scale)
        return q

    def w(self, n: str) -> torch.Tensor:
        return getattr(self, f"{n}_q").to(torch.float32) * getattr(self, f"{n}_s")

    def forward(self, x, counts, **_):
        outs = []
        for e, xe in enumerate(x.split(counts.tolist())):
            h = F.silu(F.linear(xe, self.w("w_gate")[e])) * F.linear(xe, self.w("w_up")[e])
            outs.append(F.linear(h, self.w("w_down")[e]))
        return torch.cat(outs)


class Int8Embedding(nn.Module):
    """A token embedding as int8 codes + per-row scales."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("codes", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, 1, dtype=dtype, device=device))

    @property
    def settings(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim}

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, *, dtype, device) -> "Int8Embedding":
        return cls(num_embeddings, embedding_dim, dtype, device)

    @classmethod
    def of(cls, emb: nn.Embedding) -> "Int8Embedding":
        return _filled(cls(emb.num_embeddings, emb.embedding_dim, emb.weight.dtype), emb.weight)

    def forward(self, ids):
        return self.codes[ids].to(self.scales.dtype) * self.scales[ids]


class Int8Linear(nn.Module):
    """A quantized Linear (int8 codes, per-row scales in the model's float dtype) with empty(dtype=, device=)."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None,
                 codes_dtype=torch.int8):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.empty(out_features, in_features, dtype=codes_dtype, device=device))
        self.register_buffer("scales", torch.empty(out_features, 1, dtype=dtype, device=device))

    seen: list = []

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, *, dtype, device) -> "Int8Linear":
        cls.seen.append((dtype, device))
        return cls(in_features, out_features, dtype, device)

    @classmethod
    def of(cls, lin: nn.Linear) -> "Int8Linear":
        return _filled(cls(lin.in_features, lin.out_features, lin.weight.dtype), lin.weight)

    def forward(self, x):
        return F.linear(x, (self.codes.to(self.scales.dtype) * self.scales).to(x.dtype))


@pytest.fixture
def registered(monkeypatch):
    for kind, cls in (("test-experts", Int8Experts), ("test-emb", Int8Embedding), ("test-linear", Int8Linear)):
        monkeypatch.setitem(BASE_LAYERS, kind, cls)


def moe_model(seed: int = 0) -> nn.Module:
    model = tiny_model(seed, **MOE).eval()
    with torch.no_grad():  # spread the expert weights so int8 rounding shows
        for b in model.blocks:
            b.mlp.experts.w_up.mul_(3)
    return model


def quantized(model: nn.Module) -> nn.Module:
    """Every block's experts and the token embedding replaced by int8 ones (what a quantizer does)."""
    for b in model.blocks:
        b.mlp.experts = Int8Experts.of(b.mlp.experts)
    model.tok_emb = Int8Embedding.of(model.tok_emb)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_quantized_experts_and_embedding_open_as_saved(tmp_path, registered):
    """Only Linear-like layers were recorded: a full checkpoint of a model whose MoE experts and token embedding
    were quantized saved, then refused to load (missing w_up, unexpected w_up_q), and adapters saved alone over
    the float base it was quantized from loaded float experts and embedding in their place (logits off by 0.02
    to 0.4) without a word. Both are recorded by kind and settings now and reopen bit for bit."""
    model = quantized(moe_model())
    record = base_layer_record(model)
    assert record["blocks.0.mlp.experts"] == {"kind": "test-experts", "settings": {
        "E": 4, "d_model": 16, "d_expert": 16, "activation": "swiglu"}}
    assert record["tok_emb"] == {"kind": "test-emb", "settings": {"num_embeddings": 41, "embedding_dim": 16}}
    full = ckpt.save_checkpoint(tmp_path / "full", 0, model)
    loaded, _ = ckpt.load_model(full, tokenizer=False)
    assert type(loaded.blocks[0].mlp.experts) is Int8Experts and type(loaded.tok_emb) is Int8Embedding
    assert torch.equal(logits(loaded), logits(model))

    fbase = ckpt.save_checkpoint(tmp_path / "fbase", 0, moe_model())
    floats, _ = ckpt.load_model(fbase, tokenizer=False)
    model = trained(apply_lora(quantized(floats), LoRAConfig(r=2, alpha=4, targets=("wq", "wv"))))
    path = ckpt.save_checkpoint(tmp_path / "over_f", 1, model, base=ckpt.base_record(fbase))
    saved = set(load_file(path / "model.safetensors"))
    assert {"blocks.0.mlp.experts.w_up_q", "tok_emb.codes", "tok_emb.scales"} <= saved
    loaded, _ = ckpt.load_model(path, tokenizer=False)
    assert type(loaded.blocks[-1].mlp.experts) is Int8Experts and type(loaded.tok_emb) is Int8Embedding
    assert torch.equal(logits(loaded), logits(model))


def test_an_unregistered_quantized_module_is_warned_at_save_and_refused_at_load(tmp_path):
    """An unregistered quantized embedding over a float base: the checkpoint loaded the base's float embedding in
    its place, silently. Now saving warns (load_model will not rebuild it) and loading refuses in one line naming
    the module, its class and the fix; its codes are in the file, for load_weights onto a model you build."""
    fbase = ckpt.save_checkpoint(tmp_path / "fbase", 0, tiny_model(0))
    model, _ = ckpt.load_model(fbase, tokenizer=False)
    model.tok_emb = Int8Embedding.of(model.tok_emb)
    model = trained(apply_lora(model, LoRAConfig(r=2, alpha=4, targets=("wq",))))
    with pytest.warns(UserWarning, match=r"base layer tok_emb is a tests\.test_quant_checkpoint\.Int8Embedding, which "
                                         r"load_model cannot rebuild .*register its class before saving"):
        path = ckpt.save_checkpoint(tmp_path / "ad", 1, model, base=ckpt.base_record(fbase))
    assert "tok_emb.codes" in load_file(path / "model.safetensors")
    with pytest.raises(ConfigError) as e:
        ckpt.load_model(path, tokenizer=False)
    msg = str(e.value)
    assert "base layer tok_emb is tests.test_quant_checkpoint.Int8Embedding, a kind load_model cannot rebuild" in msg
    assert "register_base_layer(KIND, cls)" in msg and "\n" not in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model load_model rebuilds whole: no warning
        ckpt.save_checkpoint(tmp_path / "plain", 1, tiny_model(0))


def test_a_frozen_module_the_base_does_not_build_is_not_left_to_it(tmp_path):
    """A frozen tensor of a module the base's model does not have (here one added to the model) was left out of
    an adapter-only checkpoint as if the base gave it back: the model came back without it. Refused in one line."""
    fbase = ckpt.save_checkpoint(tmp_path / "fbase", 0, tiny_model(0))
    model = apply_lora(tiny_model(0), LoRAConfig(r=2, targets=("wq",)))
    model.extra = nn.Linear(16, 16).requires_grad_(False)
    with pytest.raises(ConfigError) as e:
        ckpt.save_checkpoint(tmp_path / "ad", 1, model, base=ckpt.base_record(fbase))
    msg = str(e.value)
    assert msg.startswith("adapter-only checkpoint: extra (a Linear) holds the frozen extra.bias, which the base ")
    assert "does not give back (its model builds nothing there)" in msg and "\n" not in msg
    assert ckpt.checkpoint_dirs(tmp_path / "ad") == []


class _Marked(torch.Tensor):
    """A minimal tensor subclass, as torchao's quantized weights are."""


@pytest.mark.filterwarnings("ignore:base layer blocks.0.attn.wq is a torch.nn.modules.linear.Linear holding")
def test_a_linear_holding_a_tensor_subclass_is_not_left_to_a_float_base(tmp_path):
    """An nn.Linear whose weight is a tensor subclass (torchao) counted as a plain Linear: an adapter-only
    checkpoint over the float base left it out, and the model came back with the base's float weight. It is
    recorded now (fused.plain_linear), so the checkpoint keeps it - and refuses the subclass it cannot store."""
    fbase = ckpt.save_checkpoint(tmp_path / "fbase", 0, tiny_model(0))
    model = apply_lora(tiny_model(0), LoRAConfig(r=2, targets=("wv",)))
    wq = model.blocks[0].attn.wq
    wq.weight = nn.Parameter(wq.weight.detach().as_subclass(_Marked), requires_grad=False)
    assert base_layer_record(model) == {"blocks.0.attn.wq": {
        "class": "torch.nn.modules.linear.Linear holding a tests.test_quant_checkpoint._Marked"}}
    with pytest.raises(ConfigError, match=r"^blocks\.0\.attn\.wq\.weight is a tests\.test_quant_checkpoint\._Marked, "
                                          "a tensor subclass a checkpoint cannot store"):
        ckpt.save_checkpoint(tmp_path / "ad", 1, model, base=ckpt.base_record(fbase))


def test_integer_codes_load_only_into_their_own_dtype(tmp_path, registered):
    """Any integer dtype loaded into any other: uint8 int4 codes into an int8 shell wrapped (200 -> -56), in
    load_weights and in the engine's update_weights (runner.copy_weights). Integer and bool tensors must match
    exactly now, in one line naming the tensor and both dtypes; floats are still cast."""
    from lmforge.infer.runner import copy_weights

    lin = nn.Linear(4, 2)
    saved = Int8Linear(4, 2, codes_dtype=torch.uint8)
    saved.codes.copy_(torch.tensor([[200, 1, 2, 3], [4, 5, 6, 7]]))
    saved.scales.fill_(0.5)
    path = ckpt.save_checkpoint(tmp_path, 0, saved)
    model = Int8Linear.of(lin)
    before = model.codes.clone()
    with pytest.raises(CheckpointError) as e:
        ckpt.load_weights(model, path)
    assert "tensor codes is torch.uint8 in the file but torch.int8 in the model" in str(e.value)
    assert "\n" not in str(e.value) and torch.equal(model.codes, before)
    with pytest.raises(LmforgeError, match=r"\(codes is torch.uint8, the model's torch.int8: only floating-point"):
        copy_weights(model, saved.state_dict())
    assert torch.equal(model.codes, before)
    half = {"codes": before.clone(), "scales": torch.full((2, 1), 0.25, dtype=torch.bfloat16)}
    copy_weights(model, half)  # floats cast: bf16 scales into fp32
    assert model.scales.dtype == torch.float32 and torch.equal(model.scales, torch.full((2, 1), 0.25))


def test_a_bf16_quantized_checkpoint_reopens_in_bf16(tmp_path, registered):
    """A quantized model saved in bf16 came back in fp32 (embedding, norms, head, scales, so the KV cache too),
    and base_shell called empty() with no dtype. config.json records the compute dtype now; load_model builds in
    it (dtype= overrides), gives empty() dtype= and device=, and a checkpoint without the record loads in fp32."""
    model = tiny_model(0).eval()
    for b in model.blocks:
        b.attn.wq, b.mlp.down = Int8Linear.of(b.attn.wq), Int8Linear.of(b.mlp.down)
    model = model.to(torch.bfloat16)
    path = ckpt.save_checkpoint(tmp_path / "run", 0, model)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    Int8Linear.seen = []
    loaded, _ = ckpt.load_model(path, tokenizer=False)
    assert Int8Linear.seen == [(torch.bfloat16, torch.device("cpu"))] * 2
    assert {n: t.dtype for n, t in loaded.state_dict().items()} == {n: t.dtype for n, t in model.state_dict().items()}
    assert loaded.cache_spec().dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(model))
    wide, _ = ckpt.load_model(path, tokenizer=False, dtype=torch.float32)
    assert wide.tok_emb.weight.dtype == wide.blocks[0].attn.wq.scales.dtype == torch.float32
    assert wide.blocks[0].attn.wq.codes.dtype == torch.int8
    meta = json.loads((path / "config.json").read_text())
    del meta["dtype"]  # as written before it was recorded
    (path / "config.json").write_text(json.dumps(meta))
    ckpt._seal(path)
    old, _ = ckpt.load_model(path, tokenizer=False)
    assert old.tok_emb.weight.dtype == old.blocks[0].attn.wq.scales.dtype == torch.float32


def test_a_hf_export_of_a_quantized_model_names_the_layer_and_dequantizing(tmp_path, registered):
    """save_pretrained of a quantized model said "choose a family whose layout holds it", which no family does:
    the message names the quantized layer and its kind, and says to dequantize first or save an lmforge
    checkpoint."""
    model = tiny_model(0)
    model.blocks[0].attn.wq = Int8Linear.of(model.blocks[0].attn.wq)
    with pytest.raises(ConfigError) as e:
        model.save_pretrained(tmp_path / "hf")
    msg = str(e.value)
    assert "; blocks.0.attn.wq is a quantized layer (test-linear, 1 such) and a HF layout holds float weights: " \
           "dequantize the model first" in msg
    assert "family=" not in msg and "\n" not in msg


def test_a_kernel_swap_holding_the_same_weights_is_no_base_layer(tmp_path):
    """fused_kernels swaps RMSNorm / MLP / MoE for lmforge.kernels' forward-only subclasses in place (same tensors,
    same names: lmforge.kernels.training.apply_fused_kernels): the checkpoint records nothing for them and loads
    as built (recorded as unrebuildable base layers, a model trained with fused_kernels=True could not be loaded)."""
    pytest.importorskip("triton")
    from lmforge.kernels.training import apply_fused_kernels

    model = tiny_model(0)
    if not apply_fused_kernels(model, ("norm", "swiglu")):
        pytest.skip("the fused kernels do not run here (no GPU, no TRITON_INTERPRET)")
    assert base_layer_record(model) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = ckpt.save_checkpoint(tmp_path / "c", 0, model)
    loaded, _ = ckpt.load_model(path, tokenizer=False)
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(t, want[k]) for k, t in loaded.state_dict().items())

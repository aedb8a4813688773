"""Seams a quantized model goes through: the dtype a model computes in is its floating-point tensors', never a
quantized layer's integer codes (an int8 embedding registered first made the KV cache int8 and the engine refuse
the model)."""

from __future__ import annotations

import torch
from torch import nn

import lmforge as lf
from lmforge.infer.config import EngineConfig
from lmforge.utils import compute_dtype

from .infer_helpers import full_greedy, tiny_model


class Int8Embedding(nn.Module):
    """Per-row absmax int8 codes, dequantized on lookup (its codes are the model's first parameter)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        w = emb.weight.detach()
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
        self.codes = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale.to(w.dtype))

    def forward(self, ids):
        return self.codes[ids].to(self.scale.dtype) * self.scale[ids]


def _quantized(dtype=torch.float32):
    model = tiny_model("llama").to(dtype)
    model.tok_emb = Int8Embedding(model.tok_emb)
    return model


def test_compute_dtype_skips_integer_codes():
    model = _quantized(torch.bfloat16)
    assert next(model.parameters()).dtype == torch.int8
    assert compute_dtype(model) == torch.bfloat16 and model.cache_spec().dtype == torch.bfloat16
    assert compute_dtype(nn.Module()) == torch.get_default_dtype()


def test_engine_serves_a_model_with_an_int8_embedding(tok):
    model = _quantized()
    prompt = [5, 9, 13, 200, 7]
    llm = lf.LLM(model, tok, config=EngineConfig(num_kv_tokens=256))
    assert llm.engine.dtype == torch.float32
    out = llm.generate([prompt], lf.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert list(out.token_ids) == full_greedy(model, prompt, 8)
    llm.engine.update_weights()  # the dtype check reads the same floating-point dtype


def test_llm_load_opens_a_checkpoint_in_its_saved_dtype_or_the_one_asked(tmp_path, tok):
    from lmforge import checkpoint as ckpt

    path = ckpt.save_checkpoint(tmp_path / "c", 0, tiny_model("llama").to(torch.bfloat16))
    assert lf.LLM.load(path, tokenizer=tok).engine.dtype == torch.bfloat16
    llm = lf.LLM.load(path, tokenizer=tok, dtype=torch.float32)
    assert llm.engine.dtype == torch.float32 and compute_dtype(llm.engine.model) == torch.float32

"""Tiny models of several architectures for the generation tests (fp32, CPU, fixed seeds)."""

from __future__ import annotations

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

ARCHS = {
    # GPT-2 style: learned positions, LayerNorm, GELU, biases, tied embeddings, MHA
    "gpt2": dict(pos_emb="learned", norm="layernorm", activation="gelu_tanh", bias=True, tie_embeddings=True,
                 n_heads=4),
    # Llama style: RoPE (half layout), RMSNorm, SwiGLU, GQA
    "llama": dict(pos_emb="rope", norm="rmsnorm", activation="swiglu", n_heads=4, n_kv_heads=2),
    # interleaved RoPE, MQA, QK-norm, soft-caps (math attention path), post-norm
    "mqa-softcap": dict(pos_emb="rope", rope_layout="interleaved", n_heads=4, n_kv_heads=1, qk_norm=True,
                        attn_softcap=30.0, logit_softcap=20.0, norm_position="post"),
}


def tiny_model(arch: str = "llama", vocab_size: int = 257, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=vocab_size, d_model=32, n_layers=2, max_seq_len=128,
                                init_std=0.1), **ARCHS[arch], **overrides})
    return Transformer(cfg).eval()


def full_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The reference every decode path is tested against: greedy tokens by running the whole sequence
    through the model at every step, one request at a time, no cache."""
    ids, dev = list(prompt), next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids], device=dev))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def run_requests(engine, requests) -> list:
    """Add (prompt, SamplingParams) requests to an engine and step it until none is left; their finished
    RequestOutputs, in the order given."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[i] for i in ids]


def greedy_with_attention(model, prompt: list[int], n: int, attention) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs by the model's full forward at every step, each attention layer
    going through `attention` (a cache-free object with attend / attend_latent: a reference for a cache
    kind that changes what attention sees, e.g. rounded or quantized keys, masked slots)."""
    ids, lps, dev = list(prompt), [], next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n):
            logp = model(torch.tensor([ids], device=dev), cache=attention)[0, -1].float().log_softmax(-1)
            ids.append(int(logp.argmax()))
            lps.append(float(logp[ids[-1]]))
    return ids[len(prompt):], lps


def counting(container: type) -> type:
    """A subclass of `container` (dict, set) counting `key in it` lookups in `.lookups`: how many times a code path
    looks request ids up (a rescan per step shows as lookups growing with the steps)."""

    class Counting(container):
        lookups = 0

        def __contains__(self, key) -> bool:
            self.lookups += 1
            return super().__contains__(key)

    return Counting


class NoCacheSpec(torch.nn.Module):
    """`model` behind a plain forward(ids) without cache_spec(): the engine's recompute path (a cache-less model)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.max_seq_len, self.vocab_size = model, model.cfg.max_seq_len, model.cfg.vocab_size

    def forward(self, ids):
        return self.inner(ids)

"""A batch-1 decode step made of lmforge.kernels.decode kernels, for Llama-style models.

The same function as `model(tokens, positions, cache=StaticKVCache)` for one token of one sequence, in
five kernels per block - norm+qkv+rope+cache write, attention, o-projection+residual, norm+gate/up+
SwiGLU, down+residual - plus the head, instead of ~15 on the general path. All buffers are allocated once, so the step can be
captured in a CUDA graph (lmforge.infer.cuda_graph.GraphDecoder does, for its batch-1 bucket). Models the kernels do not cover are reported by `unsupported()` and decode on the
general path instead.
"""

from __future__ import annotations

import time

import torch

from lmforge.kernels import decode as kd
from lmforge.model.cache import StaticKVCache


def unsupported(model) -> str | None:
    """Why this model cannot use the kernel step (None: it can)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        return "not an lmforge Transformer"
    checks = [
        (cfg.attention == "mha" and cfg.mlp == "dense" and cfg.block == "sequential", "MLA, MoE or parallel blocks"),
        (cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and cfg.final_norm, "norms other than pre-RMSNorm"),
        (cfg.pos_emb == "rope" and cfg.rope_layout == "half", "positions other than half-split RoPE"),
        (model.rope is None or not model.rope._seq_dependent, "length-dependent RoPE scaling"),
        (cfg.activation == "swiglu", f"activation {cfg.activation!r} (SwiGLU only)"),
        (not (cfg.bias or cfg.qkv_bias or cfg.qk_norm or cfg.attn_sinks), "biases, QK-norm or attention sinks"),
        (cfg.attn_softcap == 0 and cfg.logit_softcap == 0 and cfg.sliding_window == 0, "soft-caps or sliding windows"),
        (cfg.embed_scale == 1.0, "scaled embeddings"),
        (cfg.hd & (cfg.hd - 1) == 0 and cfg.hd >= 8, f"head_dim {cfg.hd} (a power of two >= 8 is needed)"),
    ]
    return next((why for ok, why in checks if not ok), None)


class KernelStep:
    """step(cache_view_of_one_row, tokens (1, 1)) -> logits (1, V); advances cache.pos by one."""

    def __init__(self, model, cache: StaticKVCache):
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"the batch-1 kernel step does not support {why}")
        model.fuse_projections()
        cfg, p = model.cfg, next(model.parameters())
        self.model, self.cfg = model, cfg
        self.layers = [(b.norm1.weight, b.attn.wqkv.weight, b.attn.wo.weight, b.norm2.weight, b.mlp.gate_up.weight,
                        b.mlp.down.weight) for b in model.blocks]
        self.scale = model.blocks[0].attn.scale
        new = lambda *shape: torch.zeros(*shape, dtype=p.dtype, device=p.device)  # noqa: E731
        self.x = torch.zeros(cfg.d_model, dtype=torch.float32, device=p.device)  # the residual stream, fp32
        self.q, self.o = new(cfg.n_heads, cfg.hd), new(cfg.n_heads, cfg.hd)
        self.h, self.logits = new(cfg.ff), new(1, cfg.vocab_size)
        self.work = kd.attend_workspace(cfg.n_heads, cfg.hd, p.device)

    @torch.no_grad()
    def __call__(self, cache: StaticKVCache, tokens: torch.Tensor) -> torch.Tensor:
        cfg, m, x = self.cfg, self.model, self.x
        kd.embed(tokens.reshape(1), m.tok_emb.weight, x)
        pos, pad = cache.pos, cache.pad[:1]
        cos, sin = m.rope.cos_table, m.rope.sin_table
        for i, (g1, wqkv, wo, g2, wgu, wd) in enumerate(self.layers):
            k, v = cache.k[i, 0], cache.v[i, 0]  # (KV, max_len, hd)
            kd.qkv_rope(x, wqkv, g1, cfg.norm_eps, cos, sin, pos, pad, cfg.n_heads, cfg.kv_heads, k, v, out=self.q)
            kd.attend(self.q, k, v, pos, pad, self.scale, out=self.o, work=self.work)
            kd.gemv(self.o.view(-1), wo, residual=x, out=x)
            kd.gemv(x, wgu, norm=g2, eps=cfg.norm_eps, glu=True, out=self.h)
            kd.gemv(self.h, wd, residual=x, out=x)
        # the head's kernel also moves the cache's write slot on (cache.pos += 1)
        kd.gemv(x, m.lm_head.weight, norm=m.final_norm.weight, eps=cfg.norm_eps, out=self.logits.view(-1),
                bump=cache.pos)
        return self.logits

    @torch.no_grad()
    def tune(self, cache: StaticKVCache, rounds: int = 1, reps: int = 20) -> dict:
        """Choose each kernel's block configuration by timing the whole step, captured in a CUDA graph,
        one shape at a time with the others fixed (coordinate descent). The kernels tune themselves on
        first use by timing each kernel alone, which is noisy and blind to how neighbouring kernels
        overlap; this costs about a minute (JIT-compiling every candidate) and gained 3-20% over
        per-kernel tuning at batch 1 on an H100 (docs/benchmarks.md). Call it with the cache in a realistic state (after a prefill). Returns {shape key: best seconds}."""
        if not cache.k.is_cuda:
            return {}
        tok = torch.zeros(1, 1, dtype=torch.long, device=cache.k.device)
        saved = cache.pos.clone()
        kd._used = set()
        try:
            self(cache, tok)
            keys = sorted(kd._used, key=repr)
        finally:
            kd._used = None
            cache.pos.copy_(saved)

        def step_seconds() -> float:
            self(cache, tok)  # compiles the candidate outside the capture
            cache.pos.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self(cache, tok)
                cache.pos.copy_(saved)  # every replay decodes at the same position
            graph.replay()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                graph.replay()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / reps

        best = {}
        for _ in range(rounds):
            for key in keys:
                times = {}
                for cfg in kd.candidates(key):
                    kd._best_config[key] = cfg
                    times[cfg] = step_seconds()
                kd._best_config[key] = min(times, key=times.get)
                best[key] = times[kd._best_config[key]]
        return best

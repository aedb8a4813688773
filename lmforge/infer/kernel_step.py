"""A batch-1 decode step made of Triton kernels, for Llama-style models, QK-norm ones (Qwen3) included (a
model-runner backend).

The same function as one decode step of the model for one sequence, in five kernels per block
(lmforge.kernels.decode, lmforge.kernels.paged_attention) - norm + q/k/v (+ QK-norm) + RoPE + cache write, paged
attention, o-projection + residual, norm + gate/up + SwiGLU, down + residual - plus the embedding and
the head: 5·L + 2 launches instead of ~15·L. With persistent=True each block is one launch of
lmforge.kernels.decode_layer instead (grid barriers between the same five phases; L + 2 launches) - measured
slower on an H200 (docs/benchmarks.md), so off by default. All buffers are allocated once, so a step can be
captured in a CUDA graph. Public surface:

    ks = KernelStep(model, kv, configs=None, autotune=False, persistent=None)
        model     an lmforge Transformer that `unsupported(model)` accepts. Read, never modified: the
                  kernels take its own q/k/v and gate/up weights (no stacked copy, no extra memory; later
                  changes to the weights are seen), only RoPE tables are the step's own
        kv        PagedKV: per-layer (num_blocks, block_size, KV, hd) caches + a (1, max_blocks) int32
                  block table the caller fills (lmforge.infer.graphs.BatchOneKernel: the engine's cache)
        configs   KernelConfigs; None: the set cached on disk for this GPU and model shape, else the one
                  shipped with lmforge for them (lmforge/kernels/configs/), else defaults
        autotune  with configs=None and nothing cached or shipped: tune at capture() (a one-line notice on
                  stderr) and save the set to disk; the engine turns it on (EngineConfig.kernel_tune)
    logits = ks.step(token, position)   token (1,) long, position (1,) or () int, both device tensors:
                  writes the token's k/v at `position` (block block_table[0, position // block_size]),
                  attends to positions 0..position; -> (1, V) logits, one buffer reused by every call.
                  `position` and the block table must be written by ordinary stream work before the
                  step (any torch op or copy; the attention kernels read them before their PDL wait)
    ks.capture(pool=None)               record step(ks.token, ks.position) in a CUDA graph (GPU)
    logits = ks.replay(token, position) copy the inputs into ks.token / ks.position, replay the graph
                  (ks.replay() with the inputs already in ks.inputs = [token, position]: no copies)
    ks.tune(contexts=(512, 2048))       time candidates on private scratch caches; save; use them

`unsupported(model)` names what the kernels do not cover (the model then decodes on the general path).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lmforge.adapt.lora import LoRALinear
from lmforge.errors import LmforgeError
from lmforge.kernels import decode as kd
from lmforge.kernels import decode_layer as dl
from lmforge.kernels import paged_attention as pa
from lmforge.kernels.tuning import KernelConfigs, cache_path, coordinate_descent, gpu_name
from lmforge.model.surgery import module_at
from lmforge.utils import capture_cuda_graph, compute_dtype


PERSISTENT_DEFAULT = False
"""whether KernelStep runs each layer as one persistent launch by default (where the model allows it)"""

TUNE_CONTEXTS = (512, 2048)
"""the cached-key counts KernelStep.tune scores configs at by default: a set tuned at 384 keys alone decoded 9% slower
at 2,048 than the best there (attention's slices: docs/benchmarks.md)"""


def tune_contexts(contexts: int | Sequence[int], max_positions: int) -> list[int]:
    """KernelStep.tune's key counts: sorted, distinct, each at most the cache's positions."""
    values = [contexts] if isinstance(contexts, int) else list(contexts)
    if not values or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in values):
        raise LmforgeError(f"tune contexts must be positive key counts, e.g. (512, 2048); got {contexts!r}")
    return sorted({min(c, max_positions) for c in values})


def generation_module(model):
    """The module the kernel step reads: a wrapper whose generating forward is another module's says so with
    `generation_module` (an RL policy with a value head: lmforge.align.value), else the model itself."""
    return getattr(model, "generation_module", model)


def unsupported(model) -> str | None:
    """Why this model cannot use the kernel step (None: it can)."""
    model = generation_module(model)
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "blocks"):
        return "not an lmforge Transformer"
    checks = [
        (cfg.attention == "mha" and cfg.mlp == "dense" and cfg.block == "sequential", "MLA, MoE or parallel blocks"),
        (cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and cfg.final_norm, "norms other than pre-RMSNorm"),
        (cfg.pos_emb == "rope" and cfg.rope_layout == "half", "positions other than half-split RoPE"),
        (model.rope is None or not model.rope._seq_dependent, "length-dependent RoPE scaling"),
        (cfg.activation == "swiglu", f"activation {cfg.activation!r} (SwiGLU only)"),
        (not (cfg.bias or cfg.has_qkv_bias or cfg.has_o_bias), "biases"),
        (cfg.norm_offset == 0, "offset norm gains (Gemma's 1 + w)"),
        (cfg.logit_softcap == 0, "logit soft-capping"),
        (cfg.embed_scale == 1.0, "scaled embeddings"),
        (cfg.hd & (cfg.hd - 1) == 0 and cfg.hd >= 8, f"head_dim {cfg.hd} (a power of two >= 8 is needed)"),
    ]
    why = next((why for ok, why in checks if not ok), None)
    return why if why is not None else _not_bare_weight(model)


def _not_bare_weight(model) -> str | None:
    """Why the kernels cannot take a weight the model computes with: they read the embedding's and each
    projection's .weight and nothing else, as floating-point tensors of the model's dtype. A LoRA adapter's
    B A or a quantized layer's codes and scales would be silently left out (or int8 codes read as floats)."""
    dtype = compute_dtype(model)
    names = ["tok_emb", "lm_head"] + [f"blocks.{i}.{part}" for i in range(len(model.blocks))
                                      for part in ("attn.wqkv", "attn.wq", "attn.wk", "attn.wv", "attn.wo",
                                                   "mlp.gate_up", "mlp.gate", "mlp.up", "mlp.down")]
    for name in names:
        module = module_at(model, name)  # (None: a layer this model has not: wq where wqkv is fused, or wqkv)
        if module is None:
            continue
        kind = nn.Embedding if name == "tok_emb" else nn.Linear
        if type(module) is not kind:
            return f"{name} is a {_layer_name(module)}, not a plain nn.{kind.__name__} ({_layer_fix(module)})"
        w = module.weight
        if type(w) not in (torch.Tensor, nn.Parameter):
            return (f"{name}.weight, a {type(w).__name__} (a tensor subclass, e.g. quantized), not a plain tensor; "
                    "quantized models decode on the general path")
        if w.dtype != dtype:
            return (f"{name}.weight stored as {w.dtype}, not the model's {dtype} (quantized or mixed-precision "
                    "weights decode on the general path)")
    return None


def _layer_name(module) -> str:
    base = getattr(module, "base", None)  # a LoRALinear over another layer (QLoRA): name both
    return f"{type(module).__name__} over a {type(base).__name__}" if base is not None else type(module).__name__


def _layer_fix(module) -> str:
    """What to do about a layer the kernels cannot read, in a few words."""
    if isinstance(module, LoRALinear):
        if module.base is None:
            return "LoRA adapters: merge_lora(model) first"
        return "LoRA on a quantized or wrapped base cannot be merged; it decodes on the general path"
    return "quantized or wrapped layers decode on the general path; the kernels read a bare floating-point weight"


def save_or_warn(configs: KernelConfigs) -> None:
    """Save a tuned set to the disk cache; if the cache cannot be written, say so and go on (the set is in use)."""
    try:
        configs.save()
    except OSError as e:
        warnings.warn(f"tuned kernel configs not saved ({e}); they serve this process only - set "
                      f"LMFORGE_KERNEL_CACHE to a writable directory to keep them", stacklevel=3)


def model_signature(model) -> str:
    """The model shape kernel configs are keyed by (lmforge.kernels.tuning)."""
    c, dtype = model.cfg, compute_dtype(model)
    return (f"llama-d{c.d_model}-l{c.n_layers}-h{c.n_heads}-kv{c.kv_heads}-hd{c.hd}-ff{c.ff}-v{c.vocab_size}-"
            f"{str(dtype).removeprefix('torch.')}")


def _qkv_weights(attn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's own q, k, v weights (views of the stacked one in a fused model)."""
    if attn.wqkv is not None:
        return tuple(attn.wqkv.weight.split(attn.qkv_sizes))
    return attn.wq.weight, attn.wk.weight, attn.wv.weight


def _gate_up_weights(mlp) -> tuple[torch.Tensor, torch.Tensor]:
    if mlp.gate_up is not None:
        return tuple(mlp.gate_up.weight.chunk(2))
    return mlp.gate.weight, mlp.up.weight


@dataclasses.dataclass(frozen=True)
class PagedKV:
    """One sequence's view of a paged KV cache (lmforge.kernels.paged_attention's layout)."""
    k: Sequence[torch.Tensor]
    """per layer (num_blocks, block_size, n_kv_heads, head_dim), last dimension contiguous"""
    v: Sequence[torch.Tensor]
    block_table: torch.Tensor
    """(1, max_blocks) int32 on the device; the caller keeps it filled for the positions it decodes"""

    @property
    def max_positions(self) -> int:
        return self.block_table.shape[1] * self.k[0].shape[1]


class KernelStep:
    """Batch-1 decode on Triton kernels; see the module docstring for the surface."""

    def __init__(self, model, kv: PagedKV, *, configs: KernelConfigs | None = None,
                 autotune: bool = False, pdl: bool = kd.PDL_DEFAULT, prefetch: bool = True, evict: bool = True,
                 persistent: bool | None = None):
        """pdl / prefetch: programmatic dependent launch, and loads issued before the PDL wait (weights'
        first tiles, cached keys) - both on by default where the GPU supports PDL; prefetch=False is the
        previous variant, for benchmarks; evict: weights loaded with an evict-first L2 policy.
        persistent: each layer as one launch of lmforge.kernels.decode_layer (programs resident on every SM,
        grid barriers between its five phases) instead of five kernels; None = PERSISTENT_DEFAULT where the
        model allows it (not with QK-norm). The attribute may be switched later (benchmarks do)."""
        why = unsupported(model)
        if why is not None:
            raise LmforgeError(f"the batch-1 kernel step does not support {why}")
        self.kv = kv
        self.rope = copy.deepcopy(model.rope)  # tables covering every cache slot; the model's stay as they are
        self.rope.reserve(self.kv.max_positions)
        cfg, p = model.cfg, next(model.parameters())
        self.model, self.cfg, self.pdl, self.prefetch, self.evict = model, cfg, pdl, prefetch, evict
        if persistent and cfg.qk_norm:
            raise LmforgeError("the persistent layer kernel does not support QK-norm; use persistent=False")
        self.persistent = PERSISTENT_DEFAULT and not cfg.qk_norm if persistent is None else persistent
        self._key_cache: dict[bool, dict] = {}  # keys() per mode: looked up at every step
        self.layers = [(b.norm1.weight, _qkv_weights(b.attn), b.attn.wo.weight, b.norm2.weight,
                        _gate_up_weights(b.mlp), b.mlp.down.weight, b.attn) for b in model.blocks]
        self.signature, self.gpu = model_signature(model), gpu_name(p.device)
        # the disk set for this device and shape (on a CPU, Triton's interpreter: gpu 'cpu'); a cache file that
        # does not load is warned about and tuned again, not an engine that cannot start
        cached = KernelConfigs.cached(self.gpu, self.signature, strict=False) if configs is None else None
        self.configs = configs or cached or KernelConfigs(model=self.signature)
        # tune on first use when nothing was given and the disk set lacks a shape this mode runs
        self.autotune = (autotune and configs is None and p.is_cuda
                         and (cached is None or any(cached.get(k) is None for k in self.keys())))
        new = lambda *shape: torch.zeros(*shape, dtype=p.dtype, device=p.device)  # noqa: E731
        self.x = torch.zeros(cfg.d_model, dtype=torch.float32, device=p.device)  # the residual stream, fp32
        self.q, self.o = new(1, cfg.n_heads, cfg.hd), new(1, cfg.n_heads, cfg.hd)
        self.h, self.logits = new(cfg.ff), new(1, cfg.vocab_size)
        self.ctx = torch.ones(1, dtype=torch.int32, device=p.device)  # keys to attend to, written on the device
        # the captured graph's inputs, one buffer (so a caller fills both with one copy): token, position
        self.inputs = torch.zeros(2, dtype=torch.long, device=p.device)
        self.token, self.position = self.inputs[:1], self.inputs[1:]
        self.graph: torch.cuda.CUDAGraph | None = None
        self._work = {}  # attention workspaces by (slice count, one head per program)
        self._layer_work = None  # the persistent layer kernel's buffers, made on first use

    def keys(self) -> dict[tuple, tuple[tuple[int, ...], ...]]:
        """The shape keys this step's kernels look up (in the current mode), with their candidates."""
        if self.persistent not in self._key_cache:
            self._key_cache[self.persistent] = self._make_keys()
        return self._key_cache[self.persistent]

    def _make_keys(self) -> dict[tuple, tuple[tuple[int, ...], ...]]:
        c, w = self.cfg, self.layers[0]
        dt = w[1][0].dtype
        head = kd.gemv_key(c.vocab_size, c.d_model, norm=True, dtype=dt)
        if self.persistent:
            return {dl.layer_key(c.d_model, c.n_heads, c.kv_heads, c.hd, c.ff, dt): dl.LAYER_CONFIGS,
                    head: kd.candidates(head)}
        keys = [kd.qkv_rope_key(c.n_heads, c.kv_heads, c.hd, c.d_model, dt, c.qk_norm),
                kd.attend_key(c.n_heads, c.kv_heads, c.hd), kd.add_key(c.d_model, c.n_heads * c.hd, dt),
                kd.gemv_key(c.ff, c.d_model, glu=True, norm=True, dtype=dt), kd.add_key(c.d_model, c.ff, dt), head]
        return {k: kd.candidates(k) for k in dict.fromkeys(keys)}

    def _workspace(self, config: tuple[int, ...]):
        """Attention's partial results for a config (its slice count and heads per program)."""
        splits, per_head = config[0], len(config) > 3 and config[3] == 1
        if (splits, per_head) not in self._work:
            c = self.cfg
            self._work[splits, per_head] = pa.workspace(1, c.n_heads, c.kv_heads, c.hd, splits, self.x.device,
                                                        per_head)
        return self._work[splits, per_head]

    @torch.no_grad()
    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits (1, V) of `token` at `position`; see the module docstring."""
        return self._run(token, position, self.kv, self.configs)

    def _run(self, token, position, kv: PagedKV, configs: KernelConfigs):
        """One step. `position` is an input the caller wrote before the step, so attention may read the
        cached keys before its PDL wait (with prefetch)."""
        cfg, m, x, eps = self.cfg, self.model, self.x, self.cfg.norm_eps
        opts = dict(pdl=self.pdl, prefetch=self.prefetch, evict=self.evict)
        if self.persistent:
            return self._run_persistent(token, position, kv, configs, opts)
        c_qkv, c_att, c_o, c_gu, c_down, c_head = (configs.get(k) for k in self.keys())
        att = c_att or kd.ATTEND_CONFIGS[0]
        kd.embed(token.reshape(1), m.tok_emb.weight, x, pdl=self.pdl)
        for i, (g1, wqkv, wo, g2, wgu, wd, attn) in enumerate(self.layers):
            qk = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.q_norm is not None else None
            kd.qkv_rope(x, wqkv, g1, eps, self.rope.cos_table, self.rope.sin_table, position, cfg.n_heads, cfg.kv_heads,
                        kv.k[i], kv.v[i], kv.block_table, self.ctx, qk_norm=qk, out=self.q[0], config=c_qkv, **opts)
            pa.paged_decode_attention(self.q, kv.k[i], kv.v[i], kv.block_table, self.ctx, scale=attn.scale,
                                      softcap=attn.softcap, window=attn.window, sinks=attn.sinks, config=att,
                                      out=self.o, work=self._workspace(att), pdl=self.pdl,
                                      early_positions=position if self.prefetch else None)
            kd.gemv(self.o.view(-1), wo, residual=x, out=x, config=c_o, **opts)
            kd.gemv(x, wgu[0], up=wgu[1], norm=g2, eps=eps, glu=True, out=self.h, config=c_gu, **opts)
            kd.gemv(self.h, wd, residual=x, out=x, config=c_down, **opts)
        kd.gemv(x, m.lm_head.weight, norm=m.final_norm.weight, eps=eps, out=self.logits.view(-1), config=c_head,
                **opts)
        return self.logits

    def _run_persistent(self, token, position, kv: PagedKV, configs: KernelConfigs, opts: dict):
        """One step as 1 + L + 1 launches: the embedding (which also zeroes the layers' barrier counters),
        one persistent kernel per layer, the head."""
        cfg, m, x, eps = self.cfg, self.model, self.x, self.cfg.norm_eps
        c_layer, c_head = (configs.get(k) for k in self.keys())
        if self._layer_work is None:
            self._layer_work = dl.workspace(cfg.n_layers, cfg.n_heads, cfg.hd, cfg.ff, self.h.dtype, x.device)
        work = self._layer_work
        kd.embed(token.reshape(1), m.tok_emb.weight, x, zero=work.sync, pdl=self.pdl)
        for i, (g1, wqkv, wo, g2, wgu, wd, attn) in enumerate(self.layers):
            dl.decode_layer(x, g1, wqkv, self.rope.cos_table, self.rope.sin_table, position.reshape(1), kv.k[i],
                            kv.v[i], kv.block_table, wo, g2, wgu, wd, work, i, eps=eps, scale=attn.scale,
                            softcap=attn.softcap, window=attn.window, sinks=attn.sinks, config=c_layer,
                            pdl=self.pdl, evict=self.evict)
        kd.gemv(x, m.lm_head.weight, norm=m.final_norm.weight, eps=eps, out=self.logits.view(-1), config=c_head,
                **opts)
        return self.logits

    @torch.no_grad()
    def capture(self, pool=None) -> None:
        """Record step(self.token, self.position) in a CUDA graph, after tuning (autotune, first use) and a
        warm-up on scratch caches (compiles the kernels without touching the caller's cache)."""
        if self.autotune:
            print(f"lmforge: tuning the batch-1 decode kernels for {self.gpu} and {self.signature} (once: seconds "
                  f"to a few minutes; saved to {cache_path(self.gpu, self.signature)}; "
                  "EngineConfig(kernel_tune=False) skips it)", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            self.tune(progress=True)
            print(f"lmforge: kernels tuned in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        scratch = self._scratch(min(512, self.kv.max_positions))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(self.token, torch.zeros_like(self.position), scratch, self.configs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph, _ = capture_cuda_graph(lambda: self.step(self.token, self.position), pool)

    def replay(self, token: torch.Tensor | None = None, position: torch.Tensor | None = None) -> torch.Tensor:
        """Copy token and position into the graph's inputs (None: the caller wrote ks.inputs itself) and
        replay it -> the logits buffer."""
        if token is not None:
            self.token.copy_(token.reshape(1))
        if position is not None:
            self.position.copy_(position.reshape(1))
        self.graph.replay()
        return self.logits

    def _scratch(self, context: int) -> PagedKV:
        """Private caches with the caller's block size and strides (the same compiled kernels), holding
        `context` positions, for warm-up and tuning runs."""
        k0, bs, width = self.kv.k[0], self.kv.k[0].shape[1], self.kv.block_table.shape[1]
        n = min(-(-context // bs), width)
        shape = (n,) + tuple(k0.shape[1:])
        new = lambda: torch.empty_strided(shape, (max(k0.stride(0), 1),) + k0.stride()[1:], dtype=k0.dtype,  # noqa: E731
                                          device=k0.device).normal_()
        table = torch.zeros(1, width, dtype=self.kv.block_table.dtype, device=k0.device)
        table[0, :n] = torch.arange(n)
        return PagedKV(k=[new() for _ in self.layers], v=[new() for _ in self.layers], block_table=table)

    @torch.no_grad()
    def tune(self, contexts: int | Sequence[int] = TUNE_CONTEXTS, rounds: int = 1, reps: int = 20, save: bool = True,
             max_candidates: int | None = None, progress: bool = False) -> dict[str, float]:
        """Choose every kernel's block configuration by timing the whole step captured in a CUDA graph
        (coordinate descent, lmforge.kernels.tuning) at each of `contexts` keys, on scratch caches, scoring a
        set by the geometric mean of its step times (each context counts alike: attention's best split of the
        keys changes with their number); adopt the set and save it to the disk cache (a cache that cannot be
        written is warned about: the set then serves this process only). Each candidate is JIT-compiled once,
        then timed in a CUDA graph at each context (~60 candidates for a Llama model; capture() prints the
        time a first-use tune took; progress: a bar over the candidates on stderr). Returns {shape key: best
        score in seconds}."""
        contexts = tune_contexts(contexts, self.kv.max_positions)
        if not self.x.is_cuda:
            return {}
        kv = self._scratch(contexts[-1])
        tok = torch.zeros(1, dtype=torch.long, device=self.x.device)
        # the last scratch slot of each context
        positions = [torch.full((1,), c - 1, dtype=torch.long, device=self.x.device) for c in contexts]

        def one(configs: KernelConfigs, pos: torch.Tensor) -> float:
            graph, _ = capture_cuda_graph(lambda: self._run(tok, pos, kv, configs))
            graph.replay()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                graph.replay()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / reps

        space = {k: c[:max_candidates] for k, c in self.keys().items()}
        bar = tqdm(total=rounds * sum(len(c) for c in space.values()), desc="tuning kernels", unit="config",
                   disable=not progress, file=sys.stderr, leave=False)

        def seconds(configs: KernelConfigs) -> float:
            bar.update()
            try:
                self._run(tok, positions[0], kv, configs)  # compiles the candidate outside the capture
            except Exception as e:  # noqa: BLE001  (e.g. a block shape this Triton cannot compile)
                warnings.warn(f"kernel config candidate skipped: {type(e).__name__}: {str(e)[:200]}", stacklevel=2)
                return float("inf")
            return math.exp(sum(math.log(one(configs, pos)) for pos in positions) / len(positions))

        with bar:
            self.configs, best = coordinate_descent(dataclasses.replace(self.configs, gpu=self.gpu), space, seconds,
                                                    rounds)
        self.autotune = False
        if save:
            save_or_warn(self.configs)
        return best


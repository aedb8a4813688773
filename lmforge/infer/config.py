"""The engine's configuration and the choices made from it when an engine is built: which runner
backends run on this device (CUDA graphs, the batch-1 kernel step, the fused-kernel view), how many KV
blocks the pool holds, and the model's context window and vocabulary."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmforge.config import check, coerce_fields
from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.kv.paged import DECODE, PREFILL, CacheStore
from lmforge.infer.kv.policy import KVPolicy
from lmforge.infer.scheduler import SchedulerConfig

GRAPH_PREFILL_TOKENS = 512
"""EngineConfig.graph_prefill_tokens=None on a GPU: steps holding prefill chunks up to this many tokens replay CUDA
graphs (bench/graph_prefill.py on an H200, 2026-12-05: time to first token 33-37 -> 3.6-5.4 ms alone, a served
workload of staggered arrivals 3.1x faster; docs/benchmarks.md)"""
MAX_GRAPH_TOKENS = 16384
"""the largest graph_prefill_tokens: a graph's activations are held by the graphs' memory pool"""
KERNEL_TUNE_MIN_PARAMS = 100_000_000
"""EngineConfig.kernel_tune=None tunes the batch-1 kernel step for models of at least this many parameters"""


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    block_size: int = 16
    """tokens per KV cache block"""
    max_num_seqs: int = 256
    """sequences decoded together at most (models with recurrent-state layers: also their state rows,
    lmforge.infer.kv.state); a request's n samples (or beams) fork past it (strict_admission refuses them)"""
    max_num_batched_tokens: int = 4096
    """tokens per forward at most (prefill chunks + decode tokens)"""
    chunked_prefill: bool = True
    prefix_caching: bool | None = None
    """reuse the cached blocks of a known prompt prefix; on models with recurrent-state layers only with
    state_snapshots > 0 (a block holds keys, not the state after it: lmforge.infer.kv.state; True without them is
    an error). None = on, except for a RoPE scaling that depends on the context length (dynamic NTK, LongRoPE),
    whose cached keys depend on the length of the sequence that computed them: off there, and True is an error;
    a model without cache_spec() (HFCausalLM: the recompute path) has no blocks to reuse, and True is an error"""
    max_model_len: int | None = None
    """the longest sequence served (prompt + generated tokens); None = the model's max_seq_len (a HF checkpoint's
    max_position_embeddings). Larger serves a RoPE-scaled checkpoint (YaRN, linear, dynamic NTK...) past it;
    refused for models with learned or sinusoidal position embeddings (docs/inference.md, long context)"""
    state_snapshots: int = 0
    """models with recurrent-state layers: copies of the state kept for prefix caching, each the size of
    one sequence's state (lmforge.infer.kv.state: taken at branch points and prompts' last block boundary,
    least recently used dropped first); 0 = no prefix caching on such models. Ignored, with a warning, with
    prefix_caching=False or on a model without such layers"""
    kv_cache_dtype: str | None = None
    """the K/V (or MLA latent) cache's dtype: None = the model's; 'fp32', 'bf16', 'fp16' or 'fp8' (e4m3):
    a narrower cache holds more tokens in the same memory (pool_blocks counts its bytes). Keys and values,
    the step's new ones included, are attended as the cache keeps them (rounded), read in the model's dtype by
    the reference paths and the Triton paged kernels alike (the batch-1 kernel step reads the model's dtype only:
    off)"""
    kv_cache: CacheStore | None = None
    """how the paged cache keeps keys and values (lmforge.infer.kv.paged.CacheStore: quantized or compressed
    K/V); None = PagedKVCache / PagedLatentCache at kv_cache_dtype"""
    gpu_memory_utilization: float = 0.9
    """on a GPU, the KV pool takes this fraction of the device memory minus what is in use and a
    reserve for activations, at most max_num_seqs x context tokens"""
    num_kv_tokens: int | None = None
    """fixed KV budget in tokens (rounded down to blocks); default on CPU: min(max_num_seqs x context,
    1 GiB of cache). The state rows of recurrent layers are checked against the memory whatever it says
    (sequence_bytes)"""
    decode_attention: str = "auto"
    """paged decode attention: 'auto' (the Triton kernel on a GPU when importable, else the reference),
    'kernel' (always; on a CPU through Triton's interpreter) or 'reference' (gather, then attend)"""
    prefill_attention: str = "auto"
    """prefill chunks of a step: 'auto' (one varlen FlashAttention call on a GPU when Triton is there, else
    the reference), 'kernel' (always; Triton's interpreter on a CPU) or 'reference' (one sequence at a
    time, over its gathered blocks)"""
    cuda_graphs: bool | None = None
    """decode-only steps replay CUDA graphs per batch bucket (lmforge.infer.graphs); None = on a GPU.
    True on a CPU runs the same static-buffer step eagerly (what tests check)"""
    graph_prefill_tokens: int | None = None
    """steps holding prefill chunks (a new prompt beside the running decodes), up to this many tokens, replay CUDA
    graphs too, one per token bucket (lmforge.infer.graphs: attention through the varlen kernel from device
    metadata), so admitting a prompt costs one graph launch instead of an eager forward; 0 = off; None =
    GRAPH_PREFILL_TOKENS on a GPU. With cuda_graphs=True on a CPU the same static-buffer step runs eagerly"""
    kernel_step: bool | None = None
    """one-sequence decode steps on the Triton kernel step (lmforge.infer.kernel_step); None = on an
    Ampere-or-newer GPU for the models it supports (off on a CPU); True = always (an error if it cannot run: an
    older GPU, or a CPU unless TRITON_INTERPRET=1 runs the kernels in Triton's interpreter, as the tests do)"""
    kernel_tune: bool | None = None
    """tune the kernel step's block shapes on first use when neither the cache ($LMFORGE_KERNEL_CACHE,
    default ~/.cache/lmforge/kernels/) nor the sets shipped with lmforge hold this GPU and model shape: once,
    with a notice and the time it took (~60 candidates, each compiled and timed in a CUDA graph); the set is
    saved to the cache (lmforge.kernels.tuning). None = for models of at least KERNEL_TUNE_MIN_PARAMS
    parameters (below that a step is launch-bound and the defaults do); False = never (untuned defaults
    where nothing is saved)"""
    fused_kernels: bool | None = None
    """forwards run with Triton RMSNorm / RoPE / SwiGLU kernels on a view of the model that shares
    its weights (lmforge.kernels.training.kernel_view; the model is not changed); None = on a GPU where they
    run; True = always (on a CPU through Triton's interpreter; an error where they cannot run)"""
    async_scheduling: bool | None = None
    """launch the next step before reading this one's tokens, so the host's work per step (scheduling,
    inputs, appending tokens, stop checks) runs while the device computes (lmforge.infer.pending); None =
    on a GPU. True on a CPU runs the same order of work (what tests check). Steps whose token values are
    needed before the next one still read them at once: beam search, speculative decoding (any draft),
    penalties, prompt log-probs, a request's first sample when n > 1, and the recompute runner"""
    kv_policy: KVPolicy | None = None
    """which keys each sequence keeps in the cache (lmforge.infer.kv.policy: StreamingLLM, SnapKV, your own);
    None = all of them"""
    max_logprobs: int | None = 20
    """the most top log-probs a request may ask for, per generated token (SamplingParams.logprobs) and per prompt
    token (prompt_logprobs); more is refused at add_request. Each listed id costs every step a top-k over the
    vocabulary and a dict entry per token, paid by the whole batch (logprobs=50000 made a step of 9 other requests
    10x slower, 2026-12). 20 is vLLM's default and the OpenAI API's bound; None = no limit (offline scoring or
    distillation that wants more)"""
    strict_admission: bool = False
    """a server's admission, as vLLM's and OpenAI's servers answer 400: add_request refuses, in one line, a request
    whose prompt + max_tokens passes the context window, whose n (or beam_width) exceeds max_num_seqs, or whose
    samples' blocks the pool cannot hold at once. False (offline use) accepts them: the first with a warning, its
    samples stopping at the window (finish_reason 'length'); the others run their samples past max_num_seqs (they
    join the running batch at the fork) and in turns through preemption (slower, but they finish).
    SamplingParams(max_tokens=None) asks for up to the window either way"""

    def __post_init__(self) -> None:
        coerce_fields(self)  # each field's type, named when wrong (kernel_tune=1, block_size=16.5)
        check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        check(0 < self.gpu_memory_utilization <= 1,
              f"gpu_memory_utilization must lie in (0, 1], got {self.gpu_memory_utilization}")
        check(self.state_snapshots >= 0, f"state_snapshots must be >= 0, got {self.state_snapshots}")
        check(self.kv_cache is None or isinstance(self.kv_cache, CacheStore),
              f"kv_cache must be a lmforge.infer.kv.paged.CacheStore (or None), got {self.kv_cache!r:.80}")
        check(self.kv_cache_dtype is None or self.kv_cache_dtype in KV_DTYPES,
              f"kv_cache_dtype must be None (the model's) or one of {sorted(KV_DTYPES)}, got {self.kv_cache_dtype!r}")
        check(self.max_model_len is None or self.max_model_len > 0,
              f"max_model_len must be > 0 (or None: the model's max_seq_len), got {self.max_model_len}")
        check(self.num_kv_tokens is None or self.num_kv_tokens >= self.block_size,
              f"num_kv_tokens must be >= block_size ({self.block_size}), got {self.num_kv_tokens}")
        SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens)
        check(self.decode_attention in DECODE,
              f"decode_attention must be one of {DECODE}, got {self.decode_attention!r}")
        check(self.prefill_attention in PREFILL,
              f"prefill_attention must be one of {PREFILL}, got {self.prefill_attention!r}")
        check(self.graph_prefill_tokens is None or 0 <= self.graph_prefill_tokens <= MAX_GRAPH_TOKENS,
              f"graph_prefill_tokens must be None or in [0, {MAX_GRAPH_TOKENS}], got {self.graph_prefill_tokens}")
        check(not (self.graph_prefill_tokens and self.cuda_graphs is False),
              f"graph_prefill_tokens={self.graph_prefill_tokens} replays steps holding prefill chunks from CUDA "
              "graphs, but cuda_graphs=False; drop one of them (cuda_graphs=None turns graphs on where a GPU runs "
              "them)")
        check(self.max_logprobs is None or self.max_logprobs >= 0,
              f"max_logprobs must be None (no limit) or >= 0, got {self.max_logprobs}")
        check(self.kv_policy is None or isinstance(self.kv_policy, KVPolicy),
              f"kv_policy must be a KVPolicy (lmforge.infer.kv.policy.StreamingLLM, SnapKV, ...), got "
              f"{self.kv_policy!r}")


def graph_prefill_tokens(config: EngineConfig, device: torch.device) -> int:
    """The most tokens of a step holding prefill chunks that replays a graph (EngineConfig.graph_prefill_tokens)."""
    want = config.graph_prefill_tokens
    return want if want is not None else GRAPH_PREFILL_TOKENS if device.type == "cuda" else 0


def use_kernel_step(config: EngineConfig, model, device: torch.device) -> bool:
    """Whether one-sequence decode steps may run on the Triton kernel step (EngineConfig.kernel_step): the
    config and the device allow it. Whether the model does is the runner's check, made again whenever it
    rebuilds its backends (lmforge.infer.kernel_step.unsupported: e.g. LoRA adapters applied or merged since)."""
    want = config.kernel_step
    if want is False:
        return False
    gpu = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    if not (want or gpu):  # decided before importing Triton (~0.5 s that a CPU process never uses)
        return False
    from lmforge.infer.graphs import kernel_step_available

    why = kernel_step_available(device)
    if want and why is None:
        from lmforge.infer.kernel_step import unsupported

        why = unsupported(model)
    if want and why is not None:
        raise ConfigError(f"kernel_step=True, but the batch-1 kernel step cannot run: {why}")
    return why is None


def use_kernel_tune(config: EngineConfig, model) -> bool:
    """Whether the kernel step may tune its block shapes on first use (EngineConfig.kernel_tune)."""
    if config.kernel_tune is not None:
        return config.kernel_tune
    return sum(p.numel() for p in model.parameters()) >= KERNEL_TUNE_MIN_PARAMS


def use_fused_kernels(config: EngineConfig, device: torch.device) -> bool:
    """Whether forwards run on the fused-kernel view of the model (EngineConfig.fused_kernels)."""
    want = config.fused_kernels
    if want is not None:
        return want
    if device.type != "cuda":  # (before importing Triton, as use_kernel_step)
        return False
    from lmforge.kernels.training import unsupported

    return unsupported(device) is None


KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def store_allows(c: EngineConfig, spec, draft) -> dict[str, bool]:
    """With a CacheStore (EngineConfig.kv_cache): which default-on features it leaves on ('kernel_step',
    'cuda_graphs': only for a store with graph_safe = True, 'prefix_caching'); a feature asked for explicitly
    (kernel_step or cuda_graphs True, a KV policy, a draft) that it cannot serve, or a model with recurrent-state
    layers, is a one-line error."""
    store = c.kv_cache
    if store is None:
        return {"kernel_step": True, "cuda_graphs": True, "prefix_caching": True}
    if spec is None or spec.has_state:
        raise ConfigError(f"kv_cache={type(store).__name__} needs a model with cache_spec() and no recurrent-state "
                          "layers (those keep the default cache)")
    asked = {"kernel_step": c.kernel_step is True, "cuda_graphs": c.cuda_graphs is True,
             "kv_policy": c.kv_policy is not None, "draft": draft is not None, "prefix_caching": False}
    allows = {}
    for feature, explicit in asked.items():
        why = store.unsupported(feature)
        if feature == "cuda_graphs" and why is None and not store.graph_safe:
            why = ("it does not declare graph_safe = True (a graph step's host metadata are placeholders: no "
                   "sequence ids, unit lengths; CacheStore's docstring)")
        if why is not None and explicit:
            raise ConfigError(f"kv_cache={type(store).__name__} cannot serve {feature}: {why}")
        allows[feature] = why is None
    return allows


def kv_dtype(c: EngineConfig, spec) -> torch.dtype:
    """The dtype the K/V cache keeps (EngineConfig.kv_cache_dtype, else the model's)."""
    return KV_DTYPES[c.kv_cache_dtype] if c.kv_cache_dtype is not None else spec.dtype


STATE_ONLY_TOKENS = 2**23
"""a model of state layers only: its bookkeeping blocks cover at most this many tokens (at least one sequence of the
full context), about 30 MB of host lists at block_size 16 (256 sequences of a 256K context would be 4.2M blocks,
226 MB; 2026-12-06, CPU); past it the scheduler preempts as on a full pool"""


def cache_budget(c: EngineConfig, device: torch.device) -> int:
    """Bytes the caches (state rows and KV pool) may take: on a GPU, gpu_memory_utilization of its memory less what
    is in use and a reserve for one forward's activations; on a CPU, 1 GiB."""
    if device.type != "cuda":
        return 2**30
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cache
    reserve = 2 * 2**30 + c.max_num_batched_tokens * 64 * 1024  # activations of one forward
    return int(free - total * (1 - c.gpu_memory_utilization) - reserve)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def sequence_bytes(c: EngineConfig, spec, device: torch.device) -> int:
    """Bytes set aside before the KV pool: the state rows of recurrent layers (max_num_seqs + 1, and
    state_snapshots when prefix caching is on, of spec.bytes_per_sequence(): lmforge.infer.kv.state) and a
    CacheStore's per-sequence state (max_num_seqs of its bytes_per_sequence). Over cache_budget - whatever
    num_kv_tokens says, which sizes only the KV pool - they are a one-line error naming them."""
    snaps = c.state_snapshots if c.prefix_caching is not False else 0  # (the engine keeps none without it)
    rows = c.max_num_seqs + 1 + snaps
    parts = {}
    if spec.has_state:
        why = f"max_num_seqs {c.max_num_seqs} + 1" + (f" + state_snapshots {snaps}" if snaps else "")
        parts[f"{rows} recurrent-state rows ({why}) of {_size(spec.bytes_per_sequence())}"] = (
            rows * spec.bytes_per_sequence())
    if c.kv_cache is not None:
        store = c.kv_cache.bytes_per_sequence(spec, kv_dtype(c, spec))
        parts[f"{c.max_num_seqs} x {_size(store)} of {type(c.kv_cache).__name__} state"] = c.max_num_seqs * store
    need = sum(parts.values())
    if need and need > (budget := cache_budget(c, device)):
        gpu = device.type == "cuda"
        where = ("gpu_memory_utilization of the GPU, less what is in use and an activation reserve" if gpu
                 else "a CPU's cache budget")
        fix = "max_num_seqs" + (" or state_snapshots" if snaps and spec.has_state else "")
        fix += " or raise gpu_memory_utilization" if gpu else ""
        raise LmforgeError(f"the per-sequence state does not fit: {' + '.join(parts)} = {_size(need)}, over "
                           f"{_size(budget)} ({where}); lower {fix}")
    return need


def pool_blocks(c: EngineConfig, spec, device: torch.device, max_seq_len: int, extra_per_token: int = 0) -> int:
    """Blocks in the pool; extra_per_token: a draft model's cache, which shares the block ids. What every
    sequence keeps (sequence_bytes) comes off the budget first. A model of state layers only stores nothing per
    token: its blocks are bookkeeping, as many as max_num_seqs full-length sequences hold (at most
    STATE_ONLY_TOKENS) whatever num_kv_tokens says (a KV budget would only refuse requests and preempt)."""
    state = sequence_bytes(c, spec, device)
    if spec.bytes_per_token() + extra_per_token == 0:
        per_seq = -(-max_seq_len // c.block_size)
        return min(c.max_num_seqs * per_seq, max(per_seq, STATE_ONLY_TOKENS // c.block_size))
    per_token = (spec.bytes_per_token(kv_dtype(c, spec)) if c.kv_cache is None
                 else c.kv_cache.bytes_per_token(spec, kv_dtype(c, spec))) + extra_per_token
    if c.num_kv_tokens is not None:
        tokens = c.num_kv_tokens
    else:
        tokens = min(c.max_num_seqs * max_seq_len, (cache_budget(c, device) - state) // per_token)
    if tokens < c.block_size:
        raise LmforgeError(f"no memory left for the KV cache ({tokens} tokens); raise "
                           "gpu_memory_utilization or set num_kv_tokens")
    return tokens // c.block_size


def scores_text(model) -> bool:
    """Whether a loaded model is a head that scores text (a reward model, classifier or critic: SequenceHead,
    ValueModel) rather than a language model with next-token logits (a policy with a value head has those: it
    has a cache_spec)."""
    return hasattr(model, "head_record") and not hasattr(model, "cache_spec")


def length_dependent_rope(model) -> bool:
    """Whether the model's RoPE frequencies follow each sequence's length (dynamic NTK, LongRoPE): the paged runner
    then gives every token its length (AttnMetadata.rope_lengths), and rope_allows turns prefix caching off."""
    rope = getattr(getattr(model, "generation_module", model), "rope", None)
    return bool(getattr(rope, "length_dependent", False))


def rope_allows(c: EngineConfig, model, allows: dict[str, bool], has_state: bool = False) -> dict[str, bool]:
    """store_allows' answer, less what a length-dependent RoPE cannot serve: prefix caching (a cached block's keys
    hold frequencies chosen by the length of the sequence that computed them; prefix_caching=True, or
    state_snapshots > 0 on a model with recurrent-state layers, whose rows would be set aside unused, is a one-line
    error). CUDA graphs serve it: their steps carry each token's length (lmforge.infer.graphs' RoPE row)."""
    if not length_dependent_rope(model):
        return allows
    kind = getattr(getattr(model, "cfg", None), "rope_scaling", None)
    kind = kind.kind if kind is not None else "length-dependent"
    if c.prefix_caching:
        raise ConfigError(f"prefix_caching=True cannot serve RoPE scaling {kind!r}: a prefix's keys depend on the "
                          "length of the sequence that computed them; leave prefix_caching unset (off here)")
    if c.state_snapshots and has_state and c.prefix_caching is not False:
        raise ConfigError(f"state_snapshots={c.state_snapshots} keeps recurrent states for prefix caching, which RoPE "
                          f"scaling {kind!r} cannot serve (a prefix's keys depend on the length of the sequence that "
                          "computed them); leave state_snapshots at 0")
    return {**allows, "prefix_caching": False}


def serving_spec(model, spec, max_model_len: int | None, what: str = "max_model_len",
                 fix: str = "lower max_model_len"):
    """The cache spec with the served window (EngineConfig.max_model_len; a draft model's: the target's window) as
    its max_seq_len; a static RoPE's cos/sin tables grow to cover it here, before any backend captures their
    addresses. what / fix: how the one-line refusal names the window and its remedy."""
    if max_model_len is None:
        return spec
    inner = getattr(model, "generation_module", model)
    if spec is None:
        raise ConfigError(f"{what}={max_model_len} needs a model with cache_spec() (an lmforge model); "
                          f"{type(model).__name__} has none")
    pos_emb = getattr(inner, "pos_emb", None)
    if max_model_len > spec.max_seq_len and pos_emb is not None:
        raise ConfigError(f"{what}={max_model_len} is past the model's max_seq_len={spec.max_seq_len}, but its "
                          f"{type(pos_emb).__name__} cover {spec.max_seq_len} positions only; {fix}")
    rope = getattr(inner, "rope", None)
    if rope is not None:
        rope.reserve(max_model_len)
    return dataclasses.replace(spec, max_seq_len=max_model_len)


def limits(model, spec) -> tuple[int, int]:
    """(context window, vocabulary size) from the cache spec, or from the model's own attributes."""
    if spec is not None:
        return spec.max_seq_len, spec.vocab_size
    if scores_text(model):  # a SequenceHead (lmforge.align.reward) scores, it has no next-token logits
        raise ConfigError(f"{type(model).__name__} is a reward model, classifier or critic (a head on a language "
                          "model): it scores text, it does not generate; use lmforge.align.reward.reward_scores, "
                          "model.values(ids) (a ValueModel) or lmforge.align.prm.prm_scores (a process reward model)")
    try:
        return int(model.max_seq_len), int(model.vocab_size)
    except AttributeError:
        raise ConfigError(f"{type(model).__name__} has neither cache_spec() nor max_seq_len/vocab_size; "
                          "wrap it (lmforge.infer.hf_wrapper.HFCausalLM for transformers models)") from None

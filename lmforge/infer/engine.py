"""The batched decode loop: left-padded prefill of every prompt in one forward, then one token per row
per step, each row stopping on its own (stop token, stop string, max_tokens, context window).

A `Decoder` owns the model and its cache and exposes prefill(ids, pad) -> last logits (B, V) and
step(tokens (B,)) -> logits (B, V). `PlainDecoder` is the reference (contiguous KVCache, eager forwards);
`lmforge.infer.cuda_graph.GraphDecoder` is the fast GPU path with the same interface.
Finished rows stay in the batch (their tokens are ignored) so that the batch shape never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.detok import StreamDecoder
from lmforge.infer.outputs import CompletionOutput
from lmforge.infer.processors import TokenHistory, apply_processors, build_processors, sample
from lmforge.infer.sampling import SamplingParams
from lmforge.model.cache import KVCache


def decode_attention():
    """Context for eager decoding, whose key length grows every step: SDPA may use flash, memory-efficient
    or math kernels, not cuDNN's, which builds an execution plan for each new key length (H100, 1.1B,
    batch 1: 10.8 -> 74 tok/s with this; bench/decode.py, 2026-11-23). The static-shape CUDA-graph path
    does not need it (one plan, built at capture)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class Decoder(Protocol):
    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor: ...
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


def left_pad(prompts: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts in a (B, T) tensor; return it and pad (B,) = padding slots per row."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pad.to(device)


def is_mla(model) -> bool:
    return getattr(model.cfg, "attention", "mha") == "mla"


def new_cache(model, batch_size: int, max_len: int):
    """The model's own cache kind: MLA's latent cache, else the contiguous KVCache (which also serves
    sliding-window layers: their window mask is applied by attention on top of the cache's mask)."""
    if is_mla(model):
        from lmforge.model.layers.mla import MLACache

        return MLACache.for_model(model, batch_size, max_len)
    return KVCache.for_model(model, batch_size, max_len)


def supports_padding(model) -> bool:
    """Whether rows of different prompt lengths can share a batch (the cache must mask padding)."""
    return not is_mla(model)


class PlainDecoder:
    """Reference decoder: eager forwards into a contiguous KVCache with per-row padding masks.
    A left-padded row's token in slot s has position s - pad (pad slots get position 0; never seen)."""

    def __init__(self, model, batch_size: int, max_len: int):
        self.model = model
        self.cache = new_cache(model, batch_size, max_len)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if hasattr(self.cache, "set_padding"):
            self.cache.set_padding(pad)
        elif bool((pad > 0).any()):
            raise LmforgeError(f"{type(self.cache).__name__} cannot mask padding: batch equal-length prompts")
        self.pad = pad
        positions = (torch.arange(ids.shape[1], device=ids.device)[None] - pad[:, None]).clamp(min=0)
        with decode_attention():
            return self.model(ids, positions, cache=self.cache)[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = (self.cache.length - self.pad)[:, None]
        with decode_attention():
            return self.model(tokens[:, None], positions, cache=self.cache)[:, 0]


@dataclass
class Sequence:
    """One sample being generated: its prompt, its tokens so far and how (if) it finished."""

    prompt: list[int]
    index: int = 0
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    decoder: StreamDecoder | None = None

    def output(self, params: SamplingParams) -> CompletionOutput:
        want = params.logprobs is not None
        return CompletionOutput(
            index=self.index, text=self.text, token_ids=list(self.tokens), finish_reason=self.finish or "length",
            logprobs=list(self.logprobs) if want else None, top_logprobs=list(self.top) if want else None,
            cumulative_logprob=sum(self.logprobs) if want else None)


def stop_ids(params: SamplingParams, tokenizer) -> set[int]:
    ids = set(params.stop_token_ids)
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None and not params.ignore_eos:
        ids.add(int(eot))
    return ids


def _record(seq: Sequence, tok: int, params: SamplingParams, eos: set[int], max_seq_len: int) -> str:
    """Append one token to seq, update its text and finish state; return the new visible text."""
    seq.tokens.append(tok)
    if tok in eos:
        seq.finish = "stop"
        return ""
    piece = seq.decoder.push(tok)
    seq.text += piece
    if params.stop:
        window = seq.text[-(len(piece) + max(map(len, params.stop))):]
        hits = [seq.text.find(s, len(seq.text) - len(window)) for s in params.stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            cut = min(hits)
            piece = piece[: max(0, len(piece) - (len(seq.text) - cut))]
            seq.text, seq.finish = seq.text[:cut], "stop"
            return piece
    if len(seq.tokens) >= params.max_tokens or len(seq.prompt) + len(seq.tokens) >= max_seq_len:
        seq.finish = "length"
        tail = seq.decoder.flush()
        seq.text += tail
        piece += tail
    return piece


def run_batch(decoder: Decoder, seqs: list[Sequence], params: SamplingParams, tokenizer, *,
              vocab_size: int, max_seq_len: int, device=None) -> Iterator[list[tuple[int, str]]]:
    """Generate for every sequence at once; yields, after each step, (row, new text) for rows that
    produced visible text. Sequences are filled in place."""
    procs = build_processors(params)
    eos = stop_ids(params, tokenizer)
    for s in seqs:
        s.decoder = StreamDecoder(tokenizer)
    ids, pad = left_pad([s.prompt for s in seqs], device=device)
    logits = decoder.prefill(ids, pad)
    needs_history = params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty
    hist = TokenHistory.start([s.prompt for s in seqs], vocab_size, device) if needs_history else None
    gens = [s.generator for s in seqs]
    while True:
        logits = logits.float()
        proc = apply_processors(procs, logits, hist)
        tokens = sample(proc, params.greedy, gens)
        if hist is not None:
            hist.add(tokens)
        chosen = _logprobs(logits, tokens, params.logprobs)
        events = []
        for row, (s, tok) in enumerate(zip(seqs, tokens.tolist())):
            if s.finish is not None:
                continue
            if chosen is not None:
                s.logprobs.append(chosen[0][row])
                s.top.append(chosen[1][row])
            piece = _record(s, tok, params, eos, max_seq_len)
            if piece:
                events.append((row, piece))
        yield events
        if all(s.finish is not None for s in seqs):
            return
        logits = decoder.step(tokens)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int | None
              ) -> tuple[list[float], list[dict[int, float]]] | None:
    """Chosen tokens' log-probabilities under the raw model distribution, and each row's top-k."""
    if k is None:
        return None
    logp = logits.log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    if k == 0:
        return chosen, [{} for _ in chosen]
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    top = [dict(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return chosen, top

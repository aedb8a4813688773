"""Admission: the checks a request passes before the engine queues it (Engine.add_request) - per-request caps
a server relies on, the context window, the KV pool, prompt_logprobs_start - each refusal one line naming the
value and the fix, raised before the engine changes (a refused request leaves it as it was); and the error of a
request the pool's check let in that still cannot fit (Engine.step fails it alone)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmforge.errors import LmforgeError, RequestError, warn_caller
from lmforge.infer.request import Sequence
from lmforge.infer.sampling import SamplingParams

if TYPE_CHECKING:
    from lmforge.infer.engine import Engine


STREAM_LEN = 1 << 40
"""a sequence's length bound under a KV policy with positions within the cache (its positions stay below the
model's window however long it grows: max_tokens ends it)"""


def check_caps(engine: Engine, params: SamplingParams) -> None:
    """Per-request bounds a server relies on: top log-probs cost every step of the batch (EngineConfig.
    max_logprobs), and under strict_admission a request's samples (or beams) may not outnumber max_num_seqs
    (they all join the running batch at the fork: n=5000 took 28.8 s of steps for 2 tokens)."""
    if params.logit_bias and max(params.logit_bias) >= engine.vocab_size:
        raise LmforgeError(f"logit_bias has token id {max(params.logit_bias)} outside the model's vocabulary "
                           f"[0, {engine.vocab_size})")
    width = max(params.n, params.beam_width)
    if engine.config.strict_admission and width > engine.config.max_num_seqs:
        name = "beam_width" if params.beam_width > 1 else "n"
        raise LmforgeError(f"{name}={width} runs {width} sequences, more than EngineConfig.max_num_seqs="
                           f"{engine.config.max_num_seqs}; lower {name} or raise max_num_seqs")
    cap = engine.config.max_logprobs
    for name in ("logprobs", "prompt_logprobs") if cap is not None else ():
        k = getattr(params, name)
        if k is not None and k > cap:
            raise LmforgeError(f"{name}={k} is more than this engine lists (EngineConfig.max_logprobs={cap}); ask "
                               f"for at most {cap} or raise max_logprobs (None: no limit)")


def check_length(engine: Engine, ids: list[int], params: SamplingParams, index: int | None
                 ) -> tuple[SamplingParams, int]:
    """The request's params (max_tokens=None resolved to the room left in the window) and the length its
    samples stop at; a request the window (EngineConfig.strict_admission) or the pool cannot serve raises."""
    if params.max_tokens is None:  # up to the context window
        if engine.stream_len == STREAM_LEN:
            raise LmforgeError("max_tokens=None asks for tokens up to the context window, but this engine's KV "
                               "policy keeps positions within the cache (no window ends it); give a number")
        params = params.derived(max_tokens=engine.stream_len - len(ids))
    if params.max_tokens and len(ids) + params.max_tokens > engine.stream_len:
        past = (f"max_tokens={params.max_tokens} after a {len(ids)}-token prompt passes the context window "
                f"({engine.max_seq_len})")
        if engine.config.strict_admission:
            where = f"prompt {index}: " if index is not None else ""
            raise LmforgeError(f"{where}{past}; ask for at most {engine.stream_len - len(ids)} new tokens, or "
                               "max_tokens=None (up to the window)")
        warn_caller(f"{past}; generation stops there (finish_reason 'length')")
    length = min(len(ids) + params.max_tokens, engine.stream_len)
    if not engine.config.chunked_prefill and length > engine.config.max_num_batched_tokens:
        raise LmforgeError(f"with chunked_prefill off a sequence is computed in one step (its prompt, and after a "
                           f"preemption its output too): {length} tokens > max_num_batched_tokens="
                           f"{engine.config.max_num_batched_tokens}; raise it or turn chunked_prefill on")
    bound = (engine.kv_policy.policy.max_slots(len(ids), engine.config.max_num_batched_tokens) if engine.kv_policy
             else None)
    if engine.scheduler.max_positions is not None:  # positions within the cache: chunks end below the window
        bound = min(bound, engine.scheduler.max_positions)
    # beams advance together; n samples take turns through preemption, unless a server wants them all at once
    width = max(params.n, params.beam_width) if engine.config.strict_admission else params.beam_width
    def blocks(length: int, width: int) -> int:
        return engine.pool.request_blocks(len(ids), length, width, engine.window,
                                        engine.config.max_num_batched_tokens + 1, bound,  # (+ a draft's lag)
                                        policy=engine.kv_policy is not None)

    need = blocks(length, width)
    if need > engine.pool.num_blocks:
        many = "" if width == 1 else f" in {width} beams" if params.beam_width > 1 else f" in {width} samples"
        # lowering max_tokens helps only where the prompt and one new token fit (a KV policy's bound, H2O's,
        # may count the prompt alone); n only where one sample fits
        lower = [f for f, fits in (("max_tokens", blocks(min(length, len(ids) + 1), width)),
                                   ("n", blocks(length, 1) if width > params.beam_width else None))
                 if fits is not None and fits <= engine.pool.num_blocks and (f == "n" or params.max_tokens)]
        why = "it only scores, no new tokens to lower" if not params.max_tokens else "fewer new tokens do not fit"
        hint = f" (or shorten the prompt: {why})"
        chunk = engine.config.max_num_batched_tokens
        if engine.kv_policy is not None and engine.pool.request_blocks(
                1, length, width, engine.window, chunk + 1, engine.kv_policy.policy.max_slots(1, chunk),
                policy=True) > engine.pool.num_blocks:
            # a one-token prompt would not fit either: the policy's bound decides (its window or budget + a step's)
            hint = (f" (the KV policy holds up to {bound} keys a sequence, {chunk} of them a step's new tokens, "
                    "whatever the prompt: lower its window or budget, or max_num_batched_tokens)")
        raise LmforgeError(f"a request of {len(ids)} prompt + {params.max_tokens} new tokens{many} needs "
                           f"{need} KV blocks but the pool has {engine.pool.num_blocks}; raise num_kv_tokens or "
                           f"gpu_memory_utilization" + (f", or lower {' or '.join(lower)}" if lower else hint))
    return params, length


def unfit_error(engine: Engine, seq: Sequence, need: int) -> RequestError:
    """The one-line error of a request whose sequence needs more KV blocks than the pool has (Batch.failed):
    add_request's pool check let it in, so a KV policy's max_slots under-reported its keys (or the pool shrank)."""
    rid, policy = seq.request.request_id, engine.config.kv_policy
    fix = "raise num_kv_tokens (or gpu_memory_utilization)"
    if policy is not None:
        bound = policy.max_slots(seq.request.prompt_len, engine.config.max_num_batched_tokens)
        fix += (f", or fix {type(policy).__name__}.max_slots (add_request checked the pool against its bound of "
                f"{bound} keys; the sequence holds {seq.num_slots})")
    return RequestError(f"request {rid!r}: its sequence needs {need} KV blocks for its next step"
                        f" but the pool has {engine.pool.num_blocks}; {fix}", rid)


def check_prompt_logprobs_start(ids: list[int], params: SamplingParams, index: int | None) -> None:
    """SamplingParams.prompt_logprobs_start names a prompt token (the default 1 also serves a one-token prompt,
    whose only token has no log-prob): past the last one no prompt token would get log-probs, which is refused."""
    start, n = params.prompt_logprobs_start, len(ids)
    if params.prompt_logprobs is not None and start > max(n - 1, 1):
        where = f"prompt {index}: " if index is not None else ""
        raise LmforgeError(f"{where}prompt_logprobs_start={start} is past the last token of the {n}-token prompt "
                           f"(position {n - 1}); give {'1' if n <= 2 else f'1 to {n - 1}'}")

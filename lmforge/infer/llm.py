"""LLM: the offline front door over the engine (lmforge.infer.engine).

    llm = LLM(model, tokenizer)            # or LLM.load(checkpoint_dir)
    outs = llm.generate(["Once upon"], SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].outputs   # all n samples
    for piece in llm.stream("Once upon", params): ...
    llm.score([("The capital of France is", " Paris")])   # [(sum log-prob, is greedy)]: lm-eval's loglikelihood
    llm.score_tokens(pairs)[0].token_logprobs             # per continuation token (normalized scores)
    llm.score_rolling([document])[0].logprob              # whole document in windows: lm-eval's loglikelihood_rolling
    llm.update_weights()                   # after a trainer changed the model in place (RL rollouts)
    rid = llm.submit(prompt, params); llm.wait([rid])   # queue without waiting; collect later (llm.abort(rid))
    for out in llm.completed(): ...        # each submitted request's output as it finishes (LM programs)
    llm.chat([{"role": "user", "content": "Hi"}], params, template="chatml")   # one answer per conversation
    llm.submit(*llm.chat_request(conversation, params))   # one chat call, queued as a program's call

Prompts are validated and queued as engine requests, run to completion with continuous batching, and
returned as `RequestOutput`s in prompt order. With a seed, prompt i gets its own stream derived from the
seed and i (vLLM-style), so identical prompts give different samples and no prompt's samples depend on
the others; without one, samples draw from the engine's own stream (Engine.rng), seeded from torch's RNG when
the LLM is built: generating never moves torch's RNG (a training loop's, around RL rollouts or evaluation).
Beam search (lmforge.infer.beam) and speculative decoding (lmforge.infer.speculative) are
strategies running on the same engine, for all prompts at once. Scoring is generation with prompt
log-probs (SamplingParams.prompt_logprobs), batched like any other requests.

Programs that call the model many times with calls that depend on earlier answers (ReAct, self-consistency
over many questions, LM-program modules) batch their calls with `submit` (queue one request, its seed used
as given, so a call's samples never depend on what else is queued) and `wait` / `completed` (step the
engine until requests finish): a finished call resumes its program, whose next call joins the running
batch. Every entry point shares one engine: an output finishing while another call steps the engine
(a `generate` inside a half-read `stream`, a submitted request finishing during `generate`) is held for
its own caller, never lost.

Threads (dspy.Evaluate(num_threads=N), a thread pool of LM-program calls) may share one LLM: generate, chat,
score, score_tokens, score_rolling, stream, submit, wait, abort and chat_request are thread-safe. Each engine
step, and each request's queueing or abort, holds the LLM's lock (not a whole call), so the threads' requests
run in the same batches, and a call's requests finishing in another thread's step are held for it. completed()
hands out every submitted request, so one thread at a time iterates it.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Iterator, Sequence as Seq

from lmforge.errors import ConfigError, LmforgeError, RequestError
from lmforge.infer.chat_template import ChatTemplate, chat_request as build_chat_request, checkpoint_chat_template
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.outputs import RequestOutput, check_errors, failed_output, input_error
from lmforge.infer.request import prompt_ids, prompt_list, seed_for
from lmforge.infer.score import Score, Scoring, _list_of, read_score, rolling_windows  # noqa: F401  (re-exported)
from lmforge.infer.sampling import SamplingParams

Prompt = str | list[int]


PROGRESS_MIN = 32
"""a call (generate, chat, score, wait) waiting on at least this many requests shows a progress bar on stderr when
it is a terminal (tqdm's automatic choice; LLM.progress = False never)"""


def _progress_bar(total: int, done: int):
    """The bar of a call waiting on `total` requests, `done` of them finished already; None under PROGRESS_MIN."""
    if total < PROGRESS_MIN:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="req", desc="requests", disable=None, leave=False)


class LLM(Scoring):
    """Generate text with any model honouring `model(ids, positions=None, cache=None, meta=None) -> logits`
    and describing its cache with `cache_spec()` (else the plain recompute path runs).

    draft: None, a smaller model sharing the tokenizer, "ngram" (prompt-lookup drafting), "mtp" (the
    model's own parallel MTP heads) or a drafter object (`propose`/`accept`: Medusa or EAGLE heads; one
    proposing token trees, e.g. lmforge.infer.token_tree.TreeDrafter) to decode with
    speculative decoding (lmforge.infer.speculative; the engine checks it); acceptance: the rule its drafts
    are verified by (lmforge.infer.acceptance, e.g. TypicalAcceptance; default the drafter's, else exact).
    cuda_graphs: decode steps replay CUDA graphs (default: on a GPU; EngineConfig.cuda_graphs).
    max_batch_size: sequences decoded together at most (EngineConfig.max_num_seqs; default 64).
    kv_policy: a KV-cache policy (EngineConfig.kv_policy, lmforge.infer.kv.policy; default none).
    max_model_len: the longest sequence served (EngineConfig.max_model_len; default the model's max_seq_len).
    max_logprobs: the most top log-probs a request may ask for (EngineConfig.max_logprobs; None: no limit).
    config: the whole EngineConfig instead of the five options above."""

    def __init__(self, model, tokenizer, *, draft=None, num_draft_tokens: int = 4, acceptance=None,
                 cuda_graphs: bool | None = None, max_batch_size: int | None = None, kv_policy=None,
                 max_model_len: int | None = None, max_logprobs: int | None = EngineConfig.max_logprobs,
                 config: EngineConfig | None = None):
        self.model = model  # left in its mode (a Trainer may share it); the engine's steps run it in eval mode
        self.tokenizer = tokenizer
        self.draft = draft  # (a draft model too is left in its mode: its forwards run in eval mode)
        self.num_draft_tokens = num_draft_tokens
        if config is not None and (any(v is not None for v in (cuda_graphs, max_batch_size, kv_policy, max_model_len))
                                   or max_logprobs != EngineConfig.max_logprobs):
            raise ConfigError("with config=, set cuda_graphs and max_batch_size in it (EngineConfig.cuda_graphs, "
                              "EngineConfig.max_num_seqs), kv_policy, max_model_len and max_logprobs too "
                              "(EngineConfig.kv_policy, EngineConfig.max_model_len, EngineConfig.max_logprobs), not "
                              "beside it")
        if max_batch_size is not None and max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1 (sequences decoded together), got {max_batch_size}")
        self.config = config or EngineConfig(max_num_seqs=64 if max_batch_size is None else max_batch_size,
                                             cuda_graphs=cuda_graphs, kv_policy=kv_policy, max_model_len=max_model_len,
                                             max_logprobs=max_logprobs)
        self.engine = Engine(model, tokenizer, self.config, draft=self.draft, num_draft_tokens=num_draft_tokens,
                             acceptance=acceptance)
        self.device = self.engine.device
        self._held: dict[str, RequestOutput] = {}  # finished outputs that the call stepping the engine did not own
        # Finished ids are routed to who waits for them as they finish (_hold), so no caller rescans what it waits
        # for after each step (with threads that was O(threads x waiting ids) per step, under the lock):
        # (abort posts an _Aborted error to them instead: the waiting call raises it at once)
        self._waiters: dict[str, list[list]] = {}  # request id -> the inboxes of the _collect calls waiting
        self._submitted: set[str] = set()  # submit()'s requests not yet handed out by wait / completed
        self.progress = True  # a call waiting on PROGRESS_MIN requests or more shows a bar on a terminal
        self._ready: dict[str, None] = {}  # those of them finished, in the order they finished (completed())
        self._lock = threading.RLock()  # held for each engine step, queueing and abort (threads: module docstring)
        self._steps = 0  # engine steps taken
        self.chat_template: str | ChatTemplate | None = None
        """chat()'s default template: the one a fine-tuned checkpoint records, or a HF checkpoint's own Jinja
        (LLM.load: checkpoint.hf_chat_template), else None"""
        self._told_plain = False  # chat() warned once that it fell back to the plain template

    @classmethod
    def load(cls, path, device: str = "cpu", *, tokenizer=None, base=None, dtype=None, **kwargs) -> "LLM":
        """Open a run or checkpoint directory written by lmforge's trainer. `tokenizer` (an object or a
        spec for lmforge.tokenizer.load.load_tokenizer) replaces or supplies the checkpoint's own. `base`:
        where an adapter-only checkpoint's base model is now, when it moved (lmforge.checkpoint.load_model).
        dtype: the float dtype to load in, or its name ('bfloat16') (default: the one the checkpoint was saved in,
        fp32 for older ones).
        kwargs: LLM's options (max_batch_size, max_model_len, config, draft, ...)."""
        from lmforge.tokenizer.load import load_tokenizer

        from lmforge.checkpoint import load_model
        # (a tokenizer given replaces the checkpoint's own)
        model, saved = load_model(path, device=device, tokenizer=tokenizer is None, base=base, dtype=dtype)
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer or saved
        if tok is None:
            from pathlib import Path

            sp = Path(path) / "tokenizer.model"  # (a HF directory of a SentencePiece model with no tokenizer.json)
            unread = (" lmforge reads (its tokenizer.model, SentencePiece's protobuf, is not: write tokenizer.json "
                      "beside it with transformers' AutoTokenizer.from_pretrained(path).save_pretrained(path))"
                      if sp.is_file() else "")
            raise LmforgeError(f"checkpoint {path} holds no tokenizer{unread}; pass one: LLM.load(path, "
                               "tokenizer='byte' or a tokenizer file), on the command line --tokenizer")
        llm = cls(model, tok, **kwargs)
        llm.chat_template = checkpoint_chat_template(path, base=base)
        return llm

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def encode(self, prompt: Prompt, params: SamplingParams, index: int = 0) -> list[int]:
        """A prompt's token ids, validated (Engine.encode); a string is tokenized as a prompt
        (lmforge.infer.request.prompt_ids: a Llama-3 tokenizer's BOS first)."""
        return self.engine.encode(prompt, params, index)

    def text_ids(self, text: str) -> list[int]:
        """`text` tokenized as a prompt, unvalidated (lmforge.infer.request.prompt_ids)."""
        return prompt_ids(self.tokenizer, text)

    # ---------------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, errors: str = "raise") -> list[RequestOutput]:
        """One RequestOutput per prompt; `params.n` samples each (RequestOutput.outputs). A prompt is a string
        or a list (or 1-D tensor) of token ids; `prompts` is one prompt or any iterable of them. `params` is
        one SamplingParams for every prompt or a list of them, one per prompt (lm-eval's generate_until has
        per-request settings); either way a seed gives prompt i the stream of (seed, i).
        errors: what a prompt failing on its own input does: "raise" (default) raises its error, named by prompt
        index, and drops the batch; "return" returns that prompt's output in its place, finished with `error` set
        (a lmforge.errors.RequestError "prompt i: ...", its cause the original error) and the others' as usual. It
        covers input refused before it runs (too long, empty or out-of-vocabulary; a logit_bias id outside the
        vocabulary; more KV blocks than the pool has: an empty output, no tokens) and input failing while it runs
        (a logits processor leaving no token allowed: its tokens so far, finish_reason 'abort'). A failed engine
        step (not one request's fault) raises either way."""
        check_errors(errors)
        prompts = prompt_list(prompts)
        per_prompt = _params_list(params, len(prompts))
        requests: list = []
        for i, (p, sp) in enumerate(zip(prompts, per_prompt)):
            try:
                requests.append((self.encode(p, sp, i), self._params(sp, i)))
            except LmforgeError as e:
                requests.append(failed_output(input_error(e, "prompt", i, errors), [], sp.n))
        outs = self._run(requests, errors)
        return [dataclasses.replace(o, prompt=p if isinstance(p, str) else None) for o, p in zip(outs, prompts)]

    def _run(self, requests: list, errors: str = "raise", what: str = "prompt", names: Seq[int] | None = None
             ) -> list[RequestOutput]:
        """Queue every (token ids, params) and step the engine until all finish (in order). An item that is a
        RequestOutput already failed while it was built (errors="return"); one the engine refuses (Engine.add_request)
        becomes one with errors="return", else its error raises named `{what} i: `, i its caller's index:
        names[k] for requests[k] (a score call's pair, or the document a window belongs to), by default k. On any
        error raised, the requests queued so far are aborted."""
        ids: list[str] = []
        index: dict[str, int] = {}  # request id -> its caller's index
        failed: dict[int, RequestOutput] = {}
        try:
            for i, item in enumerate(requests):
                if isinstance(item, RequestOutput):
                    failed[i] = item
                    continue
                name = i if names is None else names[i]
                try:
                    ids.append(self._add(*item))
                    index[ids[-1]] = name
                except LmforgeError as e:
                    failed[i] = failed_output(input_error(e, what, name, errors), item[0], item[1].n)
            outs = iter(self._collect(ids, errors))
            return [failed[i] if i in failed else next(outs) for i in range(len(requests))]
        except BaseException as e:
            with self._lock:
                for rid in ids:
                    if isinstance(e, _Aborted) and rid == e.request_id:  # (abort took it; its id may be reused)
                        continue
                    self._held.pop(rid, None)
                    if rid in self.engine.requests:
                        self.engine.abort(rid)
            if isinstance(e, RequestError) and e.request_id in index:  # one prompt's own input failed: by its index
                raise RequestError(f"{what} {index[e.request_id]}: {e}", e.request_id) from e
            raise

    def _collect(self, ids: list[str], errors: str = "raise") -> list[RequestOutput]:
        """Step the engine until every request in ids has finished; their outputs, in order. Outputs of
        other requests finishing meanwhile are held for their own callers (_held); ids finishing in any
        caller's step (another thread's too) reach this call's inbox (_hold), so the work per step is what
        finished, not what is waited for. errors="raise": the first of ids to fail on its own input raises its
        error (its output taken, the others left running or held); "return": failed outputs are returned in place.
        A failed step (_step) takes ids' outputs and raises. One of ids aborted (abort) while this call waits raises
        _Aborted at once, the others left running or held. Ids that are neither running nor held once the engine
        is idle (another caller collected or aborted them) raise rather than wait forever."""
        inbox: list = []  # finished outputs, and _Aborted errors (abort)
        with self._lock:
            for rid in ids:
                if rid not in self._held and rid not in self.engine.requests:
                    raise LmforgeError(f"no request with id {rid!r} is running or waiting to be collected "
                                       "(collected already, aborted, or never added)")
            distinct = list(dict.fromkeys(ids))  # an id given twice (a program's cache merging two calls): one output
            # the very outputs this call hands out, by identity: between two holds of the lock another caller may
            # abort or collect one, and a new request reuse its id and finish (its output held under that id)
            found = {rid: self._held[rid] for rid in distinct if rid in self._held}  # finished before this call
            waiting = set(distinct).difference(found)  # (counted down, not rescanned: a score call queues thousands)
            for rid in distinct:  # (finished ones too: an abort of one must reach this call, as of a running one)
                self._waiters.setdefault(rid, []).append(inbox)
        bar = _progress_bar(len(distinct), len(found)) if self.progress else None
        try:
            return self._collect_loop(ids, distinct, found, waiting, inbox, errors, bar)
        finally:
            if bar is not None:
                bar.close()
            with self._lock:
                for rid in distinct:  # (those still listed: the others left the table as they finished)
                    others = [box for box in self._waiters.pop(rid, ()) if box is not inbox]
                    if others:
                        self._waiters[rid] = others

    def _collect_loop(self, ids: list[str], distinct: list[str], found: dict[str, RequestOutput], waiting: set[str],
                      inbox: list, errors: str, bar=None) -> list[RequestOutput]:
        """_collect's steps: `found` the outputs of the ids found finished (each taken only while it is still the
        one held under its id), `waiting` the ids not yet, `inbox` where _hold puts their outputs."""
        new = list(found)
        while True:
            if errors == "raise":
                with self._lock:
                    for rid in new:  # a request aborted for its own failed input (a logits processor): its error
                        out = found[rid]  # (no longer held: another thread's caller took it; found below)
                        if out.error is not None and self._held.get(rid) is out:
                            raise self._held.pop(rid).error
            if not waiting:
                with self._lock:
                    for item in inbox:  # one of ids aborted since this call found it finished
                        if isinstance(item, _Aborted):
                            raise item
                    outs = {rid: self._held.pop(rid) if self._held.get(rid) is found[rid] else None for rid in distinct}
                    gone = [rid for rid, out in outs.items() if out is None]
                    if gone:  # (the others stay held for a later wait)
                        self._held.update((rid, out) for rid, out in outs.items() if out is not None)
                    _check_not_taken(gone)
                return [outs[rid] for rid in ids]
            with self._lock:
                if not inbox and not self.engine.requests:  # (nothing can finish them now)
                    _check_not_taken(waiting)
                elif not inbox:
                    try:
                        self._step(finished_only=True)
                    except Exception:
                        for rid in ids:  # the caller has its error: their failed outputs are not held for it
                            self._held.pop(rid, None)
                        raise
                items = inbox[:]
                inbox.clear()
            new = []
            for item in items:
                if isinstance(item, _Aborted):  # (its id may be another request's already: nothing of it is touched)
                    raise item
                if item.request_id in waiting:  # (an id found finished finishes again only as a new request's)
                    found[item.request_id] = item
                    new.append(item.request_id)
            waiting.difference_update(new)
            if bar is not None and new:
                bar.update(len(new))

    def _step(self, finished_only: bool = False, watch: Seq[str] = ()) -> list[RequestOutput]:
        """One engine step; every finished output goes to _held until its caller takes it. finished_only, watch:
        Engine.step's (which running requests' outputs are built).

        A step that raises (not one request's input failing, which Engine.step returns as that request's
        output with `error`: a model or engine failure, e.g. a processor returning a wrong-shaped tensor)
        would raise again at every later step while its requests stay queued, wedging every caller. Which
        requests that step ran cannot be told from outside the engine, so all running requests are aborted:
        each output is held finished with `error`, a RequestError naming the request whose cause is the
        step's exception, and the exception is raised here, once; the LLM then serves new requests.
        (KeyboardInterrupt is not caught: a step cut short that way can be run again.)"""
        with self._lock:
            self._steps += 1
            try:
                outs = self.engine.step(finished_only, watch)
            except Exception as e:
                own = isinstance(e, RequestError) and e.request_id in self.engine.requests  # one request's, raised
                for rid in [e.request_id] if own else list(self.engine.requests):
                    err = e if own else RequestError(f"request {rid!r} was aborted: an engine step failed "
                                                     f"({type(e).__name__}: {e})", rid)
                    if not own:
                        err.__cause__ = e
                    self._hold(dataclasses.replace(self.engine.abort(rid), finished=True, error=err))
                raise
            for out in outs:
                if out.finished:
                    self._hold(out)
            return outs

    def _hold(self, out: RequestOutput) -> None:
        """Keep a finished output for its caller: in _held, its id routed to the _collect calls waiting for it
        (leaving the table: an id finishes once) and, for a submitted request, to completed()."""
        rid = out.request_id
        self._held[rid] = out
        for inbox in self._waiters.pop(rid, ()):
            inbox.append(out)
        if rid in self._submitted:
            self._ready[rid] = None

    # ---------------------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue one request without running it; returns its id. Its seed is used as given (unlike
        generate's per-index streams), so a program's call samples the same whatever else is queued with it.
        Collect it with wait([id]) or completed(), or cancel it with abort(id). request_id: your own id, refused
        while a request of this LLM still has it (running, or finished and not yet collected); default: the
        engine's next number that none has."""
        params = _check_params(params)
        with self._lock:
            rid = self._add(prompt, self._params(params, None), request_id)
            self._submitted.add(rid)
        return rid

    def _add(self, prompt, params: SamplingParams, request_id: str | None = None) -> str:
        """Engine.add_request under an id that no output this LLM still owes a caller has: a finished request
        waiting in _held, or a submitted one not yet collected (the engine knows only its running requests; an
        id reused there would hand one call's output to the other)."""
        with self._lock:
            if request_id is None:  # (looked up in place: a union copied per request made N submits O(N^2))
                rid = self.engine.free_request_id(taken=_InAny(self._held, self._submitted))
            else:
                rid = str(request_id)
                if rid in self._held or rid in self._submitted:
                    raise LmforgeError(f"request id {rid!r} is in use: a submitted request not yet collected (wait, "
                                       "completed) or aborted (abort) has it; pass another request_id")
            return self.engine.add_request(prompt, params, rid)

    def abort(self, request_id: str) -> RequestOutput:
        """Cancel a request of this LLM (a submitted call the program no longer needs): a running one stops now
        and frees its blocks; a finished one not yet collected is dropped. Returns its output (finish_reason
        'abort' for the samples it cut short); wait and completed no longer see it, and its id is free again. A
        wait (another thread's) waiting for it raises at once: RequestError "request X was aborted"."""
        rid = str(request_id)
        with self._lock:
            self._handed_out([rid])
            for inbox in self._waiters.pop(rid, ()):  # (now, before the id is reused: no waiter sees its next owner)
                inbox.append(_Aborted(f"request {rid!r} was aborted (LLM.abort) while this call waited for it", rid))
            held = self._held.pop(rid, None)
            if rid in self.engine.requests:
                return self.engine.abort(rid)
        if held is None:
            raise LmforgeError(f"no request with id {rid!r} is running or waiting to be collected (collected "
                               "already, aborted, or never added)")
        return held

    def wait(self, request_ids: Seq[str], *, errors: str = "raise") -> list[RequestOutput]:
        """Step the engine until these requests (submitted, or added to self.engine) have finished; their
        outputs, in order. Other requests keep running; those finishing meanwhile stay to be collected.
        errors: as generate's; "raise" raises the first failed request's error (that request is collected,
        the others stay), "return" returns failed outputs in place, with `error` set. A failed engine step
        raises its exception and these requests are gone with it (the others get failed outputs: _step). One of
        them aborted (abort, another thread) while this waits raises RequestError "request X was aborted" at once.
        When it raises because one of them was taken elsewhere (another wait, completed() or abort collected it),
        the others are not lost: running or finished, they stay submitted, for a later wait or completed()."""
        check_errors(errors)
        if isinstance(request_ids, str):
            raise LmforgeError(f"wait takes a list of request ids, got the string {request_ids!r}; wait([id])")
        ids = [str(r) for r in request_ids]
        try:
            outs = self._collect(ids, errors)
        except _Aborted:  # abort handed it out already (its id may be a new request's now): the others run on
            raise
        except RequestError as e:  # that request's own input failed: it is gone, the others run on
            self._handed_out([e.request_id])
            raise
        except Exception:  # a failed step took these requests' failed outputs; one taken elsewhere took none of them
            with self._lock:  # (those still running or held stay to be collected: wait, completed)
                self._handed_out([rid for rid in ids if rid not in self._held and rid not in self.engine.requests])
            raise
        self._handed_out(ids)
        return outs

    def _handed_out(self, ids) -> None:
        """Submitted requests collected (wait) or cancelled (abort): completed() no longer owes them."""
        with self._lock:
            for rid in ids:
                self._submitted.discard(rid)
                self._ready.pop(rid, None)

    def completed(self, *, errors: str = "raise") -> Iterator[RequestOutput]:
        """Yield each submitted request's output as it finishes, stepping the engine, until no submitted
        request is left; requests submitted while iterating (a finished call's follow-up) are included.
        errors="raise": a request that failed on its own input raises its error, which ends this generator
        (as any raising generator) but loses nothing: the other requests run on, and a new completed()
        continues with them. errors="return": the failed output is yielded (`error` set) and iteration goes
        on, what an LM program running many calls wants. A failed engine step raises its exception once;
        every request it aborted then comes out of a new completed() as a failed output. A request collected
        by wait or cancelled by abort while iterating is not yielded."""
        check_errors(errors)
        while self._submitted:
            with self._lock:
                if not self._ready:
                    if not any(rid in self.engine.requests for rid in self._submitted):
                        self._submitted.clear()  # aborted through the engine: nothing left to wait for
                        return
                    self._step(finished_only=True)
                    continue
                rid = next(iter(self._ready))  # the first to finish
                del self._ready[rid]
                if rid not in self._submitted or rid not in self._held:  # collected (wait) or aborted meanwhile
                    continue
                self._submitted.discard(rid)
                out = self._held.pop(rid)
            if out.error is not None and errors == "raise":  # (the others stay to be collected)
                raise out.error
            yield out

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one sample as it is produced: what each engine output adds to the last one's
        text (complete UTF-8 characters, and nothing a stop string could take back: Sequence.output). A
        beam search yields its best beam once the search ends (the running best beam may change). n > 1 is
        refused: the other samples would run unseen (generate, or AsyncEngine.stream, gives every sample)."""
        params = _check_params(params)
        if params.n > 1 and params.beam_width == 1:
            raise ConfigError(f"stream yields one sample's text, but n={params.n} would run {params.n} samples and "
                              "show one: use n=1 (generate, or AsyncEngine.stream, gives every sample)")
        rid = self._add(self.encode(prompt, params), self._params(params, 0))
        sent = 0
        try:
            while rid in self.engine.requests:
                for out in self._step(finished_only=True, watch=(rid,)):  # (not every running request's output)
                    if out.request_id == rid and out.error is not None:
                        raise out.error
                    if out.request_id == rid and (out.finished or params.beam_width == 1) and len(out.text) > sent:
                        yield out.text[sent:]
                        sent = len(out.text)
            last = self._held.pop(rid, None)  # it finished while another call stepped the engine
            if last is not None and last.error is not None:
                raise last.error
            if last is not None and len(last.text) > sent:
                yield last.text[sent:]
        finally:
            with self._lock:
                self._held.pop(rid, None)
                if rid in self.engine.requests:
                    self.engine.abort(rid)

    def chat(self, conversations, params: SamplingParams | Seq[SamplingParams] | None = None, *,
             template=None, add_generation_prompt: bool | None = None, continue_final_message: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             errors: str = "raise") -> list[RequestOutput]:
        """The assistant's next turn for each conversation (a list of {"role", "content"} messages, or a list
        of such lists), batched as generate batches prompts; each conversation runs as chat_request makes it.
        template: a name (lmforge.infer.chat_template.TEMPLATES) or a ChatTemplate; default: the one the
        checkpoint records, or a HF checkpoint's own (its tokenizer_config.json Jinja; LLM.load), else chatml
        where the tokenizer has its special tokens, else plain (chat_template.choose_template; falling back to
        plain warns, once per LLM).
        continue_final_message: each conversation ends with a partial assistant message that the answer
        continues (the prompt ends right after its content: no end marker, no new turn; HF's and vLLM's
        name); add_generation_prompt (default: unless continuing) opens a new assistant turn.
        tools, chat_template_kwargs: for a checkpoint's own Jinja template (JinjaTemplate.render: tool schemas,
        variables such as enable_thinking); a built-in template refuses them.
        Messages may be OpenAI's (content parts, tool_calls with JSON-string arguments): normalize_messages.
        errors: as generate's ("return": a failed conversation's output in its place, `error` set, also for one
        the template refuses, e.g. an unknown role; "raise": its error, named "conversation i: ").
        Each output's `prompt` is the conversation's rendered prompt text (None where rendering failed)."""
        check_errors(errors)
        tpl = self._chat_template(template)
        conversations = _list_of(conversations, "conversations", "messages, or a list of such lists")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        requests: list = []
        texts: list[str | None] = []
        for i, (c, sp) in enumerate(zip(conversations, _params_list(params, len(conversations)))):
            text = None
            try:
                req = build_chat_request(self.tokenizer, tpl, c, sp, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, tools=tools,
                                         chat_template_kwargs=chat_template_kwargs, index=i)
                text = req.prompt  # (its seed is derived for index i already: _params adds none)
                requests.append((self.encode(req.prompt_token_ids, req.params, i), self._params(req.params, None)))
            except LmforgeError as e:
                requests.append(failed_output(input_error(e, "conversation", i, errors), [], sp.n))
            texts.append(text)
        outs = self._run(requests, errors, "conversation")
        return [dataclasses.replace(o, prompt=t) for o, t in zip(outs, texts)]

    def chat_request(self, conversation: Seq[dict], params: SamplingParams | None = None, *, template=None,
                     add_generation_prompt: bool | None = None, continue_final_message: bool = False,
                     tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
                     index: int | None = None) -> tuple[list[int], SamplingParams]:
        """One conversation as a request: (prompt token ids, params with the template's stops), what chat runs
        for conversation `index` of its batch: `llm.submit(*llm.chat_request(conv, params, index=i))` samples
        what `llm.chat(convs, params)[i]` does (a seed becomes seed_for(seed, i), and the returned params carry
        it, for a cache to key on); index None (default) keeps the seed as given, as submit does.
        `llm.submit(*llm.chat_request(conv, params))` queues a chat call beside other calls (an LM program),
        `llm.stream(*...)` streams it (lmforge chat). The template is chosen as for chat, and
        lmforge.infer.chat_template.chat_request builds the request (a server holding only an Engine calls it
        too): markers as special tokens, contents as plain text, so a message cannot open a turn of its own;
        the template's end-of-turn strings join params.stop, those that are single special tokens
        params.stop_token_ids. The other options are chat's."""
        req = build_chat_request(self.tokenizer, self._chat_template(template), conversation, _check_params(params),
                                 add_generation_prompt=add_generation_prompt,
                                 continue_final_message=continue_final_message, tools=tools,
                                 chat_template_kwargs=chat_template_kwargs, index=index)
        return req.prompt_token_ids, req.params

    def _chat_template(self, template) -> ChatTemplate:
        from lmforge.errors import warn_caller
        from lmforge.infer.chat_template import choose_template

        tpl, notice = choose_template(self.tokenizer, template, self.chat_template)  # markers: single specials
        if notice and not self._told_plain:
            self._told_plain = True
            warn_caller(f"LLM.chat: {notice} (pass template= to choose one)")
        return tpl

    def update_weights(self, weights=None, *, partial: bool = False) -> None:
        """Engine.update_weights: None after the model changed in place, else a state_dict or module (partial:
        only the tensors it names)."""
        with self._lock:
            self.engine.update_weights(weights, partial=partial)

    # ---------------------------------------------------------------------------------------------
    @staticmethod
    def _params(params: SamplingParams, index: int | None) -> SamplingParams:
        """Prompt `index`'s own seed (issue 16 §5): seeded prompts never share a random stream (None: the seed as
        given). LLM's methods hand out whole outputs, so their requests run with cumulative outputs whatever
        output_kind says (a delta that reached another caller's step would be lost; SamplingParams.output_kind
        is for Engine.step and AsyncEngine readers)."""
        changes = {} if params.output_kind == "cumulative" else {"output_kind": "cumulative"}
        if params.seed is not None and index is not None:
            changes["seed"] = seed_for(params.seed, index)
        return params.derived(**changes)


class _Aborted(RequestError):
    """A request aborted (LLM.abort) while a wait waited for it: what that wait raises (a RequestError naming it)."""


class _InAny:
    """`x in _InAny(a, b)`: x is in a or in b (a view, not a copy)."""

    def __init__(self, *containers):
        self.containers = containers

    def __contains__(self, x) -> bool:
        return any(x in c for c in self.containers)


def _check_not_taken(gone) -> None:
    """Requests a caller waits for that are neither running nor held: another caller collected or aborted them."""
    if gone:
        raise LmforgeError(f"request(s) {sorted(gone)[:3]} are neither running nor waiting to be collected: another "
                           "caller (a thread's wait, completed or abort) took them; collect each request in one place")


def _check_params(params, name: str = "params", what: str = "a SamplingParams") -> SamplingParams:
    if params is None:
        return SamplingParams.default()
    if not isinstance(params, SamplingParams):
        raise ConfigError(f"{name} must be {what}, got {type(params).__name__} "
                          "(SamplingParams.from_dict turns a dict of options into one)")
    return params


def _params_list(params, n_prompts: int) -> list[SamplingParams]:
    """One SamplingParams (or None: the defaults) for every prompt, or a list of them, one per prompt."""
    if not isinstance(params, (list, tuple)):
        return [_check_params(params, what="a SamplingParams or a list of them, one per prompt")] * n_prompts
    if len(params) != n_prompts:
        raise ConfigError(f"params is a list of {len(params)} SamplingParams for {n_prompts} prompts; give one "
                          "per prompt, or one SamplingParams for all")
    return [_check_params(p, f"params[{i}]") for i, p in enumerate(params)]

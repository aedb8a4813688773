"""AsyncEngine: the engine behind asyncio, streaming each request's outputs (what a server sits on).

    engine = AsyncEngine(Engine(model, tokenizer))
    async for out in engine.generate("Once upon", params):   # a RequestOutput after each step
        print(out.outputs[0].text)

    rid = await engine.add_request("Once upon", params)      # a server: bad input raises here (HTTP 400) ...
    async for out in engine.stream(rid): ...                  # ... before the response starts streaming

One background task runs `Engine.step()` in a worker thread while any request is unfinished (the event
loop stays free to accept requests); requests are added and aborted between steps, on the loop, so the
engine's state is only ever changed by one thread at a time (a prompt may be tokenized beside a step:
Engine.encode only reads). Steps run on the AsyncEngine's own one-thread executor and prompts are encoded on
a separate bounded pool (`encode_threads`), neither of them the loop's default executor: there a burst of
long prompts queued the next step behind all of them (60 prompts of ~50 ms each: a running stream's step waited
~0.5 s, 2026-12), and so would anything else a server runs in the default executor. shutdown() closes both.

The next step is launched as soon as the last one's outputs are handed to the streams, before the streams
run: what a server does with an output (JSON, SSE framing, socket writes) then overlaps the step instead of
adding to it (it used to yield to the streams first; the engine then waited on the loop's work after every
step). Prompts are tokenized in a thread, outside the step lock, for the same reason.

A stream keeps only its request's newest output: each RequestOutput is a cumulative snapshot, so a slow
reader skips the ones it missed instead of queueing one per step, and the final one is never replaced.
Leaving a stream early (`break`, `aclose()`, a cancelled task or anyio cancel scope, as Starlette does when
a client disconnects, or closing or dropping it before its first output: `Stream`) aborts the request,
without awaiting anything: under a cancelled scope any await in the cleanup would raise again before the
abort ran. When no step is running the abort is immediate; otherwise it is applied before the next step.

A step that raises fails every running stream with an EngineError (a new one per stream, caused by the
step's exception) and aborts its request; `shutdown()` stops taking requests and ends the running ones. A
request whose own input fails mid-generation (a logits processor that leaves no token allowed) is not the
engine's failure: Engine.step aborts it alone, its stream raises its lmforge.errors.RequestError (a user's
input error, a 4xx) and the other streams go on.
With a seed, a request's samples are those LLM.generate gives the same prompt (prompt i of a list:
`prompt_index=i`), so a server and `lmforge generate` agree.

Between rounds (an RL rollout server syncing the policy's weights): `await pause(mode)` stops admitting,
`await update_weights(...)` / `await reset_prefix_cache()` change the engine between steps, `await resume()`
admits again. While paused, add_request waits (it does not raise; a prompt is still tokenized, and bad input
raises once it is admitted) and runs its request after resume(); shutdown() ends the wait with EngineError.
What pause does to the requests already added (running or queued in the engine) is `mode`:
  "wait"  (default) they step on to their ends (at most `timeout` seconds, then the rest are aborted);
          pause returns once none is left and no step runs;
  "abort" they are aborted now (their streams end with finish_reason 'abort'), as vLLM's pause_generation
          does by default;
  "hold"  the step in flight ends and no other starts: they stay in the engine, frozen (their streams wait,
          their KV blocks stay held, abort still works), and step on after resume(). Their keys come from
          the current weights, so update_weights / reset_prefix_cache refuse while any is held.
update_weights and reset_prefix_cache need no pause first: each holds new requests back itself, waits for
the running ones to end (pause("abort") first to cut them), runs under the lock the step loop takes (never
beside a step, on the loop's thread: the copy blocks the loop for its duration), then admits again unless
pause() was called. They have Engine.update_weights' and Engine.reset_prefix_cache's arguments and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.outputs import RequestOutput, join_outputs
from lmforge.infer.request import checked_prompt_index, seed_for
from lmforge.infer.sampling import SamplingParams


class EngineError(RuntimeError):
    """The engine cannot serve this request: a step failed (`__cause__` is what it raised; the request was
    aborted) or the AsyncEngine was shut down. Not the user's input: a server's 500 or 503, not a 400."""


class Latest:
    """One request's newest output (or the error that ended it), and whether the reader has it yet."""

    def __init__(self, request=None):
        self.request = request  # the engine's Request it follows (an id may be reused once it is gone)
        # the newest output, or the delta outputs the reader has not taken yet, joined once when read (item)
        self._items: list[RequestOutput | BaseException] = []
        self.ready = asyncio.Event()
        self.taken = False  # a stream reads it (one per request)

    @property
    def item(self) -> RequestOutput | BaseException | None:
        if len(self._items) > 1:
            self._items = [join_outputs(self._items)]
        return self._items[-1] if self._items else None

    @property
    def final(self) -> bool:
        last = self._items[-1] if self._items else None
        return isinstance(last, BaseException) or (last is not None and last.finished)

    def put(self, item: RequestOutput | BaseException) -> None:
        """The newest output replaces one the reader has not taken, but a delta output
        (SamplingParams.output_kind='delta') joins it, so a slow reader still gets every piece (kept, and
        joined in one pass when read: joining at each put re-copied everything unread, O(k^2) k outputs behind)."""
        if not self.final:  # a finished output or an error ends the stream: nothing replaces it
            unread = (self.ready.is_set() and isinstance(self._items[-1], RequestOutput)
                      and isinstance(item, RequestOutput))
            delta = self.request is not None and self.request.params.output_kind == "delta"
            if unread and delta:
                self._items.append(item)
            else:
                self._items = [item]
            self.ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self.ready.wait()
        self.ready.clear()
        return self.item


class Stream:
    """What `AsyncEngine.stream` returns: an async iterator of the request's outputs. An async generator runs
    no cleanup when it is closed or dropped before its first `anext` (a response whose client left before it
    began), so the request ran to max_tokens and its output stayed held for good; this one leaves the request
    then too: at `aclose()`, or when it is garbage-collected unstarted (scheduled on the loop)."""

    def __init__(self, owner: "AsyncEngine", rid: str, latest: Latest):
        self._owner, self._rid, self._latest = owner, rid, latest
        self._outputs = owner._follow(rid, latest)
        self._started = False
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # made outside a loop: nothing to schedule a cleanup on
            self._loop = None

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> RequestOutput:
        self._started = True
        return await self._outputs.__anext__()

    async def aclose(self) -> None:
        if not self._started:  # (the generator's own cleanup never ran: it never started)
            self._started = True
            self._owner._leave(self._rid, self._latest)
        await self._outputs.aclose()

    def __del__(self) -> None:
        if not self._started and self._loop is not None:  # a collection may run in any thread: leave on the loop
            self._started = True
            try:
                self._loop.call_soon_threadsafe(self._owner._leave, self._rid, self._latest)
            except RuntimeError:  # the loop is closed: nothing runs the engine any more
                pass


class AsyncEngine:
    """encode_threads: threads tokenizing and validating prompts beside the steps (module docstring)."""

    def __init__(self, engine: Engine, *, encode_threads: int = 2):
        if not isinstance(encode_threads, int) or encode_threads < 1:
            raise LmforgeError(f"encode_threads must be an int >= 1, got {encode_threads!r}")
        self.engine = engine
        # threads start on first use; a step never waits behind an encode (nor behind the loop's default pool)
        self._step_pool = ThreadPoolExecutor(1, thread_name_prefix="lmforge-step")
        self._encode_pool = ThreadPoolExecutor(encode_threads, thread_name_prefix="lmforge-encode")
        self.streams: dict[str, Latest] = {}
        self._aborts: dict[str, object] = {}  # streams left while a step ran (id -> Request): aborted before the next
        self._stepping = False  # a step is running in the worker thread
        self._loop_task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None  # held while a step runs; made on the running loop
        self._closed = False  # shutdown() was called: no new requests
        self._paused = False  # pause() was called (resume() not yet): add_request waits
        self._holds = 0  # update_weights / reset_prefix_cache in progress: add_request waits
        self._holding = False  # pause("hold"): no step starts; the requests in the engine stay as they are
        self._gate: asyncio.Event | None = None  # set while add_request may go on (or after shutdown)

    async def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                          *, prompt_index: int = 0) -> str:
        """Queue a prompt and return its id; bad input (params, a prompt too long for the window, an id in
        use) raises here with nothing queued. Read its outputs with `stream(id)`, or `abort(id)` it: a
        request never streamed runs to its end and its last output stays held until one of the two (an
        abort of a request never streamed hands its output to the caller and frees the id).
        With params.seed, the samples are those of prompt `prompt_index` of LLM.generate with that seed
        (the seed is derived per prompt there: lmforge.infer.request.seed_for); errors name it ("prompt 3 has
        ..."); anything but an int >= 0 is refused (checked_prompt_index). After shutdown() this raises
        EngineError. While paused (pause(), update_weights) it waits for resume() before it queues the request
        (bad input then raises after resume)."""
        if self._closed:
            raise EngineError("this AsyncEngine was shut down: it takes no new requests")
        prompt_index = checked_prompt_index(prompt_index)
        if isinstance(params, SamplingParams) and params.seed is not None:
            params = params.derived(seed=seed_for(params.seed, prompt_index))
        text = prompt if isinstance(prompt, str) else None
        if text is not None and isinstance(params, SamplingParams | None):
            # a long prompt takes milliseconds to tokenize (12k GPT-2 tokens: 20 ms): in a thread, outside the
            # lock, so that streams and steps go on meanwhile (the engine checks the ids again, cheaply)
            prompt = await asyncio.get_running_loop().run_in_executor(
                self._encode_pool, self.engine.encode, text, params or SamplingParams.default(), prompt_index)
        return await self._queue(prompt, params, request_id, prompt_index, text)

    async def add_chat_request(self, conversation, params: SamplingParams | None = None,
                               request_id: str | None = None, *, template, prompt_index: int = 0,
                               **options) -> str:
        """Queue one conversation (OpenAI- or HF-style messages) rendered by `template` (a ChatTemplate; a
        checkpoint's is choose_template(tokenizer, recorded=checkpoint_chat_template(path))[0]) as add_request
        queues a prompt: rendered and tokenized on the encoding threads (lmforge.infer.chat_template.chat_request:
        the template's end-of-turn stops join params; options: add_generation_prompt, continue_final_message, tools,
        chat_template_kwargs), its seed that of conversation `prompt_index` of LLM.chat, its outputs' prompt the
        rendered text. Bad messages raise here (ConfigError / LmforgeError: a server's 400) with nothing queued."""
        if self._closed:
            raise EngineError("this AsyncEngine was shut down: it takes no new requests")
        prompt_index = checked_prompt_index(prompt_index)
        from lmforge.infer.chat_template import chat_request

        req = await asyncio.get_running_loop().run_in_executor(
            self._encode_pool, lambda: chat_request(self.engine.tokenizer, template, conversation, params,
                                                    index=prompt_index, **options))
        return await self._queue(req.prompt_token_ids, req.params, request_id, prompt_index, req.prompt)

    async def _queue(self, prompt, params, request_id: str | None, prompt_index: int, text: str | None) -> str:
        """add_request's second half: the request queued between steps (after a pause), its outputs' prompt `text`."""
        while True:
            await self._admission().wait()  # paused: until resume() (or shutdown)
            async with self._between_steps():
                if self._closed:  # (shut down while the prompt was tokenized, or while paused)
                    raise EngineError("this AsyncEngine was shut down: it takes no new requests")
                if not self._admitting():  # paused again while this waited for the lock
                    continue
                if request_id is not None and str(request_id) in self.streams:  # finished, its stream not read
                    raise LmforgeError(f"request id {str(request_id)!r} is already in use; pass another request_id")
                self._apply_aborts()  # a stream left with this id a moment ago must not abort the new request
                if request_id is None:  # not the id of a finished request whose output is still held
                    request_id = self.engine.free_request_id(taken=self.streams)
                rid = self.engine.add_request(prompt, params, request_id, prompt_index=prompt_index)
                self.engine.requests[rid].prompt = text  # (the outputs' prompt: the text, as if it had been passed)
                self.streams[rid] = Latest(self.engine.requests[rid])
                break
        self._start()
        return rid

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The outputs of a request added with `add_request`: after each step its newest snapshot (the
        ones a slow reader missed are skipped), the last one `finished`. An engine failure raises here
        (EngineError), and so does the request's own failed input (lmforge.errors.RequestError)."""
        latest = self.streams.get(str(request_id))
        if latest is None or latest.taken:
            raise LmforgeError(f"no request {request_id!r} to stream: add it with add_request first (each "
                               "request is streamed once)")
        latest.taken = True
        return Stream(self, str(request_id), latest)

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       *, prompt_index: int = 0) -> AsyncIterator[RequestOutput]:
        """add_request + stream in one (bad input raises at the first `anext`)."""
        rid = await self.add_request(prompt, params, request_id, prompt_index=prompt_index)
        outs = self.stream(rid)
        try:
            async for out in outs:
                yield out
        finally:  # never suspends: the inner stream's cleanup awaits nothing
            await outs.aclose()

    async def abort(self, request_id: str) -> RequestOutput:
        """Stop a request and return its output so far. Its stream, if one reads it, ends with that output;
        a request nobody streams is released: the caller has its output (every delta not read, joined) and
        the id is free again. A request that already finished is left as it is and its final output
        returned (a no-op, as vLLM's: a server's abort often races the last step), and released if nobody
        streams it; one a failed step ended raises its stream's EngineError. An id never added (or
        released) raises LmforgeError."""
        rid = str(request_id)
        async with self._between_steps():
            latest = self.streams.get(rid)
            if rid not in self.engine.requests and latest is not None and latest.final:
                if not latest.taken:
                    del self.streams[rid]
                if isinstance(latest.item, BaseException):
                    raise _engine_error(rid, latest.item)
                return latest.item
            out = self.engine.abort(rid)
            if latest is not None:
                latest.put(out)
                if not latest.taken:  # nobody reads it: the output goes to the caller (it used to stay held)
                    del self.streams[rid]
                    return latest.item
        return out

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop taking requests (add_request raises EngineError), give the running ones up to `timeout`
        seconds to finish, then abort the rest: their streams end with a finished output whose samples read
        finish_reason 'abort' (a server sends it and closes the response). Returns once no step runs.
        A paused engine's waiting add_request calls raise EngineError; requests held by pause("hold") step
        on within the timeout like the others."""
        self._closed = True
        self._open_gate()
        self._holding = False
        if timeout > 0:
            self._start()
        task = self._loop_task
        if timeout > 0 and task is not None and not task.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        async with self._between_steps():
            self._abort_all()
        if task is not None:
            await task
        # no step runs now; encodes still queued finish (their add_request raises EngineError: _closed)
        self._step_pool.shutdown(wait=False)
        self._encode_pool.shutdown(wait=False)

    # between rounds: pause / resume, weights, prefix cache -------------------------------------------
    @property
    def paused(self) -> bool:
        """pause() was called and resume() not yet (add_request waits)."""
        return self._paused

    async def pause(self, mode: str = "wait", timeout: float | None = None) -> None:
        """Stop admitting requests without shutting down: add_request waits until resume(). The requests
        already added (mode, module docstring): "wait" lets them run to their ends (at most `timeout`
        seconds, None: no limit; then the rest are aborted), "abort" aborts them now, "hold" freezes them
        in the engine until resume(). Returns once no step runs (and, but for "hold", no request is left).
        Calling it again while paused changes the mode (e.g. "abort" after "hold" ends the held ones)."""
        if mode not in ("wait", "abort", "hold"):
            raise LmforgeError(f"pause(mode={mode!r}): give 'wait' (running requests finish), 'abort' (they are "
                               "aborted) or 'hold' (they stay, frozen, until resume())")
        self._paused = True
        self._open_gate()
        if mode == "hold":
            self._holding = True
            async with self._between_steps():  # the step in flight ends; the loop sees _holding before the next
                return
        self._holding = False
        await self._finish_running(0.0 if mode == "abort" else timeout)

    async def resume(self) -> None:
        """Admit requests again (those waiting in add_request are queued) and step on the held ones."""
        self._paused = self._holding = False
        self._open_gate()
        self._start()  # (returns at once when no request is left)

    async def update_weights(self, weights=None, *, partial: bool = False) -> None:
        """Engine.update_weights between steps (same arguments): new requests wait meanwhile, the running
        ones finish first (on the old weights), then the weights are copied and the prefix cache dropped
        under the step lock; requests after it see only the new weights. Refused (LmforgeError) while
        pause("hold") holds requests."""
        await self._between_requests("update_weights", self.engine.update_weights, weights, partial=partial)

    async def reset_prefix_cache(self) -> None:
        """Engine.reset_prefix_cache between steps, as update_weights (running requests finish first)."""
        await self._between_requests("reset_prefix_cache", self.engine.reset_prefix_cache)

    async def _between_requests(self, what: str, fn, *args, **kwargs) -> None:
        """fn(*args, **kwargs) on the loop under the step lock, once no request is left; admissions held
        meanwhile (restored after, unless pause() holds them)."""
        self._holds += 1
        self._open_gate()
        try:
            if not self._holding:
                await self._finish_running(None)
            async with self._between_steps():
                if self._holding and self.engine.has_unfinished():
                    raise LmforgeError(f"{what}: {len(self.engine.requests)} request(s) are held by pause('hold') "
                                       "with keys from the current weights; resume() them, or pause('wait') or "
                                       "pause('abort') first")
                fn(*args, **kwargs)  # (Engine refuses if a request were left: nothing can add one now)
        finally:
            self._holds -= 1
            self._open_gate()

    async def _finish_running(self, timeout: float | None) -> None:
        """Step the requests in the engine to their ends (None: no limit; else at most timeout seconds, then
        those left are aborted); returns with no step running. Admissions must be held (else it may never
        end). (engine.requests is not read here: off the lock a step may be changing it.)"""
        if timeout is None or timeout > 0:
            self._start()  # (a loop task with nothing left returns at once)
            task = self._loop_task
            if timeout is None:
                await asyncio.shield(task)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), timeout)
        async with self._between_steps():
            if timeout is not None:
                self._abort_all()

    def _abort_all(self) -> None:
        """Abort every request in the engine (between steps); their streams get the 'abort' outputs."""
        for rid in list(self.engine.requests):
            out = self.engine.abort(rid)
            latest = self.streams.get(rid)
            if latest is not None:
                latest.put(out)

    def _admitting(self) -> bool:
        return not self._paused and not self._holds

    def _admission(self) -> asyncio.Event:
        """Set while add_request may queue (or after shutdown, to raise); made on the running loop."""
        if self._gate is None:
            self._gate = asyncio.Event()
            self._open_gate()
        return self._gate

    def _open_gate(self) -> None:
        """The admission event follows the state (paused, holds, closed)."""
        if self._gate is not None:
            if self._closed or self._admitting():
                self._gate.set()
            else:
                self._gate.clear()

    def stats(self) -> dict:
        """Engine.stats() (KV blocks in use, prefix hits, preemptions, the queue: requests, waiting, running)
        and the streams open or holding a finished output, what a server's /metrics shows. Read on the loop
        while a step may run: a moment's counts, not a consistent snapshot of one step."""
        return {**self.engine.stats(), "streams": len(self.streams)}

    async def _follow(self, rid: str, latest: Latest) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await latest.get()
                if isinstance(item, BaseException):  # one error for all streams: each raises its own
                    raise _engine_error(rid, item)
                if item.error is not None:  # its own input failed (Engine.step aborted it alone)
                    raise item.error
                yield item
                if item.finished:
                    return
        finally:  # nothing here may await (see the module docstring)
            self._leave(rid, latest)

    def _leave(self, rid: str, latest: Latest) -> None:
        """A stream was left: drop its held output and abort its request if it still runs (on the loop)."""
        if self.streams.get(rid) is latest:
            del self.streams[rid]
        if self.engine.requests.get(rid) is latest.request:  # still running (not a later one with its id)
            if self._stepping:
                self._aborts[rid] = latest.request
            else:
                self.engine.abort(rid)

    def _apply_aborts(self) -> None:
        """Abort the requests whose streams were left during a step (only between steps)."""
        while self._aborts:
            rid, request = self._aborts.popitem()
            if self.engine.requests.get(rid) is request:
                self.engine.abort(rid)

    def _between_steps(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._between_steps():
                self._apply_aborts()
                if not self.engine.has_unfinished() or self._holding:  # (pause("hold"): resume() starts it)
                    return
                self._stepping = True
                try:
                    step = self._step_pool.submit(self.engine.step)
                    outs = await asyncio.shield(asyncio.wrap_future(step, loop=loop))
                except asyncio.CancelledError:  # (the loop closing) the thread steps on: the engine is its own
                    # until it ends, then the streams' aborts apply. Waited for here, blocking the loop for the
                    # rest of one step: a closing loop runs no callback once asyncio.run is done, and asyncio.run
                    # waits for the threads of its default executor only, not for this one's
                    futures.wait([step])
                    self._step_ended(step)
                    raise
                except Exception as e:  # any failure of a step: delivered to the streams, not lost in the task
                    self._stepping = False
                    self._fail(e)
                    return
                self._stepping = False
            for out in outs:  # handed over, not read yet: the streams run while the next step does (docstring)
                latest = self.streams.get(out.request_id)
                if latest is not None:
                    latest.put(out)
            # no yield here; requests added meanwhile wait on the lock, which is fair: they come first

    def _step_ended(self, step: futures.Future) -> None:
        """A step that outlived its cancelled loop task ended: the engine is the loop's again."""
        self._stepping = False
        if step.exception() is not None:
            self._fail(step.exception())
        self._apply_aborts()

    def _fail(self, error: Exception) -> None:
        """A step raised: a genuine engine failure, so every running request gets the error and is aborted,
        leaving the engine empty for the requests that come after."""
        failed = list(self.engine.requests)
        for rid in failed:
            if rid in self.streams:
                self.streams[rid].put(error)
        for rid in failed:
            self.engine.abort(rid)


def _engine_error(rid: str, error: BaseException) -> EngineError:
    """What a stream of a request that a failed step ended raises (a new one each time, caused by the step's)."""
    err = EngineError(f"the engine failed in a step ({type(error).__name__}: {error}); request {rid!r} was aborted")
    err.__cause__ = error
    return err

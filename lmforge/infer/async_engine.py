"""AsyncEngine: the engine behind asyncio, streaming each request's outputs (what a server sits on).

    engine = AsyncEngine(Engine(model, tokenizer))
    async for out in engine.generate("Once upon", params):   # a RequestOutput after each step
        print(out.outputs[0].text)

    rid = await engine.add_request("Once upon", params)      # a server: bad input raises here (HTTP 400) ...
    async for out in engine.stream(rid): ...                  # ... before the response starts streaming

One background task runs `Engine.step()` in a worker thread while any request is unfinished (the event
loop stays free to accept requests); requests are added and aborted between steps, on the loop, so the
engine is only ever touched by one thread at a time.

A stream keeps only its request's newest output: each RequestOutput is a cumulative snapshot, so a slow
reader skips the ones it missed instead of queueing one per step, and the final one is never replaced.
Leaving a stream early (`break`, `aclose()`, a cancelled task or anyio cancel scope, as Starlette does when
a client disconnects) aborts the request, without awaiting anything: under a cancelled scope any await in
the cleanup would raise again before the abort ran. When no step is running the abort is immediate;
otherwise it is applied before the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine
from lmforge.infer.outputs import RequestOutput
from lmforge.infer.sampling import SamplingParams


class Latest:
    """One request's newest output (or the error that ended it), and whether the reader has it yet."""

    def __init__(self, request=None):
        self.request = request  # the engine's Request it follows (an id may be reused once it is gone)
        self.item: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()
        self.taken = False  # a stream reads it (one per request)

    @property
    def final(self) -> bool:
        return isinstance(self.item, BaseException) or (self.item is not None and self.item.finished)

    def put(self, item: RequestOutput | BaseException) -> None:
        if not self.final:  # a finished output or an error ends the stream: nothing replaces it
            self.item = item
            self.ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self.ready.wait()
        self.ready.clear()
        return self.item


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.streams: dict[str, Latest] = {}
        self._aborts: dict[str, object] = {}  # streams left while a step ran (id -> Request): aborted before the next
        self._stepping = False  # a step is running in the worker thread
        self._loop_task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None  # held while a step runs; made on the running loop

    async def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Queue a prompt and return its id; bad input (params, a prompt too long for the window, an id in
        use) raises here with nothing queued. Read its outputs with `stream(id)`, or `abort(id)` it: a
        request never streamed runs to its end and its last output stays held until one of the two."""
        async with self._between_steps():
            if request_id is not None and str(request_id) in self.streams:  # finished, its stream not read
                raise LmforgeError(f"request id {str(request_id)!r} is already in use; pass another request_id")
            self._apply_aborts()  # a stream left with this id a moment ago must not abort the new request
            if request_id is None:  # not the id of a finished request whose output is still held
                request_id = self.engine.free_request_id(taken=self.streams)
            rid = self.engine.add_request(prompt, params, request_id)
            self.streams[rid] = Latest(self.engine.requests[rid])
        self._start()
        return rid

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The outputs of a request added with `add_request`: after each step its newest snapshot (the
        ones a slow reader missed are skipped), the last one `finished`. An engine failure raises here."""
        latest = self.streams.get(str(request_id))
        if latest is None or latest.taken:
            raise LmforgeError(f"no request {request_id!r} to stream: add it with add_request first (each "
                               "request is streamed once)")
        latest.taken = True
        return self._follow(str(request_id), latest)

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """add_request + stream in one (bad input raises at the first `anext`)."""
        rid = await self.add_request(prompt, params, request_id)
        outs = self.stream(rid)
        try:
            async for out in outs:
                yield out
        finally:  # never suspends: the inner stream's cleanup awaits nothing
            await outs.aclose()

    async def abort(self, request_id: str) -> RequestOutput:
        """Stop a request and return its output so far; a request that finished before anyone streamed it
        is released (its held output returned)."""
        async with self._between_steps():
            held = self.streams.get(str(request_id))
            if str(request_id) not in self.engine.requests and held is not None and not held.taken \
                    and isinstance(held.item, RequestOutput) and held.item.finished:
                return self.streams.pop(str(request_id)).item
            out = self.engine.abort(request_id)
        latest = self.streams.get(out.request_id)
        if latest is not None:
            latest.put(out)
        return out

    async def _follow(self, rid: str, latest: Latest) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await latest.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:  # nothing here may await (see the module docstring)
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
                if not self.engine.has_unfinished():
                    return
                self._stepping = True
                try:
                    outs = await loop.run_in_executor(None, self.engine.step)
                except Exception as e:  # any failure of a step: delivered to the streams, not lost in the task
                    self._fail(e)
                    return
                finally:
                    self._stepping = False
            for out in outs:
                latest = self.streams.get(out.request_id)
                if latest is not None:
                    latest.put(out)
            await asyncio.sleep(0)  # let streams read and new requests arrive between steps

    def _fail(self, error: Exception) -> None:
        """A step raised: a genuine engine failure, so every running request gets the error and is aborted,
        leaving the engine empty for the requests that come after."""
        failed = list(self.engine.requests)
        for rid in failed:
            if rid in self.streams:
                self.streams[rid].put(error)
        for rid in failed:
            self.engine.abort(rid)

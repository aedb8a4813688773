"""AsyncEngine: the engine behind asyncio, streaming each request's outputs (what a server sits on).

    engine = AsyncEngine(Engine(model, tokenizer))
    async for out in engine.generate("Once upon", params):   # RequestOutput after every step
        print(out.outputs[0].text)

One background task runs `Engine.step()` in a worker thread while any request is unfinished (the event
loop stays free to accept requests); requests are added and aborted between steps, on the loop, so the
engine is only ever touched by one thread at a time. Closing the stream early (leave the `async for`
inside `contextlib.aclosing(...)`, as a server does when a client disconnects) aborts the request.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from lmforge.infer.engine import Engine
from lmforge.infer.outputs import RequestOutput
from lmforge.infer.sampling import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.queues: dict[str, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None
        self._lock: asyncio.Lock | None = None  # held while a step runs; made on the running loop

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        async with self._between_steps():
            rid = self.engine.add_request(prompt, params, request_id)  # bad input raises here, nothing queued
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = queue
        self._start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.queues.pop(rid, None)
            if rid in self.engine.requests:
                async with self._between_steps():
                    if rid in self.engine.requests:
                        self.engine.abort(rid)

    async def abort(self, request_id: str) -> RequestOutput:
        async with self._between_steps():
            out = self.engine.abort(request_id)
        queue = self.queues.get(out.request_id)
        if queue is not None:
            queue.put_nowait(out)
        return out

    def _between_steps(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _start(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self.engine.has_unfinished():
            try:
                async with self._between_steps():
                    outs = await loop.run_in_executor(None, self.engine.step)
            except Exception as e:  # deliver the failure to every waiting stream
                for q in self.queues.values():
                    q.put_nowait(e)
                return
            for out in outs:
                q = self.queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
            await asyncio.sleep(0)  # let streams consume and new requests arrive between steps

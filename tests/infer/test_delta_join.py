"""A slow reader's delta outputs (SamplingParams.output_kind='delta') are joined once, when read: AsyncEngine's
Latest used to fold each new delta into the unread ones with RequestOutput.then, re-copying everything so far at
each step (O(k^2) for a reader k steps behind: 16k one-token deltas with logprobs took 5 s)."""

from __future__ import annotations

import asyncio
import functools
from types import SimpleNamespace

from lmforge.infer import outputs
from lmforge.infer.async_engine import Latest
from lmforge.infer.outputs import CompletionOutput, RequestOutput, join_outputs


def _delta(step: int, indexes=(0, 1), last: bool = False) -> RequestOutput:
    samples = [CompletionOutput(j, f"<{step}.{j}>", [step, j], "length" if last else None, [-0.5 * step],
                                [{step: -0.5}], -float(step), [step], "x" if last else None) for j in indexes]
    return RequestOutput("p", [1, 2] if step in (0, 9) else None, samples, {"step": step}, "r",
                         [None] if step == 0 else [{step: -1.0}], last)


def _fold(deltas):
    return functools.reduce(lambda a, b: a.then(b), deltas)


def test_join_outputs_is_the_fold_of_then_with_a_sample_missing_from_one_output():
    deltas = [_delta(s) for s in range(4)] + [_delta(4, (1,))] + [_delta(s) for s in range(5, 9)]
    deltas.append(_delta(9, last=True))
    joined = join_outputs(deltas)
    assert joined == _fold(deltas)
    # sample 0 is missing at step 4: its run starts over at step 5, as the fold gives
    assert joined.outputs[0].token_ids == [5, 0, 6, 0, 7, 0, 8, 0, 9, 0]
    assert joined.outputs[1].text == "".join(f"<{s}.1>" for s in range(10))
    assert joined.outputs[1].logprobs == [-0.5 * s for s in range(10)] and joined.outputs[1].stop_reason == "x"
    assert joined.prompt_token_ids == [1, 2] and joined.metrics == {"step": 9} and joined.finished
    assert joined.prompt_logprobs == [None] + [{s: -1.0} for s in range(1, 10)]
    assert join_outputs([deltas[0]]) is deltas[0]


def test_a_slow_readers_deltas_are_copied_once_not_at_every_step(monkeypatch):
    k = 400
    deltas = [_delta(s, (0,)) for s in range(k)]
    copied = []  # token ids copied into each joined sample
    made = CompletionOutput.__init__

    def counting(self, *args, **kwargs):
        made(self, *args, **kwargs)
        copied.append(len(self.token_ids))

    monkeypatch.setattr(outputs.CompletionOutput, "__init__", counting)
    latest = Latest(SimpleNamespace(params=SimpleNamespace(output_kind="delta")))
    for d in deltas:  # the reader reads none of them until the end
        latest.put(d)
    got = asyncio.run(latest.get())
    assert sum(copied) == 2 * k  # each token once (k^2 = 160000 when every put re-copied the unread ones)
    monkeypatch.setattr(outputs.CompletionOutput, "__init__", made)
    assert got == _fold(deltas)

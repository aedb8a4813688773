"""bench/engine_host.py runs on a CPU and its stub model drives the real engine loop."""

from __future__ import annotations

import pytest

from bench import engine_host


@pytest.mark.parametrize("kind", engine_host.KINDS)
def test_host_bench_times_every_phase(kind):
    row = engine_host.measure(batch=3, kind=kind, steps=2, vocab=64, sampling="seeded", prof=None)
    ms = row["ms"]
    assert set(ms) == set(engine_host.PHASES) | {"step"}
    assert all(ms[p] >= 0 for p in ("schedule", "prepare", "forward", "sample")) and ms["step"] > 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stub_engine_decodes_every_sequence_one_token_a_step(async_scheduling):
    engine, _ = engine_host.decoding_engine(4, 64, "greedy", async_scheduling=async_scheduling)
    before = [len(s.tokens) for s in engine.scheduler.running]
    engine.step(finished_only=True)
    assert [len(s.tokens) for s in engine.scheduler.running] == [n + 1 for n in before]
    assert engine.async_scheduling == (engine._pending is not None) == async_scheduling


def test_engine_bench_smoke_runs_every_engine_section(tmp_path, monkeypatch):
    """bench/engine.py --smoke (its CPU check) through every section that runs lmforge's engine: greedy agreement
    with full recompute, the offline, no-async, fixed-length, batch-1 and prefix-caching workloads and the profiled
    decode step. The script catches a failing section into an error row, so a stale call shows only there."""
    from pathlib import Path

    from bench import engine

    monkeypatch.syspath_prepend(str(Path(engine.__file__).parent))  # as a script: bench/profiling.py, its sibling
    monkeypatch.setenv("OUT", str(tmp_path))
    sections = "check,offline,sync,fixed,batch1,prefix,profile"
    rows = engine.main(["--smoke", "--shapes", "llama-1.1b", "--sections", sections])["variants"]
    assert len(rows) == 8 and not {k: r["error"] for k, r in rows.items() if "error" in r}
    assert rows["llama-1.1b/check: engine greedy vs full recompute"]["greedy_agreement"] == 1.0
    assert all(r["tok_s"] > 0 for k, r in rows.items() if "tok_s" in r)

"""Where the GPU time goes: a kernel table for a few calls of a function (torch.profiler, CUDA activity), and
the one-time costs (Triton compilations, CUDA-graph captures) inside a timed block.

    from profiling import host_table, kernel_table
    print(kernel_table(lambda: step(), calls=5))
    print(host_table(lambda: step()))      # host enqueue time and the CUDA runtime calls (syncs show here)

Rows are kernels grouped by name with their GPU time per call of `fn`, launches per call and share of the
total; a last line compares the summed kernel time with the wall time per call (the difference is time
the GPU sat idle: launch latency, host work, synchronisation).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch


def kernel_table(fn: Callable[[], object], calls: int = 5, rows: int = 25, width: int = 90) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / calls
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    total = sum(t for t, _ in kernels.values()) / calls  # microseconds per call
    lines = [f"{'kernel':<{width}} {'us/call':>9} {'launches':>8} {'share':>6}"]
    for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:rows]:
        short = name if len(name) <= width else name[:width - 3] + "..."
        lines.append(f"{short:<{width}} {t / calls:>9.1f} {n / calls:>8.1f} {t / calls / max(total, 1e-9):>6.1%}")
    launches = sum(n for _, n in kernels.values()) / calls
    lines.append(f"GPU kernel time {total / 1e3:.3f} ms/call in {launches:.0f} kernels; wall {wall * 1e3:.3f} ms/call "
                 f"(GPU busy {total / 1e6 / wall:.0%})")
    return "\n".join(lines)


def host_table(fn: Callable[[], object], calls: int = 3, rows: int = 12) -> str:
    """The host side of `fn`: seconds for one call to return when started on an idle GPU (pure enqueue time
    when `fn` never waits for the GPU; about the GPU time when it does), and the CUDA runtime calls it makes
    (torch.profiler, CPU activity) with host microseconds and counts per call - a cudaStreamSynchronize,
    cudaMemcpy (not Async), cudaEventSynchronize or cudaFree inside `fn` is the host waiting for the GPU.
    The profiled block ends with one cudaDeviceSynchronize of its own."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    enqueue = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        enqueue.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    api: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda"):
            a = api.setdefault(e.name, [0.0, 0])
            a[0] += e.cpu_time_total
            a[1] += 1
    lines = [f"host: {min(enqueue) * 1e3:.2f} ms for one call to return from an idle GPU (min of {calls})",
             f"{'CUDA runtime call':<40} {'us/call':>10} {'count':>8}"]
    for name, (t, n) in sorted(api.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{name:<40} {t / calls:>10.1f} {n / calls:>8.1f}")
    return "\n".join(lines)


@contextlib.contextmanager
def one_time_costs(engine=None) -> Iterator[dict]:
    """What a timed block spends on first-use work rather than serving: Triton kernel variants compiled (or
    loaded from Triton's disk cache) - each new constexpr set or integer-argument specialisation is one -
    and, given an Engine, its decode CUDA graphs captured. Yields a dict filled on exit: triton_compiles,
    triton_compile_s, compiled (kernel name -> count), graph_captures, graph_capture_s. Triton versions
    without knobs.runtime's compile hooks report no compiles."""
    out = {"triton_compiles": 0, "triton_compile_s": 0.0, "compiled": {}, "graph_captures": 0, "graph_capture_s": 0.0}
    started: list[float] = []
    restore = []
    try:
        from triton import knobs

        rt = knobs.runtime
        old = (rt.jit_cache_hook, rt.jit_post_compile_hook)
    except (ImportError, AttributeError):
        rt = None
    if rt is not None:
        def before(**_):
            started.append(time.perf_counter())
            return None  # compile as usual

        def after(*, fn, **_):
            out["triton_compiles"] += 1
            out["compiled"][fn.name] = out["compiled"].get(fn.name, 0) + 1
            if started:
                out["triton_compile_s"] += time.perf_counter() - started.pop()

        rt.jit_cache_hook, rt.jit_post_compile_hook = before, after
        restore.append(lambda: (setattr(rt, "jit_cache_hook", old[0]), setattr(rt, "jit_post_compile_hook", old[1])))
    graphs = getattr(getattr(engine, "runner", None), "graphs", None)
    if graphs is not None:
        capture = graphs._capture

        def timed_capture(*a, **kw):
            t0 = time.perf_counter()
            try:
                return capture(*a, **kw)
            finally:
                out["graph_captures"] += 1
                out["graph_capture_s"] += time.perf_counter() - t0

        graphs._capture = timed_capture
        restore.append(lambda: delattr(graphs, "_capture"))
    try:
        yield out
    finally:
        for undo in restore:
            undo()

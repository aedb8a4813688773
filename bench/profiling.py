"""Where the GPU time goes: a kernel table for a few calls of a function (torch.profiler, CUDA activity).

    from profiling import kernel_table
    print(kernel_table(lambda: step(), calls=5))

Rows are kernels grouped by name with their GPU time per call of `fn`, launches per call and share of the
total; a last line compares the summed kernel time with the wall time per call (the difference is time
the GPU sat idle: launch latency, host work, synchronisation).
"""

from __future__ import annotations

import time
from typing import Callable

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

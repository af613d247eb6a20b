"""Where a benchmark case's time goes on the GPU: each implementation's kernels
(launches per call and device time per launch, from ``torch.profiler``) next
to its wall time per call, for the cases of ``python -m genfast bench`` whose
label contains one of the given strings, in the order ``--ops`` names them.

usage: python benchmarks/gpu_profile.py --ops FAMILY_OR_OP ... [--match TEXT ...] [--skip IMPL ...] [--calls N]

A call whose wall time is far above the sum of its kernels is bound by the
host (Python, launches, a sync); one whose kernels add up to it is bound by
the kernels, and the table says which.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def kernels(fn, calls: int, device: torch.device) -> tuple[float, list[tuple[str, float, float]]]:
    """(wall ms per call, [(kernel, launches per call, µs per launch)]), longest first.
    On the CPU the "kernels" are the top-level ATen ops and custom ops."""
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    wall = (time.perf_counter() - t0) / calls * 1e3
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        sync()
    total = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if gpu and e.device_type == torch.autograd.DeviceType.CUDA:
            t = total[e.name]
            t[0] += 1
            t[1] += e.device_time_total
        elif not gpu and e.cpu_parent is None:
            t = total[e.name]
            t[0] += 1
            t[1] += e.cpu_time_total
    rows = [(name, n / calls, us / n) for name, (n, us) in total.items()]
    return wall, sorted(rows, key=lambda r: -r[1] * r[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", nargs="+", required=True)
    p.add_argument("--match", nargs="+", default=[""], help="keep the cases whose label contains one of these")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], metavar="IMPL", help="implementations to leave out")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    device = torch.device(args.device)
    order = {name: i for i, name in enumerate(args.ops)}  # the cases in the order --ops names them
    cases = sorted(harness.collect(args.quick, device, args.ops),
                   key=lambda c: min(order.get(c.op, len(order)), order.get(c.family, len(order))))
    for case in cases:
        if not any(m in case.label for m in args.match):
            continue
        print(f"\n## {case.label}")
        try:
            impls = case.build()
        except Exception as e:  # a case whose inputs or baselines cannot be built here (diffusers missing...)
            print(f"  not built: {type(e).__name__}: {e}"[:300])
            continue
        for name, fn in impls.items():
            if name in args.skip:
                continue
            try:
                wall, rows = kernels(fn, args.calls, device)
            except Exception as e:  # a baseline that fails must not hide the others
                print(f"  {name}: failed: {type(e).__name__}: {e}"[:300])
                continue
            busy = sum(n * us for _, n, us in rows) / 1e3
            print(f"  {name}: wall {wall:.3f} ms/call, kernels {busy:.3f} ms/call")
            for kname, n, us in rows[:6]:
                print(f"      {n:5.2f} x {us:8.1f} us  {kname[:110]}")
        del impls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

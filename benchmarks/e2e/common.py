"""What the end-to-end pipelines share: timing a whole sampling loop, peak
memory, the result rows and the table printed for them.

A pipeline is timed as a whole (prefill + decode, or every denoising step),
not op by op: one warm-up run pays for lazy initialization and first-touch
pages, then the median of ``reps`` runs is reported. On a shared CPU the
numbers are noisy: read speedups measured in the same run, not across runs.
"""
from __future__ import annotations

import contextlib
import gc
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def training_errors(got, ref, exact) -> tuple[float, float]:
    """How far genfast's (got) and eager's (ref) fp32 training step land from the same
    step in fp64 (exact): each is (losses, parameters with gradients) after backward. The
    largest error of the losses and of each parameter's gradient, relative to the fp64
    value's scale (for a gradient that is zero but for rounding, an attention key bias,
    to 1e-5 of the largest gradient). Two networks forward and backward amplify fp32
    rounding (and activation-derivative sign flips at zero) to ~1e-2 of some gradients,
    in eager PyTorch as in genfast, so the fp64 step is the yardstick."""
    (losses, params), (losses_ref, params_ref), (losses_x, params_x) = got, ref, exact
    grads = [(p.grad, r.grad, x.grad) for p, r, x in zip(params, params_ref, params_x)]
    floor = 1e-5 * max(x.abs().max().item() for _, _, x in grads)

    def err(a, x, scale_floor=0.0):
        return ((a.double() - x).abs().max() / max(x.abs().max().item(), scale_floor)).item()

    out = []
    for pick in (0, 1):
        e = [err(pair[pick], pair[2]) for pair in zip(losses, losses_ref, losses_x)]
        e += [err(triple[pick], triple[2], floor) for triple in grads]
        out.append(max(e))
    return out[0], out[1]


def check_training(what: str, got, ref, exact) -> tuple[float, float]:
    """training_errors, and genfast's at most twice eager's (plus 1e-6): the project's
    accuracy rule, applied to a whole training step."""
    err, err_ref = training_errors(got, ref, exact)
    if not err <= 2 * err_ref + 1e-6:
        raise AssertionError(f"{what}: genfast's training step errs by {err:.2e} against fp64, eager's by "
                             f"{err_ref:.2e}: more than twice")
    return err, err_ref


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def full_fp32():
    """Correctness checks run with TF32 off: a TF32 convolution or matrix product
    turns the fused ops' last-bit differences into 1e-3 relative ones."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    # ru_maxrss is the process's high-water mark (KiB on Linux): on the CPU it only
    # grows, so a run reports how far it pushed the mark, a lower bound on its peak.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Timing:
    median_s: float
    peak_bytes: int  # CUDA: peak allocated in a warm-up run; CPU: growth of max RSS (see _rss_bytes)


def time_loop(fn: Callable[[], object], device: torch.device, reps: int = 3, warmup: int = 1) -> Timing:
    """Median wall time of ``fn()`` (one whole sampling loop) over ``reps`` runs."""
    return time_many({"": fn}, device, reps, warmup)[""]


def time_many(fns: dict[str, Callable[[], object]], device: torch.device, reps: int = 3,
              warmup: int = 1) -> dict[str, Timing]:
    """Median wall time of each loop, the repetitions interleaved round-robin so that a change
    in the load of a shared machine hits every implementation alike. Peak memory is taken
    over each one's warm-up run, one implementation at a time."""
    peaks = {}
    for name, fn in fns.items():
        gc.collect()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = _rss_bytes()
        for _ in range(warmup):
            fn()
        _sync(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_bytes() - base
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(statistics.median(times[name]), peaks[name]) for name in fns}


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call (a compile, or the time to the first sample)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@dataclass
class Row:
    pipeline: str
    case: str  # e.g. "batch 8"
    impl: str
    items: int  # tokens or images one loop produces
    unit: str  # "tok/s" or "img/s"
    timing: Timing
    first_s: float | None = None  # time to the first sample including compilation, where it applies
    note: str = ""

    @property
    def rate(self) -> float:
        return self.items / self.timing.median_s


def print_rows(rows: list[Row], title: str) -> None:
    """A plain table: rate, genfast's speedup over each row (genfast row first per case), memory."""
    print(f"\n{title}; {torch.get_num_threads()} CPU threads")
    print(f"{'case':<12} {'impl':<22} {'rate':>14} {'genfast x':>10} {'peak MiB':>9} {'first s':>8}  note")
    ref: dict[str, float] = {}
    for r in rows:
        if r.impl == "genfast":
            ref[r.case] = r.rate
        speedup = ref.get(r.case, float("nan")) / r.rate
        first = f"{r.first_s:8.2f}" if r.first_s is not None else f"{'':8}"
        # On the CPU a run that did not raise the process's RSS high-water mark shows "-".
        peak = f"{r.timing.peak_bytes / 2**20:>9.1f}" if r.timing.peak_bytes > 0 else f"{'-':>9}"
        print(f"{r.case:<12} {r.impl:<22} {r.rate:>10.3g} {r.unit:<3} {speedup:>10.2f} {peak} {first}  {r.note}")


def add_common_args(parser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on a machine "
                        "shared with other jobs, 1 avoids fork/join stalls that swamp small ops")


def apply_common_args(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)

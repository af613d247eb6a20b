"""The benchmark harness every family shares: the case format, timing, the
machine's copy and read bandwidth, and the reports (table, JSON, CSV, chart).

A family lives in ``benchmarks/bench_<family>.py`` and exposes
``cases(quick: bool, device: torch.device) -> list[Case]``; ``collect`` finds
every such module next to this file, so a new family needs no registration.
A ``Case`` allocates nothing until ``build()`` is called, so a full suite
holds one case's tensors at a time.

Timing: on CUDA ``triton.testing.do_bench`` (median, L2 flushed before each
run); on the CPU a ``time.perf_counter`` loop over single calls after
``CPU_WARMUP`` warm-up calls, median of the repetitions. Achieved bandwidth is
the bytes the op must move (``Case.nbytes``, counted by the family) over the
median time, for every implementation alike, and is compared with a plain
``dst.copy_(src)`` (a read and a write) and a plain ``src.sum()`` (a read)
measured in the same run.

``python -m genfast bench`` calls ``collect`` and ``run``;
``test_bench.py`` hands every family's cases to pytest-benchmark through
``pytest_params`` and ``run_benchmark``.
"""
from __future__ import annotations

import csv
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

BENCH_DIR = Path(__file__).resolve().parent
GENFAST = "genfast"  # the implementation every other one is compared with
CPU_WARMUP = 8  # the first calls pay for fresh pages of the outputs and lazy initialization
MIN_REPS, MAX_REPS = 5, 2000  # calls of tens of microseconds need thousands to settle
TARGET_S = 1.0  # time spent on the repetitions of one implementation, roughly
# Copies larger than the last-level cache, so they measure memory, not the cache:
# 512 MiB each way on the CPU, 1 GiB on the GPU.
COPY_BYTES = {"cpu": 512 << 20, "cuda": 1 << 30}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass(frozen=True)
class Case:
    """One benchmark case: one op, one mode, one size, one dtype.

    ``build()`` allocates the inputs and returns ``{impl name: callable}``;
    each callable runs the op once (forward, or forward and backward) on those
    inputs. ``impls`` names them in advance (``"genfast"`` first) so pytest can
    parametrize without allocating; ``compiled`` names those that
    ``torch.compile`` on their first call.
    """

    family: str  # the bench_<family>.py module
    op: str  # public op name, matched by --ops
    mode: str  # "fwd", "fwd+bwd", ...
    size: str  # label of the problem size, e.g. "4M"
    dtype: torch.dtype
    device: torch.device
    nbytes: int  # bytes the op must read and write at least
    footprint: int  # bytes of the tensors one call touches: decides cache residency
    impls: tuple[str, ...]
    build: Callable[[], dict[str, Callable[[], object]]]
    compiled: tuple[str, ...] = ("torch.compile",)
    backend: str = ""  # what runs genfast's side when it is not the op dispatch's pick (cpp/triton/reference)

    @property
    def name(self) -> str:
        return f"{self.op} {self.mode}"

    @property
    def label(self) -> str:
        return f"{self.name} {self.size} {DTYPE_NAMES.get(self.dtype, str(self.dtype))}"


# ---- discovery ---------------------------------------------------------------

def families() -> dict[str, object]:
    """Every ``bench_<family>.py`` module next to this file, imported, by family name."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return {p.stem[len("bench_"):]: importlib.import_module(p.stem) for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def collect(quick: bool, device: torch.device, ops: Iterable[str] | None = None) -> list[Case]:
    """The cases of every family; ``ops`` keeps those whose op or family is named."""
    cases = [c for module in families().values() for c in module.cases(quick, device)]
    if ops:
        wanted = set(ops)
        known = {c.op for c in cases} | {c.family for c in cases}
        unknown = sorted(wanted - known)
        if unknown:
            raise ValueError(f"unknown --ops {unknown}; known ops and families: {sorted(known)}")
        cases = [c for c in cases if c.op in wanted or c.family in wanted]
    return cases


# ---- the machine -------------------------------------------------------------

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def last_level_cache(device: torch.device) -> tuple[str, int | None]:
    """(name, bytes) of the cache a working set may live in: L3 of the CPU, L2 of the GPU."""
    if device.type == "cuda":
        return "L2", getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes[level] = int(text.rstrip("KMG")) * unit
    level = max(sizes, default=None)
    return (f"L{level}", sizes[level]) if level else ("cache", None)


def residency(case: Case) -> str:
    """Where the case's data lives between repetitions: the cache or DRAM."""
    if case.device.type == "cuda":
        return "DRAM"  # do_bench flushes L2 before every run
    name, size = last_level_cache(case.device)
    if size is None:
        return "?"
    return name if case.footprint <= size else "DRAM"


def genfast_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend genfast's default dispatch picks for these tensors."""
    return importlib.import_module("genfast.backends").select(device, dtype)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # not installed, or a broken install: report, don't fail
        out["triton"] = "not importable"
    import genfast

    out["genfast"] = genfast.__version__
    return out


# ---- timing ------------------------------------------------------------------

@dataclass
class Timing:
    median_s: float
    first_call_s: float  # includes torch.compile's compile and Triton's JIT
    reps: int | None  # None: do_bench chose


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_reps(estimate_s: float) -> int:
    return max(MIN_REPS, min(MAX_REPS, int(TARGET_S / max(estimate_s, 1e-9))))


def warm_up(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Run ``fn`` CPU_WARMUP times; return (first call's time, median of the others)."""
    times = []
    for _ in range(CPU_WARMUP):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def measure(fn: Callable[[], object], device: torch.device) -> Timing:
    """Median time of one call of ``fn`` on ``device``."""
    if device.type == "cuda":
        from triton.testing import do_bench  # lazily: the CPU path must not need triton

        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        first = time.perf_counter() - t0
        return Timing(do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3, first, None)
    first, estimate = warm_up(fn, device)
    reps = plan_reps(estimate)
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside the loop would land on one unlucky repetition
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(statistics.median(times), first, reps)


def copy_bandwidth(device: torch.device) -> dict:
    """GB/s of ``dst.copy_(src)`` over a buffer larger than the last-level cache (read + write)."""
    nbytes = COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # written once here so the timed copies do not fault pages in
    timing = measure(lambda: dst.copy_(src), device)  # the buffers go with the frame
    return {"bytes": 2 * nbytes, "median_ms": timing.median_s * 1e3, "gbps": 2 * nbytes / timing.median_s / 1e9}


def read_bandwidth(device: torch.device) -> dict:
    """GB/s of ``src.sum()`` over the same buffer size: a read stream with nothing written, the
    reference for ops that mostly read (decode attention reads the KV cache and writes a few rows)."""
    nbytes = COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    timing = measure(lambda: src.sum(), device)
    return {"bytes": nbytes, "median_ms": timing.median_s * 1e3, "gbps": nbytes / timing.median_s / 1e9}


def _compile_cache_hits() -> int | None:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    # a hit in AOTAutograd's cache skips inductor's (and its counter)
    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


# ---- running -----------------------------------------------------------------

def fresh_compile_state() -> None:
    """Forget earlier torch.compile results so each case compiles (and is timed) on its own."""
    torch._dynamo.reset()


def run_case(case: Case, copy_gbps: float, read_gbps: float,
             progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Time every implementation of ``case``; one row per implementation."""
    fresh_compile_state()
    fns = case.build()
    timings, cache_hit = {}, {}
    for impl in case.impls:
        progress(f"{case.label}: {impl}")
        hits = _compile_cache_hits()
        try:
            timings[impl] = measure(fns[impl], case.device)
        except Exception as e:  # a baseline that breaks (say, an inductor bug) must not end the run
            progress(f"{case.label}: {impl} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        progress(f"{case.label}: {impl} {timings[impl].median_s * 1e3:.4f} ms")  # kept in the log if the run is cut
        if impl in case.compiled and hits is not None:
            cache_hit[impl] = _compile_cache_hits() > hits
    del fns
    gc.collect()
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    if GENFAST not in timings:
        return []
    reference = timings[GENFAST].median_s
    rows = []
    for impl, t in timings.items():
        gbps = case.nbytes / t.median_s / 1e9
        rows.append({
            "family": case.family, "op": case.op, "mode": case.mode, "size": case.size,
            "dtype": DTYPE_NAMES.get(case.dtype, str(case.dtype)), "device": case.device.type,
            "impl": impl,
            "backend": (case.backend or genfast_backend(case.device, case.dtype)) if impl == GENFAST else "",
            "median_ms": t.median_s * 1e3, "reps": t.reps, "first_call_s": t.first_call_s,
            "compile_cache_hit": cache_hit.get(impl),
            "nbytes": case.nbytes, "gbps": gbps, "pct_copy": 100.0 * gbps / copy_gbps,
            "pct_read": 100.0 * gbps / read_gbps,
            "residency": residency(case),
            # how many times faster genfast is than this implementation
            "genfast_speedup": None if impl == GENFAST else t.median_s / reference,
        })
    return rows


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def environment(device: torch.device, copy: dict, read: dict, load_before: float | None) -> dict:
    cache_name, cache_bytes = last_level_cache(device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "device_name": device_name(device),
        "cache": cache_name, "cache_bytes": cache_bytes,
        # other processes on the CPU make every CPU number slower and noisier
        "threads": torch.get_num_threads(), "load_average_before": load_before,
        **versions(), "copy": copy, "read": read,
    }


def run(cases: list[Case], device: torch.device, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Measure the copy bandwidth, then every case; the report as a dict (what --json writes)."""
    load_before = load_average()
    if device.type == "cpu" and load_before is not None and load_before > 0.5:
        progress(f"warning: load average {load_before:.1f} before the run: other processes share the CPU")
    progress(f"copy and read bandwidth ({COPY_BYTES['cuda' if device.type == 'cuda' else 'cpu'] >> 20} MiB)")
    copy, read = copy_bandwidth(device), read_bandwidth(device)
    rows = []
    for i, case in enumerate(cases, 1):
        rows += run_case(case, copy["gbps"], read["gbps"], lambda s: progress(f"[{i}/{len(cases)}] {s}"))
    return {"environment": environment(device, copy, read, load_before), "rows": rows}


# ---- reports -----------------------------------------------------------------

COLUMNS = [  # (header, key, format)
    ("op", "name", "{}"), ("size", "size", "{}"), ("dtype", "dtype", "{}"), ("data in", "residency", "{}"),
    ("impl", "impl_label", "{}"), ("median ms", "median_ms", "{:.3f}"), ("GB/s", "gbps", "{:.1f}"),
    ("% copy", "pct_copy", "{:.0f}%"), ("% read", "pct_read", "{:.0f}%"), ("genfast ×", "genfast_speedup", "{:.2f}×"),
    ("1st call s", "first_call_s", "{:.2f}"),
]


def _cells(row: dict) -> list[str]:
    row = {**row, "name": f"{row['op']} {row['mode']}",
           "impl_label": f"{row['impl']} ({row['backend']})" if row["backend"] else row["impl"]}
    cells = ["" if row[key] is None else fmt.format(row[key]) for _, key, fmt in COLUMNS]
    if row["compile_cache_hit"]:
        cells[-1] += " cached"  # inductor's on-disk cache made this compile a fraction of a cold one
    return cells


def title(report: dict) -> str:
    env, copy = report["environment"], report["environment"]["copy"]
    cache = f"{env['cache']} {env['cache_bytes'] / 2**20:.0f} MiB" if env["cache_bytes"] else env["cache"]
    read = f", read {env['read']['gbps']:.1f} GB/s" if "read" in env else ""
    return (f"genfast {env['genfast']}, torch {env['torch']}, triton {env['triton']}\n"
            f"{env['device_name']}, {cache}; copy {copy['gbps']:.1f} GB/s ({copy['bytes'] >> 20} MiB moved){read}")


def print_table(report: dict, file=sys.stdout) -> None:
    """The report as a table: rich when installed, plain text otherwise."""
    rows, heads = report["rows"], [h for h, _, _ in COLUMNS]
    notes = ("GB/s: bytes the op must move / median time. % copy: of dst.copy_(src) in this run (read + "
             "write); % read: of src.sum() in this run (a read stream). "
             "genfast ×: this row's time / genfast's. 1st call: includes torch.compile / JIT.")
    cells = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title(report), file=file)
        def line(values):
            return "  ".join(v.rjust(w) if i >= 5 else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

        print(line(heads), file=file)
        for c in cells:
            print(line(c), file=file)
        print(notes, file=file)
        return
    table = Table(title=title(report), caption=notes)
    for i, h in enumerate(heads):
        table.add_column(h, justify="right" if i >= 5 else "left", no_wrap=i < 5)
    for i, (r, c) in enumerate(zip(rows, cells)):
        last = i + 1 == len(rows) or (rows[i + 1]["op"], rows[i + 1]["mode"], rows[i + 1]["size"],
                                      rows[i + 1]["dtype"]) != (r["op"], r["mode"], r["size"], r["dtype"])
        table.add_row(*c, end_section=last, style="bold" if r["impl"] == GENFAST else None)
    # a pipe reports 80 columns, and a terminal may be narrower than the table: rich then squeezes
    # the numeric columns to nothing. Never narrower than the cells (3 characters of rule and padding each).
    Console(file=file, width=max(sum(widths) + 3 * len(widths) + 1, Console(file=file).width)).print(table)


def markdown(report: dict) -> str:
    """The report as a Markdown table under a line naming the machine, date and versions (for RESULTS.md)."""
    env = report["environment"]
    load = env.get("load_average_before")
    lines = [f"{title(report).replace(chr(10), '; ')}; {env['date']}; {env['threads']} threads"
             + (f"; load average {load:.1f} before the run" if load is not None else ""), "",
             "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in report["rows"]:
        cells = _cells(r)
        if r["impl"] == GENFAST:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(report: dict, path: str | Path) -> None:
    Path(path).write_text(markdown(report))


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def write_csv(report: dict, path: str | Path) -> None:
    """One line per row, with the machine and the copy bandwidth on each so a file stands alone."""
    env = report["environment"]
    extra = {"device_name": env["device_name"], "copy_gbps": env["copy"]["gbps"], "read_gbps": env["read"]["gbps"],
             "date": env["date"],
             "torch": env["torch"], "triton": env["triton"], "genfast": env["genfast"]}
    rows = [{**r, **extra} for r in report["rows"]]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(extra))
        writer.writeheader()
        writer.writerows(rows)


def plot(report: dict, path: str | Path) -> None:
    """Bar chart of genfast's speedup over each baseline, per case (log scale, bars from 1×)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and GPU machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = [r for r in report["rows"] if r["impl"] != GENFAST]
    labels = list(dict.fromkeys(f"{r['op']} {r['mode']}\n{r['size']} {r['dtype']}" for r in rows))
    baselines = list(dict.fromkeys(r["impl"] for r in rows))
    speedup = {(f"{r['op']} {r['mode']}\n{r['size']} {r['dtype']}", r["impl"]): r["genfast_speedup"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.8))
    width = 0.8 / max(len(baselines), 1)
    for j, impl in enumerate(baselines):
        x = [i + (j - (len(baselines) - 1) / 2) * width for i in range(len(labels))]
        values = [speedup.get((label, impl), math.nan) for label in labels]
        bars = ax.bar(x, [v - 1 for v in values], width, bottom=1, label=f"vs {impl}")
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2g}×" for v in values], fontsize=7)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo <= t <= hi]
    ax.set_yticks(ticks, [f"{t:g}×" for t in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("genfast speedup (×, log scale)")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    env = report["environment"]
    ax.set_title(f"genfast {env['genfast']} on {env['device_name']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---- pytest-benchmark --------------------------------------------------------

def pytest_params(module) -> list:
    """``pytest.param(case, impl)`` for every implementation of a family's cases.

    The device is ``$GENFAST_BENCH_DEVICE`` (default: cuda if available); the
    quick cases unless ``GENFAST_BENCH_FULL=1``.
    """
    import pytest

    device = torch.device(os.environ.get("GENFAST_BENCH_DEVICE") or default_device())
    quick = os.environ.get("GENFAST_BENCH_FULL", "0") != "1"
    return [pytest.param(case, impl, id=f"{case.label.replace(' ', '-')}-{impl}")
            for case in module.cases(quick, device) for impl in case.impls]


def run_benchmark(benchmark, case: Case, impl: str) -> None:
    """Time one implementation with the pytest-benchmark fixture, warmed up as ``measure`` does."""
    fresh_compile_state()
    fn = case.build()[impl]
    if case.device.type == "cuda":
        inner = fn

        def fn():  # pytest-benchmark times on the host: wait for the kernels
            inner()
            torch.cuda.synchronize(case.device)

    first, estimate = warm_up(fn, case.device)
    benchmark.group = case.label  # compares genfast with its baselines in one table
    benchmark.extra_info.update(nbytes=case.nbytes, first_call_s=first, residency=residency(case))
    benchmark.pedantic(fn, rounds=plan_reps(estimate), iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = case.nbytes / median / 1e9

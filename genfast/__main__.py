"""``python -m genfast info | build | bench | demo``: versions and backends, the
ahead-of-time C++ build, the benchmarks (run from a source checkout) and the
demo on four tiny trained models (genfast/demo/)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# benchmarks/ is not installed with the package: it is found next to genfast/ in a checkout.
BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _harness():
    if not (BENCH_DIR / "harness.py").is_file():
        sys.exit(f"genfast bench: no benchmarks at {BENCH_DIR}; the benchmarks ship with the source "
                 "repository, not the installed package: run from a clone (pip install -e .)")
    sys.path.insert(0, str(BENCH_DIR))
    import harness

    return harness


def info(args) -> None:
    import torch

    import genfast

    print(f"python   {sys.version.split()[0]}")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton   {triton.__version__}")
    except Exception as e:  # absent or broken: say which
        print(f"triton   not importable ({type(e).__name__}: {e})")
    print(f"genfast  {genfast.__version__} ({Path(genfast.__file__).parent})")
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"cpu      {cpu}; {os.cpu_count()} cores, {torch.get_num_threads()} threads; ISA {isa}")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"gpu {i}    {p.name}; {p.total_memory / 2**30:.0f} GiB; sm_{p.major}{p.minor}")
    if not torch.cuda.is_available():
        print("gpu      none")
    print("backends:")
    for name, (live, reason) in genfast.backends().items():
        print(f"  {name:<10} {'live' if live else 'off '}  {reason}")


def build(args) -> None:
    from . import _build

    print(f"genfast: C++ CPU kernels built: {_build.build(verbose=args.verbose).__file__}")


def bench(args) -> None:
    import torch

    harness = _harness()
    device = torch.device(args.device) if args.device else harness.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("genfast bench: --device cuda, but torch sees no GPU")
    if args.e2e:  # whole sampling loops (benchmarks/e2e/), each printing its own table
        import e2e

        e2e.run(quick=True, device=device, names=args.ops or e2e.PIPELINES)
        return
    try:
        cases = harness.collect(args.quick, device, args.ops)
    except ValueError as e:
        sys.exit(f"genfast bench: {e}")
    report = harness.run(cases, device, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    harness.print_table(report)
    for path, write in ((args.json, harness.write_json), (args.csv, harness.write_csv),
                        (args.markdown, harness.write_markdown), (args.plot, harness.plot)):
        if path:
            write(report, path)
            print(f"wrote {path}")


def demo(args) -> None:
    import time

    import torch

    from .backends import backends
    from .demo import sample

    torch.set_num_threads(args.threads)
    live = {name for name, (ok, _) in backends().items() if ok}
    backend = "cpp" if "cpp" in live else "reference (the C++ build is unavailable: no speedup expected)"
    print(f"genfast demo: CPU, {torch.get_num_threads()} threads, genfast backend {backend}, seed {args.seed}; "
          "time per sampling run: the median of 3 rounds of >= 0.1 s")
    t0 = time.perf_counter()
    results = sample.run(args.out, seed=args.seed)
    sample.print_results(results)
    for r in results:
        for path in r.files:
            print(f"wrote {path}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    if not all(r.agree for r in results):
        sys.exit("genfast demo: genfast's samples differ from the reference's (see 'agree' above)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="genfast", description="fused kernels for fast sampling from generative models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and live backends").set_defaults(fn=info)
    p = sub.add_parser("build", help="compile the C++ CPU kernels ahead of time")
    p.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(fn=build)
    p = sub.add_parser("bench", help="benchmark genfast against eager PyTorch and torch.compile")
    p.add_argument("--quick", action="store_true", help="the small sizes in fp32 only")
    p.add_argument("--e2e", action="store_true",
                   help="whole sampling loops at quick sizes instead (--ops: decode diffusion vae gan)")
    p.add_argument("--ops", nargs="+", metavar="NAME", help="ops or families to run (default: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown (for benchmarks/RESULTS.md)")
    p.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of genfast's speedups")
    p.set_defaults(fn=bench)
    p = sub.add_parser("demo", help="sample four tiny trained models (VAE, GAN, DDPM, char GPT) with genfast "
                                    "and the reference; write images and text")
    p.add_argument("--out", default="genfast-demo", help="output folder (default ./genfast-demo)")
    p.add_argument("--seed", type=int, default=0)
    # The models are tiny (ops of microseconds): a thread fork/join costs more than it saves, and
    # on a loaded machine it stalls (tiny DDPM sampling: 4.3 s with 2 threads, 0.05 s with 1, on the
    # shared two-core dev machine).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.set_defaults(fn=demo)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()

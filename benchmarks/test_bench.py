"""Every family's benchmark cases (``bench_<family>.py``) under pytest-benchmark.

``pytest benchmarks --benchmark-only`` runs the quick cases on the default
device; ``GENFAST_BENCH_FULL=1`` runs all, ``GENFAST_BENCH_DEVICE=cpu`` picks
the device, ``-k`` selects (e.g. ``-k reparameterize``). Each case's
implementations share a benchmark group, so pytest-benchmark's table,
``--benchmark-save`` and ``--benchmark-compare`` set genfast beside its
baselines.
"""
import pytest

import harness


@pytest.mark.parametrize("case, impl", [p for module in harness.families().values()
                                        for p in harness.pytest_params(module)])
def test_bench(benchmark, case, impl):
    harness.run_benchmark(benchmark, case, impl)

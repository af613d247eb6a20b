"""The conv-block cases of ``python -m genfast bench`` under pytest-benchmark.

``pytest benchmarks --benchmark-only`` runs the quick cases on the default
device; ``GENFAST_BENCH_FULL=1`` runs all, ``GENFAST_BENCH_DEVICE=cpu`` picks
the device. Each case's implementations share a benchmark group, so
pytest-benchmark's table, ``--benchmark-save`` and ``--benchmark-compare``
set genfast beside its baselines.
"""
import pytest

import bench_conv
import harness


@pytest.mark.parametrize("case, impl", harness.pytest_params(bench_conv))
def test_conv(benchmark, case, impl):
    harness.run_benchmark(benchmark, case, impl)

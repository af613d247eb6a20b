"""The diffusion cases of ``python -m genfast bench`` under pytest-benchmark
(``pytest benchmarks --benchmark-only``; see test_bench_vae.py for the knobs)."""
import pytest

import bench_diffusion
import harness


@pytest.mark.parametrize("case, impl", harness.pytest_params(bench_diffusion))
def test_diffusion(benchmark, case, impl):
    harness.run_benchmark(benchmark, case, impl)

"""Backend selection, the C++ build's fallback, and the command line."""
import subprocess
import sys
import warnings

import pytest
import torch

import genfast
from genfast import _build, _ops


def test_backends_report_every_backend_with_a_reason():
    status = genfast.backends()
    assert set(status) == {"triton", "cpp", "reference"}
    for live, reason in status.values():
        assert isinstance(live, bool) and isinstance(reason, str) and reason
    assert status["reference"][0]


def test_use_backend_checks_its_argument_and_restores():
    with pytest.raises(ValueError, match="name"):
        with genfast.use_backend("cuda"):
            pass
    before = _ops.backends.forced()
    with genfast.use_backend("reference"):
        assert _ops.backends.forced() == "reference"
    assert _ops.backends.forced() == before


def test_default_selection():
    select = _ops.backends.select
    assert select(torch.device("cpu"), torch.float64) == "reference"
    expected_cpu = "cpp" if genfast.backends()["cpp"][0] else "reference"
    assert select(torch.device("cpu"), torch.float32) == expected_cpu
    assert select(torch.device("meta"), torch.float32) == "reference"


def test_failed_build_warns_once_and_falls_back_to_the_reference(monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'genfast_cpu': no compiler")

    monkeypatch.delenv("GENFAST_DISABLE_CPP", raising=False)
    monkeypatch.setattr(_build, "_status", None)
    monkeypatch.setattr(_build, "_load", broken)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        live, reason = _build.status()
    assert not live and "no compiler" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second query must not warn again
        assert _build.status() == (live, reason)
        assert _ops.backends.select(torch.device("cpu"), torch.float32) == "reference"
        z = genfast.reparameterize(torch.zeros(5), torch.zeros(5), seed=1)
    from genfast.reference.rng import normal_stream

    assert torch.equal(z, normal_stream(5, 1, 0, "cpu"))


def test_op_caches_its_choice_and_follows_the_forced_backend_and_the_build(monkeypatch):
    from genfast.diffusion import sampler_step_op as op

    x = torch.zeros(3)

    def expected(backend):
        return _ops.implementation(op.name, op.family, backend)

    default = op.implementation_for(x.device, x.dtype)
    assert default is expected(_ops.backends.select(x.device, x.dtype))
    assert op.implementation_for(x.device, x.dtype) is default
    assert op.implementation_for(x.device, torch.float64) is expected("reference")
    with genfast.use_backend("reference"):
        assert op.implementation_for(x.device, x.dtype) is expected("reference")
    assert op.implementation_for(x.device, x.dtype) is default
    monkeypatch.setattr(_build, "_status", (False, "the build failed (test)"))
    assert op.implementation_for(x.device, x.dtype) is expected("reference")
    monkeypatch.undo()
    assert op.implementation_for(x.device, x.dtype) is default


def test_cpp_library_is_vectorized_for_this_cpu():
    """at::vec silently compiles to scalar code without the ISA flags: look at the machine code."""
    live, reason = genfast.backends()["cpp"]
    if not live:
        pytest.skip(reason)
    register = {"avx512": "zmm", "avx2": "ymm"}.get(_build.cpu_capability())
    if register is None:
        pytest.skip("portable build: no vector ISA to check")
    try:
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(_build.library())],
                             capture_output=True, text=True, timeout=120).stdout
    except FileNotFoundError:
        pytest.skip("objdump is not installed")
    # The Philox rounds and the fp32 math of every kernel run on full-width registers.
    assert asm.count("vpmuludq %" + register) >= 40
    assert asm.count(register) >= 1000


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "genfast", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and "reference" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_replays_with_the_seed_tensor():
    mu = torch.randn(1000, device="cuda")
    logvar = torch.randn(1000, device="cuda")
    seed = torch.tensor(1, device="cuda")
    genfast.reparameterize(mu, logvar, seed=seed)  # compile the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = genfast.reparameterize(mu, logvar, seed=seed)
    for value in (5, 6):
        seed.fill_(value)
        graph.replay()
        torch.testing.assert_close(z, genfast.reparameterize(mu, logvar, seed=value), rtol=0, atol=0)

"""The end-to-end pipelines (benchmarks/e2e/) at tiny sizes: genfast's loop gives
the baseline's tokens, latents and images. Speed is measured by the benchmarks."""
import copy
import sys
from pathlib import Path

import pytest
import torch

import genfast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from conftest import HostReads
from e2e import common, decode, diffusion, gan, vae

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def one_thread_full_fp32():
    """Tiny models gain nothing from threads, and on a CPU shared with other jobs each op's
    fork/join can wait a whole scheduler slice (seconds per test instead of milliseconds).
    On a GPU, TF32 would swamp the differences the tests look for."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with common.full_fp32():
        yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_greedy_tokens_match_gpt_fast_loop(batch):
    model = decode.build_model(decode.TINY, DEVICE, seed=batch)
    prompt = torch.randint(0, decode.TINY.vocab, (batch, 7), device=DEVICE)
    ref = decode.generate_eager(model, prompt, 9)
    fast = decode.patched(model)  # as the benchmark runs it: on the CPU the Linear weights packed for oneDNN
    assert torch.equal(decode.generate_genfast(fast, prompt, 9), ref)
    assert all(p is q for p, q in zip(fast.parameters(), model.parameters()))


@pytest.mark.parametrize("cache", ["dynamic", "static", "genfast"])
def test_decode_greedy_tokens_match_hf_generate(cache):
    """HF's Llama with the benchmark model's weights, its own SDPA and caches or genfast.hf's."""
    pytest.importorskip("transformers")
    model = decode.build_model(decode.TINY, DEVICE, seed=4)
    hf = decode.build_hf_model(model, "genfast" if cache == "genfast" else "sdpa")
    prompt = torch.randint(0, decode.TINY.vocab, (2, 5), device=DEVICE)
    expected = decode.generate_hf(hf, prompt, 9, cache)
    assert torch.equal(decode.generate_genfast(model, prompt, 9), expected)
    genfast.patch(hf)
    assert torch.equal(decode.generate_hf(hf, prompt, 9, cache), expected)
    # with the shared weights HF's model is the same function, not merely the same argmax
    eager = decode.EagerCache(decode.TINY, 2, 5, torch.float32, DEVICE)
    eager.positions = torch.arange(5, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(hf(prompt).logits[:, -1:], model(prompt, eager.positions, eager.attend))


def test_diffusion_latents_match_diffusers_loop():
    pytest.importorskip("diffusers")
    unet, patched, sched = diffusion.build(diffusion.TINY, DEVICE)
    latents, text = diffusion.inputs(diffusion.TINY, 2, DEVICE, text_len=5)
    twin = genfast.schedulers.from_diffusers(sched)
    twin.set_timesteps(4)
    assert twin.fused  # else the genfast loop would run diffusers' own step
    ref = diffusion.sample_eager(unet, sched, latents, text, steps=4)
    got = diffusion.sample_genfast(patched, sched, latents, text, steps=4)
    diffusion.check_close(got, ref, "diffusion")


def test_vae_images_match_eager():
    pytest.importorskip("diffusers")
    model, patched = vae.build(vae.TINY, DEVICE)
    images = torch.rand(2, 3, 16, 16, device=DEVICE) * 2 - 1
    vae.check_close(vae.roundtrip_genfast(patched, images), vae.roundtrip_eager(model, images), "vae")


def test_gan_samples_match_eager():
    gen, patched = gan.build(DEVICE, nz=100, ngf=8)
    z = torch.randn(3, 100, 1, 1, device=DEVICE)
    gan.check_close(gan.sample(patched, z), gan.sample(gen, z), "gan")


def test_vae_training_step_matches_eager():
    pytest.importorskip("diffusers")
    model, patched = vae.build(vae.TINY, DEVICE)
    exact = vae.Trainer(copy.deepcopy(model).double().train(), vae.loss_eager)
    eager, fused = vae.Trainer(model.train(), vae.loss_eager), vae.Trainer(patched.train(), vae.loss_genfast)
    images = torch.rand(2, 3, 16, 16, device=DEVICE) * 2 - 1
    with common.full_fp32():
        vae.check_training(fused, eager, exact, images)
    fused.step(images), eager.step(images)  # the timed step runs too


def test_gan_training_step_matches_eager():
    models, patched, exact = gan.build_training(DEVICE, ngf=8, ndf=8)
    real = torch.rand(4, 3, 64, 64, device=DEVICE) * 2 - 1
    z = torch.randn(4, 100, 1, 1, device=DEVICE)
    eager, fused = gan.Trainer(*models), gan.Trainer(*patched)
    with common.full_fp32():
        gan.check_training(fused, eager, gan.Trainer(*exact), real, z)
    for net, net_ref in zip(patched, models):  # the fused BatchNorms updated their running statistics alike
        for b, b_ref in zip(net.buffers(), net_ref.buffers()):
            assert torch.allclose(b.float(), b_ref.float(), rtol=1e-5, atol=1e-6)
    fused.step(real, z), eager.step(real, z)


def test_diffusion_loop_after_the_first_reads_nothing_on_the_host():
    """The loop GraphedLoop captures (a second loop of the patched UNet and the twin
    scheduler) reads no tensor on the host: a CUDA graph can hold it whole."""
    _, patched, sched = diffusion.build(diffusion.TINY, DEVICE)
    latents, text = diffusion.inputs(diffusion.TINY, 2, DEVICE, text_len=5)
    twin = genfast.schedulers.from_diffusers(copy.deepcopy(sched))
    with torch.no_grad():
        diffusion.prepare_loop(twin, 3, latents.device)
        first = diffusion.loop_genfast(patched, twin, latents, text)
        diffusion.prepare_loop(twin, 3, latents.device)
        with HostReads() as mode:
            second = diffusion.loop_genfast(patched, twin, latents, text)
    assert mode.reads == []
    torch.testing.assert_close(second, first, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_diffusion_loop_captured_in_one_cuda_graph_matches_the_eager_loop():
    _, patched, sched = diffusion.build(diffusion.TINY, "cuda")
    latents, text = diffusion.inputs(diffusion.TINY, 2, "cuda", text_len=5)
    with common.full_fp32():
        ref = diffusion.sample_genfast(patched, sched, latents, text, 4)
        graphed = diffusion.GraphedLoop(patched, sched, latents, text, 4)
        for seed in (0, 1):  # a replay reads the latents copied in
            x = latents if seed == 0 else torch.randn_like(latents)
            want = ref if seed == 0 else diffusion.sample_genfast(patched, sched, x, text, 4)
            torch.testing.assert_close(graphed(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_tokens_match_eager():
    model = decode.build_model(decode.TINY, "cuda")
    prompt = torch.randint(0, decode.TINY.vocab, (3, 7), device="cuda")
    ref = decode.generate_eager(model, prompt, 9)
    assert torch.equal(decode.generate_genfast_graph(model, prompt, 9), ref)

"""The demo (genfast/demo/) at a tiny size: the committed weights load, genfast's
samples agree with the reference's, and the files are written. Needs neither
scikit-learn nor docutils (training only)."""
import struct
import sys
import zlib

import pytest
import torch

import genfast
from genfast.demo import models, sample


@pytest.fixture
def one_thread():
    """As the demo runs (python -m genfast demo --threads 1): tiny ops, no fork/join stalls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_demo_samples_agree_and_files_are_written(tmp_path, one_thread):
    results = sample.run(tmp_path, seed=3, sizes=sample.TINY)
    assert [r.name for r in results] == ["vae", "gan", "ddpm", "gpt"]
    for r in results:
        assert r.agree, f"{r.name}: {r.detail}"
        assert set(r.seconds) == {"genfast", "reference", "eager"} and min(r.seconds.values()) > 0
    for name in ("vae", "gan", "ddpm"):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", data[16:24])
        assert (width, height) == (2 * (8 * 4 + 2) + 2,) * 2  # 4 digits: a 2x2 grid of 32-pixel cells
    assert "sklearn" not in sys.modules and "docutils" not in sys.modules  # training-only data sources
    text = (tmp_path / "gpt.txt").read_text()
    rows = text.strip().split("\n\n----\n\n")
    assert len(rows) == sample.TINY.text_rows
    assert all(row.startswith(sample.PROMPT) and len(row) == len(sample.PROMPT) + sample.TINY.text_tokens
               for row in rows)


def test_image_results_compare_the_pixels():
    """The agreement check must see a wrong sample: the reference path and a perturbed one."""
    vae, _ = sample.load("vae")
    good = sample.sample_vae(vae, 3, seed=1)
    with genfast.use_backend("reference"):
        ref = sample.sample_vae(vae, 3, seed=1)
    assert (good - ref).abs().max() <= sample.IMAGE_ATOL
    other = sample.sample_vae(vae, 3, seed=2)  # another seed: other digits
    assert (other - ref).abs().max() > sample.IMAGE_ATOL


def test_png_round_trip():
    gray = torch.randint(0, 256, (5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = sample.png_bytes(gray)
    assert struct.unpack(">II", data[16:24]) == (7, 5)
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41:41 + idat_len])
    rows = [raw[y * 8:(y + 1) * 8] for y in range(5)]
    assert all(r[0] == 0 for r in rows)  # filter type "none"
    assert torch.equal(torch.tensor([list(r[1:]) for r in rows], dtype=torch.uint8), gray)


def test_ddpm_table_matches_the_training_schedule():
    ts, table = sample.ddpm_table(10)
    assert ts.tolist() == list(range(900, -1, -100))
    assert table.shape[0] == 10 and table.dtype == torch.float32
    abar = models.ddpm_alphas_cumprod()
    # row 0: x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) at t = 900
    from genfast.reference.diffusion import COEF
    assert table[0, COEF["ax"]].item() == pytest.approx(1 / abar[900].sqrt().item(), rel=1e-6)
    assert table[-1, COEF["pn"]].item() == 0.0  # no noise at t = 0


def test_gpt_rejects_a_sample_longer_than_its_context():
    gpt, ckpt = sample.load("gpt")
    with pytest.raises(ValueError, match="context"):
        sample.sample_gpt(gpt, ckpt["chars"], 1, gpt.context, seed=0)

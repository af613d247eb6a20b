"""sample_tokens on every backend, against HF-style sort-based filters written
here in fp64 (not the reference module): exact log-probabilities of every
draw, empirical frequencies of many draws (chi-square), the same tokens as the
reference for the same seed, penalties, ties, edge cases and bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import genfast
from genfast.reference import rng as ref_rng

from conftest import BACKENDS, DEVICE, assert_close

INF = math.inf
CONFIGS = {
    "plain": dict(),
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "top_k+top_p": dict(top_k=12, top_p=0.7, temperature=1.3),
    "all": dict(top_k=30, top_p=0.9, min_p=0.02, temperature=0.8),
}


def is_triton():
    return genfast._ops.backends.forced() == "triton"


def small_vocab(device, vocab):
    """The Triton interpreter runs a program per row in Python: keep its rows short."""
    if is_triton() and device == "cpu" and vocab > 4096:
        pytest.skip("real vocabulary sizes run on cpp/reference; the interpreter is too slow")


# ---- the oracle: HF transformers' processors, sort-based, fp64 -------------------

def hf_penalize(logits, prev_tokens, rep=1.0, presence=0.0, frequency=0.0):
    """RepetitionPenaltyLogitsProcessor, then OpenAI/vLLM presence and frequency penalties."""
    x = logits.double().clone()
    for r in range(x.shape[0]):
        ids = prev_tokens[r][prev_tokens[r] >= 0]
        if ids.numel() == 0:
            continue
        uniq, counts = ids.unique(return_counts=True)
        s = x[r, uniq]
        s = torch.where(s < 0, s * rep, s / rep)
        x[r, uniq] = s - presence - frequency * counts.double()
    return x


def hf_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The filtered distribution of each row: TopK, TopP, MinP warpers in HF's order."""
    logits = logits.double()
    # shifted by the max first (exact in fp64), so fp32 magnitudes near the limit do not overflow
    scores = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -INF)
    if top_p < 1:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= 1 - top_p
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, sorted_idx, remove), -INF)
    if min_p > 0:
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -INF)
    return scores.softmax(dim=-1)


def draw_many(logits_row, n, kw, device, seed=1234, chunk=512):
    """n draws from one row: a batch of copies, one uniform per row, several calls."""
    tokens, logprobs = [], []
    offset = 0
    while offset < n:
        b = min(chunk, n - offset)
        batch = logits_row.to(device).expand(b, -1).contiguous()
        t, lp = genfast.sample_tokens(batch, seed=seed, offset=offset, return_logprobs=True, **kw)
        tokens.append(t.cpu())
        logprobs.append(lp.cpu())
        offset += b
    return torch.cat(tokens), torch.cat(logprobs)


def chi_square_pvalue(tokens, probs):
    from scipy import stats

    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs * tokens.numel()
    big = expected >= 5  # Cochran's rule: lump the rare categories together
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return stats.chisquare(obs[keep].numpy(), exp[keep].numpy() * obs.sum().item() / exp[keep].sum().item()).pvalue


def logits_like_a_model(batch, vocab, generator=None, scale=3.0):
    return torch.randn(batch, vocab, generator=generator) * scale


# ---- distribution ----------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("vocab", [40, 32000, 128256])
def test_draws_follow_the_filtered_distribution(backend, config, vocab):
    small_vocab(backend, vocab)
    kw = CONFIGS[config]
    if vocab > 1000 and config in ("plain", "temperature", "top_p", "min_p"):
        kw = {**kw, "top_k": 50}  # a countable support; the large-support filters are checked by logprobs
    n = {40: 60 if is_triton() else 20000, 32000: 1000, 128256: 300}[vocab]
    row = logits_like_a_model(1, vocab, torch.Generator().manual_seed(vocab))
    probs = hf_probs(row, **kw)[0]
    tokens, logprobs = draw_many(row[0], n, kw, backend)
    assert probs[tokens].min() > 0, "a filtered-out token was drawn"
    # Every draw's log-probability is the exact filtered one: a wrong threshold changes Z.
    torch.testing.assert_close(logprobs.double(), probs[tokens].log(), rtol=0, atol=2e-4)
    if not is_triton():  # the interpreter draws too few; it is held to the reference's tokens instead
        assert chi_square_pvalue(tokens, probs) > 1e-4
    # The test has the power to see a wrong filter: one token too many in top-k fails it.
    if config == "top_k" and vocab == 40 and not is_triton():
        wrong = hf_probs(row, **{**kw, "top_k": kw["top_k"] + 1})[0]
        assert chi_square_pvalue(tokens, 0.97 * wrong + 0.03 * probs) < 1e-4


@pytest.mark.parametrize("vocab", [1, 7, 100, 1000, 32000, 128256, 151936])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_logprob_of_every_draw_is_exact(backend, vocab, config):
    small_vocab(backend, vocab)
    batch = 4 if vocab > 100000 or is_triton() else 9
    logits = logits_like_a_model(batch, vocab, torch.Generator().manual_seed(7))
    kw = CONFIGS[config]
    tokens, logprobs = genfast.sample_tokens(logits.to(backend), seed=5, offset=3, return_logprobs=True, **kw)
    probs = hf_probs(logits, **kw)
    p = probs.gather(1, tokens.cpu()[:, None])[:, 0]
    assert (p > 0).all()
    torch.testing.assert_close(logprobs.cpu().double(), p.log(), rtol=0, atol=2e-4)


def shaped_logits(shape, vocab, generator):
    """Rows whose top-p threshold is found the hard way: flat, a few heavy tokens over a tail,
    heavy tokens on a stride, one token far above the rest (at the start, inside, at the end)."""
    x = torch.randn(4, vocab, generator=generator)
    if shape == "flat":
        return x * 0.5
    if shape == "heavy-head":
        x = x * 2
        x[:, :5] += 12
    elif shape == "heavy-stride":
        x = x * 2
        x[:, 3::256] += 8
    elif shape == "spike":
        for r, at in enumerate([0, 17, vocab // 2 + 5, vocab - 1]):
            x[r, at] = 100.0
    elif shape == "spike-bf16":
        for r, at in enumerate([0, 17, vocab // 2 + 5, vocab - 1]):
            x[r, at] = 4.0 + r
        x = x.bfloat16()
    elif shape == "inf-tail":
        x = x * 3
        x[:, vocab // 3:] = -INF
    return x


def tie_inclusive_probs(logits, temperature=1.0, top_p=1.0, min_p=0.0):
    """The filtered distribution in fp64 with genfast's documented tie rule: every token tied
    with the top-p threshold is kept (a sort-based filter keeps some of them, by sort order;
    bf16 logits tie often)."""
    d = (logits.double().amax(-1, keepdim=True) - logits.double()) / temperature
    sd = d.sort(-1).values
    cum = torch.exp(-sd).cumsum(-1)
    first = (cum < top_p * cum[:, -1:]).sum(-1, keepdim=True).clamp(max=d.shape[-1] - 1)
    t = sd.gather(1, first).clamp(max=-math.log(min_p) if min_p > 0 else INF)
    e = torch.exp(-d) * (d <= t)
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("shape", ["flat", "heavy-head", "heavy-stride", "spike", "spike-bf16", "inf-tail"])
@pytest.mark.parametrize("kw", [dict(top_p=0.9), dict(top_p=0.5, min_p=0.001, temperature=0.7),
                                dict(top_p=0.99, temperature=0.05)], ids=["p0.9", "p0.5+min_p", "p0.99-cold"])
@pytest.mark.parametrize("vocab", [3001, 128256])
def test_top_p_on_shaped_rows(backend, shape, kw, vocab):
    small_vocab(backend, vocab)
    logits = shaped_logits(shape, vocab, torch.Generator().manual_seed(vocab))
    probs = tie_inclusive_probs(logits, **kw)
    if shape != "spike-bf16":  # no ties: the sort-based filter agrees
        torch.testing.assert_close(probs, hf_probs(logits, **kw), rtol=0, atol=1e-12)
    for seed in range(3):
        tokens, logprobs = genfast.sample_tokens(logits.to(backend), seed=seed, return_logprobs=True, **kw)
        p = probs.gather(1, tokens.cpu()[:, None])[:, 0]
        assert (p > 0).all(), f"a filtered-out token was drawn ({shape})"
        # fp32 sums over the kept tokens: 1e-4 of a far token's log-probability (the reference's own error)
        torch.testing.assert_close(logprobs.cpu().double(), p.log(), rtol=1e-4, atol=2e-4)


def test_per_row_parameters(backend):
    batch, vocab = 6, 300
    logits = logits_like_a_model(batch, vocab, torch.Generator().manual_seed(3))
    rows = [dict(temperature=0.5, top_k=3), dict(top_p=0.5), dict(min_p=0.3, temperature=2.0),
            dict(top_k=10, top_p=0.6), dict(temperature=0.0), dict()]
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    per_row = {name: [r.get(name, default) for r in rows] for name, default in full.items()}
    kw = {name: torch.tensor(v, device=backend) for name, v in per_row.items()}
    tokens, logprobs = genfast.sample_tokens(logits.to(backend), seed=9, return_logprobs=True, **kw)
    for r, row_kw in enumerate(rows):
        if row_kw.get("temperature", 1.0) == 0:
            assert tokens[r].item() == logits[r].argmax().item() and logprobs[r].item() == 0
            continue
        single, single_lp = genfast.sample_tokens(logits[r:r + 1].to(backend), seed=9, offset=r,
                                                  return_logprobs=True, **row_kw)
        assert tokens[r] == single[0]
        torch.testing.assert_close(logprobs[r], single_lp[0])
        p = hf_probs(logits[r:r + 1], **{**full, **row_kw})[0]
        assert abs(logprobs[r].item() - math.log(p[tokens[r].item()].item())) < 2e-4


@pytest.mark.parametrize("config", ["top_k", "top_p", "min_p"])
def test_ties_at_the_threshold_are_all_kept(backend, config):
    # values 5, 4, 4, 4, 3, 3, ...: top-k 2 keeps 5 and all three 4s
    logits = torch.tensor([[3.0, 4.0, 5.0, 4.0, 3.0, 1.0, 4.0, 0.0] * 2])[:, :8]
    kw = {"top_k": dict(top_k=2), "top_p": dict(top_p=0.5), "min_p": dict(min_p=math.exp(-1.0))}[config]
    tokens, logprobs = draw_many(logits[0], 60 if is_triton() else 400, kw, backend)
    kept = {2, 1, 3, 6}
    assert set(tokens.tolist()) == kept
    e = torch.tensor([math.e, 1.0, 1.0, 1.0])
    expected = {2: e[0] / e.sum(), 1: 1 / e.sum(), 3: 1 / e.sum(), 6: 1 / e.sum()}
    for t, lp in zip(tokens.tolist(), logprobs.tolist()):
        assert abs(lp - math.log(expected[t])) < 1e-5


# ---- penalties -------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [50, 32000])
def test_penalties_match_hf_and_vllm(backend, vocab):
    small_vocab(backend, vocab)
    g = torch.Generator().manual_seed(11)
    batch, n = 5, 40
    logits = logits_like_a_model(batch, vocab, g)
    prev = torch.randint(0, min(vocab, 30), (batch, n), generator=g)
    prev[:, -7:] = -1  # padding
    prev[0] = -1  # a row with nothing before it
    pen = dict(repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2)
    oracle = hf_penalize(logits, prev, rep=1.4, presence=0.3, frequency=0.2)
    greedy = genfast.sample_tokens(logits.to(backend), temperature=0, prev_tokens=prev.to(backend), **pen)
    assert torch.equal(greedy.cpu(), oracle.argmax(dim=-1))
    tokens, logprobs = genfast.sample_tokens(logits.to(backend), prev_tokens=prev.to(backend), seed=2,
                                             return_logprobs=True, **pen)
    p = hf_probs(oracle).gather(1, tokens.cpu()[:, None])[:, 0]
    torch.testing.assert_close(logprobs.cpu().double(), p.log(), rtol=0, atol=1e-4)


def test_penalties_per_row_and_int32_prev_tokens(backend):
    logits = logits_like_a_model(3, 64, torch.Generator().manual_seed(1))
    prev = torch.tensor([[1, 2, 2, -1], [5, 5, 5, 5], [63, 0, -1, -1]], dtype=torch.int32)
    rep = torch.tensor([1.0, 2.0, 1.5])
    freq = torch.tensor([0.5, 0.0, 1.0])
    out, lp = genfast.sample_tokens(logits.to(backend), prev_tokens=prev.to(backend), repetition_penalty=rep.to(backend),
                                    frequency_penalty=freq.to(backend), seed=3, return_logprobs=True)
    for r in range(3):
        oracle = hf_penalize(logits[r:r + 1], prev[r:r + 1].long(), rep=rep[r].item(), frequency=freq[r].item())
        p = hf_probs(oracle)[0, out[r].item()]
        assert abs(lp[r].item() - math.log(p.item())) < 1e-4


def counts_of(prev_tokens, vocab, dtype=torch.int64):
    """(batch, vocab) counts of each id in each row of prev_tokens (ids < 0 are padding), by a Python loop."""
    counts = torch.zeros(prev_tokens.shape[0], vocab, dtype=dtype)
    for r, row in enumerate(prev_tokens.tolist()):
        for t in row:
            if t >= 0:
                counts[r, t] += 1
    return counts


@pytest.mark.parametrize("vocab", [1, 61, 1031])
@pytest.mark.parametrize("counts_dtype", [torch.int64, torch.int32])
def test_token_counts_give_the_tokens_of_prev_tokens(backend, vocab, counts_dtype):
    g = torch.Generator().manual_seed(vocab)
    batch = 7
    logits = logits_like_a_model(batch, vocab, g)
    prev = torch.randint(-1, vocab, (batch, 50), generator=g)
    prev[:, :10] = prev[:, 10:20]  # repeats
    prev[2] = -1  # nothing before
    counts = counts_of(prev, vocab, counts_dtype)
    per_row = dict(repetition_penalty=torch.rand(batch, generator=g) + 0.7,
                   presence_penalty=torch.randn(batch, generator=g),
                   frequency_penalty=torch.rand(batch, generator=g))
    scalar = dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25)
    for pen in (scalar, per_row):
        pen = {k: v.to(backend) if isinstance(v, torch.Tensor) else v for k, v in pen.items()}
        for kw in (dict(temperature=0.0), dict(top_p=0.8, top_k=20, temperature=0.9)):
            a, lp_a = genfast.sample_tokens(logits.to(backend), prev_tokens=prev.to(backend), seed=6, offset=2,
                                            return_logprobs=True, **pen, **kw)
            b, lp_b = genfast.sample_tokens(logits.to(backend), token_counts=counts.to(backend), seed=6, offset=2,
                                            return_logprobs=True, **pen, **kw)
            assert torch.equal(a, b)
            assert torch.equal(lp_a, lp_b)
            # and both are HF's penalties
            for r in range(batch):
                rowpen = {k: (v[r].item() if isinstance(v, torch.Tensor) else v) for k, v in pen.items()}
                oracle = hf_penalize(logits[r:r + 1], prev[r:r + 1], rep=rowpen["repetition_penalty"],
                                     presence=rowpen["presence_penalty"], frequency=rowpen["frequency_penalty"])
                if kw["temperature"] == 0:
                    assert b[r].item() == oracle.argmax().item()
                else:
                    p = hf_probs(oracle, **kw)[0, b[r].item()]
                    assert abs(lp_b[r].item() - math.log(p.item())) < 1e-4


def test_token_counts_with_large_counts(backend):
    """Counts far beyond one repeat: the frequency penalty is frequency * count, once."""
    logits = logits_like_a_model(3, 40, torch.Generator().manual_seed(2))
    counts = torch.zeros(3, 40, dtype=torch.int64)
    counts[0, logits[0].argmax()] = 1000
    counts[1, 5] = 3
    out = genfast.sample_tokens(logits.to(backend), token_counts=counts.to(backend), frequency_penalty=0.01,
                                temperature=0)
    x = logits.clone()
    x[counts > 0] -= 0.01 * counts[counts > 0].float()
    assert torch.equal(out.cpu(), x.argmax(-1))


# ---- the noise stream and agreement between backends ----------------------------

def test_row_r_uses_the_uniform_at_offset_plus_r(backend):
    """With no filter, the token is the inverse CDF of rand(seed, offset + r) in vocabulary order."""
    logits = logits_like_a_model(16, 33, torch.Generator().manual_seed(2))
    tokens = genfast.sample_tokens(logits.to(backend), seed=77, offset=1000).cpu()
    u = ref_rng.uniform_stream(16, 77, 1000, "cpu").double()
    cdf = logits.double().softmax(-1).cumsum(-1)
    expected = (cdf <= u[:, None]).sum(-1)
    assert torch.equal(tokens, expected)


def test_same_seed_same_tokens_on_every_backend():
    logits = logits_like_a_model(12, 500, torch.Generator().manual_seed(4))
    prev = torch.randint(-1, 500, (12, 20), generator=torch.Generator().manual_seed(5))
    out = {}
    for name, device in BACKENDS:
        with genfast.use_backend(name):
            for cname, kw in CONFIGS.items():
                out[name, cname] = genfast.sample_tokens(logits.to(device), seed=21, offset=8, prev_tokens=prev.to(device),
                                                         repetition_penalty=1.2, **kw).cpu()
    for (name, cname), tokens in out.items():
        # an fp32 rounding difference at a CDF boundary may flip a row: a ~1e-6 event
        assert (tokens != out["reference", cname]).sum() <= 1, (name, cname)


def test_determinism_and_seed_tensor(backend):
    logits = logits_like_a_model(8, 200, torch.Generator().manual_seed(6)).to(backend)
    a = genfast.sample_tokens(logits, seed=5, top_p=0.9)
    assert torch.equal(a, genfast.sample_tokens(logits, seed=5, top_p=0.9))
    assert torch.equal(a, genfast.sample_tokens(logits, seed=torch.tensor(5, device=backend), top_p=0.9))
    assert not torch.equal(a, genfast.sample_tokens(logits, seed=5, offset=8, top_p=0.9))
    torch.manual_seed(0)
    b = genfast.sample_tokens(logits)
    torch.manual_seed(0)
    assert torch.equal(b, genfast.sample_tokens(logits))


# ---- edge cases ------------------------------------------------------------------

def test_vocab_of_one_and_a_single_finite_logit(backend):
    one = torch.randn(3, 1, device=backend)
    assert genfast.sample_tokens(one, seed=1, top_p=0.5, top_k=3).tolist() == [0, 0, 0]
    x = torch.full((4, 50), -INF)
    x[torch.arange(4), torch.tensor([0, 7, 49, 23])] = torch.randn(4)
    for kw in CONFIGS.values():
        t, lp = genfast.sample_tokens(x.to(backend), seed=3, return_logprobs=True, **kw)
        assert t.tolist() == [0, 7, 49, 23]
        assert lp.abs().max().item() < 1e-6


def test_greedy_ties_pick_the_lowest_index_and_tiny_top_p_is_argmax(backend):
    x = torch.randn(5, 77)
    x[:, 10] = x[:, 40] = x[:, 70] = 9.0
    assert genfast.sample_tokens(x.to(backend), temperature=0).tolist() == [10] * 5
    y = logits_like_a_model(5, 77, torch.Generator().manual_seed(1))
    tokens = genfast.sample_tokens(y.to(backend), top_p=1e-6, seed=2)
    assert torch.equal(tokens.cpu(), y.argmax(-1))
    full = genfast.sample_tokens(y.to(backend), top_k=77, seed=2)
    assert torch.equal(full, genfast.sample_tokens(y.to(backend), top_k=1000, seed=2))
    assert torch.equal(full, genfast.sample_tokens(y.to(backend), seed=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_and_huge_magnitudes(backend, dtype):
    if dtype == torch.bfloat16 and is_triton() and backend == "cpu":
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    big = torch.finfo(dtype).max
    logits = logits_like_a_model(6, 301, torch.Generator().manual_seed(8)).to(dtype)
    logits[0] = -big
    logits[0, 17] = big  # spread of 2 * max: overflows to +inf distance, not NaN
    logits[1, :100] = -big
    logits[2] = logits[2] * 0 + big
    for kw in CONFIGS.values():
        t, lp = genfast.sample_tokens(logits.to(backend), seed=4, return_logprobs=True, **kw)
        assert t[0].item() == 17 and lp[0].item() == 0
        p = hf_probs(logits.float(), **kw).gather(1, t.cpu()[:, None])[:, 0]
        # row 2 is one 301-way tie: every filter keeps all of it (HF's top-p would cut the tie in sort order)
        p[2] = 1 / 301
        assert (p > 0).all()
        torch.testing.assert_close(lp.cpu().double(), p.log(), rtol=0, atol=2e-4)


def test_empty_batch(backend):
    t, lp = genfast.sample_tokens(torch.randn(0, 10, device=backend), return_logprobs=True)
    assert t.shape == (0,) and lp.shape == (0,)


# ---- bad input -------------------------------------------------------------------

def test_nan_and_all_inf_rows_raise_naming_the_row(backend):
    x = torch.randn(4, 30, device=backend)
    x[2, 5] = float("nan")
    with pytest.raises(ValueError, match="row 2 contains NaN"):
        genfast.sample_tokens(x)
    y = torch.randn(4, 30, device=backend)
    y[3] = -INF
    with pytest.raises(ValueError, match="row 3 has no token"):
        genfast.sample_tokens(y)
    # the check=False fast path reports them in the tokens
    x[1] = -INF
    assert genfast.sample_tokens(x, check=False)[1:3].tolist() == [-2, -1]


def _never(*args):
    raise AssertionError("a kernel ran")


@pytest.mark.parametrize("kw, error, match", [
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(frequency_penalty=INF), ValueError, "frequency_penalty"),
    (dict(top_p=torch.tensor([0.5, 0.9, 0.0])), ValueError, "top_p must be in .* row 2"),
    (dict(top_k=torch.tensor([1, -3, 0])), ValueError, "top_k .* row 1"),
    (dict(top_k=torch.tensor([1.0, 2.0, 3.0])), TypeError, "top_k"),
    (dict(temperature=torch.tensor([1.0, 2.0])), ValueError, "temperature"),
    (dict(prev_tokens=torch.tensor([[1, 2], [3, 99], [0, -1]])), ValueError, "prev_tokens .* row 1"),
    (dict(prev_tokens=torch.tensor([[1.0, 2.0]] * 3)), TypeError, "prev_tokens"),
    (dict(prev_tokens=torch.tensor([[1, 2]])), ValueError, "prev_tokens"),
    (dict(token_counts=torch.zeros(3, 9, dtype=torch.int64)), ValueError, "token_counts"),
    (dict(token_counts=torch.zeros(3, 10)), TypeError, "token_counts"),
    (dict(token_counts=torch.zeros(3, 10, dtype=torch.int64, device="meta")), ValueError, "token_counts .* device"),
    (dict(token_counts=torch.tensor([[0] * 10, [0] * 9 + [-1], [0] * 10])), ValueError, "token_counts .* row 1"),
    (dict(token_counts=[[0] * 10] * 3), TypeError, "token_counts"),
    (dict(token_counts=torch.zeros(3, 10, dtype=torch.int64), prev_tokens=torch.zeros(3, 2, dtype=torch.int64)),
     ValueError, "prev_tokens or token_counts"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(offset=-1), ValueError, "offset"),
])
def test_bad_arguments_raise_before_anything_runs(kw, error, match, monkeypatch):
    logits = torch.randn(3, 10)
    monkeypatch.setattr(genfast._ops, "implementation", lambda *a: _never)
    with pytest.raises(error, match=match):
        genfast.sample_tokens(logits, **kw)


@pytest.mark.parametrize("logits, error", [
    (torch.randn(10), ValueError), (torch.randn(2, 0), ValueError), (torch.randint(0, 5, (2, 3)), TypeError),
    ([[1.0, 2.0]], TypeError)])
def test_bad_logits(logits, error):
    with pytest.raises(error, match="logits"):
        genfast.sample_tokens(logits)


@pytest.mark.parametrize("fn, probs, args, match", [
    (genfast.top_p_sampling_from_probs, torch.rand(10), (0.5,), "top_p_sampling_from_probs: probs must have shape"),
    (genfast.top_k_sampling_from_probs, torch.zeros(2, 10), (3,),
     "top_k_sampling_from_probs: probs row 0 has no token to sample: every probability is 0"),
    (genfast.min_p_sampling_from_probs, torch.tensor([[0.5, 0.5], [0.5, -0.5]]), (0.1,),
     "min_p_sampling_from_probs: probs row 1 contains NaN, \\+inf or a negative value"),
    (genfast.top_k_top_p_sampling_from_probs, torch.rand(2, 10), (torch.tensor([1, 2], device="meta"), 0.9),
     "top_k must be on the device of probs"),
])
def test_flashinfer_probs_errors_name_the_function_and_probs(fn, probs, args, match):
    with pytest.raises(ValueError, match=match):
        fn(probs, *args, check_nan=True)


# ---- the op ----------------------------------------------------------------------

def test_opcheck(backend):
    logits = torch.randn(4, 37, device=backend)
    params = torch.tensor([[1.0, 3, 0.9, 0.0, 1.2, 0.1, 0.1]] * 4, device=backend)
    prev = torch.randint(-1, 37, (4, 6), device=backend)
    counts = torch.randint(0, 3, (4, 37), device=backend, dtype=torch.int32)
    op = torch.ops.genfast.sample_tokens.default
    for args in [(logits, None, None, None, 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 3, None, 0, True),
                 (logits, params, prev, None, 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 3, None, 0, False),
                 (logits, params, None, counts, 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 3, None, 0, False),
                 (logits, None, prev, None, 2.0, 5, 0.8, 0.1, 1.3, 0.2, 0.3, 0, torch.tensor(4, device=backend), 9,
                  True)]:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_decode_step():
    torch._dynamo.reset()

    def step(logits, prev, seed, offset):
        return genfast.sample_tokens(logits, top_k=20, top_p=0.9, temperature=0.7, repetition_penalty=1.1,
                                     prev_tokens=prev, seed=seed, offset=offset, check=False)

    def step_counts(logits, counts, seed, offset):
        return genfast.sample_tokens(logits, top_k=20, top_p=0.9, temperature=0.7, repetition_penalty=1.1,
                                     token_counts=counts, seed=seed, offset=offset, check=False)

    logits = torch.randn(4, 100, device=DEVICE)
    prev = torch.randint(0, 100, (4, 8), device=DEVICE)
    seed = torch.tensor(3, device=DEVICE)
    expected = step(logits, prev, seed, 5)
    assert torch.equal(torch.compile(step, fullgraph=True)(logits, prev, seed, 5), expected)
    counts = counts_of(prev.cpu(), 100).to(DEVICE)
    assert torch.equal(torch.compile(step_counts, fullgraph=True)(logits, counts, seed, 5), expected)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 6), vocab=st.integers(1, 3000), top_k=st.integers(0, 60),
       top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.5), temperature=st.floats(0.0, 3.0),
       seed=st.integers(0, 2**63 - 1), offset=st.integers(0, 2**40))
def test_cpp_matches_reference_on_random_settings(batch, vocab, top_k, top_p, min_p, temperature, seed, offset):
    if not genfast.backends()["cpp"][0]:
        pytest.skip("no C++ backend")
    logits = torch.randn(batch, vocab) * 4
    kw = dict(top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature, seed=seed, offset=offset,
              return_logprobs=True)
    out = {}
    for name in ("cpp", "reference"):
        with genfast.use_backend(name):
            out[name] = genfast.sample_tokens(logits, **kw)
    assert (out["cpp"][0] != out["reference"][0]).sum() <= 1
    same = out["cpp"][0] == out["reference"][0]
    torch.testing.assert_close(out["cpp"][1][same], out["reference"][1][same], rtol=0, atol=1e-4)


# ---- FlashInfer names and the sampler object ---------------------------------------

def test_flashinfer_names(backend):
    logits = logits_like_a_model(8, 120, torch.Generator().manual_seed(12)).to(backend)
    probs = logits.softmax(-1)
    seeded = dict(seed=3, offset=0)
    t = genfast.top_k_top_p_sampling_from_logits(logits, 10, 0.8, **seeded)
    assert t.dtype == torch.int32 and torch.equal(t.long(), genfast.sample_tokens(logits, top_k=10, top_p=0.8, seed=3))
    ref = hf_probs(logits.cpu(), top_p=0.7)
    for fn, arg, kw in [(genfast.top_p_sampling_from_probs, 0.7, dict(top_p=0.7)),
                        (genfast.top_k_sampling_from_probs, 5, dict(top_k=5)),
                        (genfast.min_p_sampling_from_probs, 0.2, dict(min_p=0.2))]:
        tokens = fn(probs, arg, **seeded).long().cpu()
        assert (hf_probs(logits.cpu(), **kw).gather(1, tokens[:, None]) > 0).all()
    assert (ref.gather(1, genfast.top_p_sampling_from_probs(probs, 0.7, seed=1).long().cpu()[:, None]) > 0).all()
    idx = torch.tensor([0, 0, 3], device=backend)
    assert genfast.sampling_from_logits(logits, indices=idx, seed=1).shape == (3,)
    assert genfast.sampling_from_probs(probs, seed=1).shape == (8,)
    assert genfast.top_k_top_p_sampling_from_probs(probs, 3, 0.5, seed=1).shape == (8,)
    with pytest.raises(NotImplementedError, match="joint"):
        genfast.top_k_top_p_sampling_from_logits(logits, 10, 0.8, filter_apply_order="joint")


def tied_logits(batch, vocab, generator):
    """Logits on a coarse grid: many exact ties, at every threshold."""
    return (torch.randn(batch, vocab, generator=generator) * 4).round() / 2


def oracle_threshold_keep(x64, k=None, p=None):
    """Which entries FlashInfer's top-k / top-p keep, by a sort in fp64: the values >= t, t the k-th largest
    (k 0 or >= vocab: all), or the largest value whose tie-inclusive mass reaches p (p >= 1 or unreachable: all)."""
    s, _ = x64.sort(dim=-1, descending=True)
    vocab = x64.shape[-1]
    keep = torch.ones_like(x64, dtype=torch.bool)
    for r in range(x64.shape[0]):
        if k is not None and 0 < int(k[r]) < vocab:
            keep[r] = x64[r] >= s[r, int(k[r]) - 1]
        if p is not None and float(p[r]) < 1:
            cum = s[r].cumsum(0)
            reached = (cum >= float(p[r])).nonzero()
            if reached.numel():
                keep[r] = x64[r] >= s[r, reached[0, 0]]
    return keep


def renormalized(x, keep):
    kept = torch.where(keep, x, 0)
    return kept / kept.sum(dim=-1, keepdim=True)


FILTER_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_interpreter_bf16(backend, dtype):
    if dtype == torch.bfloat16 and is_triton() and backend == "cpu":
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


@pytest.mark.parametrize("vocab", [1, 7, 97, 1031, 128256])
@pytest.mark.parametrize("dtype", FILTER_DTYPES)
def test_top_k_mask_logits(backend, vocab, dtype):
    skip_interpreter_bf16(backend, dtype)
    small_vocab(backend, vocab)
    g = torch.Generator().manual_seed(vocab)
    batch = 6
    logits = tied_logits(batch, vocab, g).to(dtype)
    logits[1, : vocab // 2] = -INF
    k = torch.tensor([0, 1, 3, vocab, vocab + 5, int(torch.randint(1, vocab + 1, (), generator=g))])
    keep = oracle_threshold_keep(logits.double(), k=k)
    expected = torch.where(keep, logits, -INF)
    out = genfast.top_k_mask_logits(logits.to(backend), k.to(backend))
    assert out.dtype == dtype and torch.equal(out.cpu(), expected)
    for kk in (1, 5):  # scalar top_k
        out = genfast.top_k_mask_logits(logits.to(backend), kk)
        keep = oracle_threshold_keep(logits.double(), k=torch.full((batch,), kk))
        assert torch.equal(out.cpu(), torch.where(keep, logits, -INF))


@pytest.mark.parametrize("vocab", [1, 7, 97, 1031, 128256])
@pytest.mark.parametrize("dtype", FILTER_DTYPES)
def test_top_k_renorm_probs(backend, vocab, dtype):
    skip_interpreter_bf16(backend, dtype)
    small_vocab(backend, vocab)
    g = torch.Generator().manual_seed(vocab + 1)
    batch = 5
    probs = tied_logits(batch, vocab, g).softmax(-1).to(dtype)
    k = torch.tensor([0, 1, 2, vocab + 1, int(torch.randint(1, vocab + 1, (), generator=g))])
    keep = oracle_threshold_keep(probs.double(), k=k)
    out = genfast.top_k_renorm_probs(probs.to(backend), k.to(backend))
    assert out.dtype == dtype
    assert torch.equal(out.cpu() > 0, keep & (probs > 0))
    assert_close(out.cpu(), renormalized(probs.double(), keep), renormalized(probs, keep), atol=1e-7)
    scalar = genfast.top_k_renorm_probs(probs.to(backend), 2)
    assert torch.equal(scalar[2], out[2])


@pytest.mark.parametrize("vocab", [1, 7, 97, 1031, 128256])
@pytest.mark.parametrize("dtype", FILTER_DTYPES)
def test_top_p_renorm_probs(backend, vocab, dtype):
    skip_interpreter_bf16(backend, dtype)
    small_vocab(backend, vocab)
    g = torch.Generator().manual_seed(vocab + 2)
    batch = 6
    probs = tied_logits(batch, vocab, g).softmax(-1).to(dtype)
    x64 = probs.double()
    s = x64.sort(dim=-1, descending=True).values
    cum = s.cumsum(-1)
    # top_p halfway between two cumulative masses: half a token of margin for fp32 sums in any order
    j = torch.randint(0, vocab, (batch,), generator=g)
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    p = ((before + cum.gather(1, j[:, None])[:, 0]) / 2).float().clamp(max=1.0)  # bf16 rows may sum past 1
    p[0] = 1.0  # only renormalize
    p[1] = 1e-6  # the top value (and its ties)
    keep = oracle_threshold_keep(x64, p=p)
    out = genfast.top_p_renorm_probs(probs.to(backend), p.to(backend))
    assert out.dtype == dtype
    assert torch.equal(out.cpu() > 0, keep & (probs > 0))
    assert_close(out.cpu(), renormalized(x64, keep), renormalized(probs, keep), atol=1e-7)
    # a row holding less mass than top_p is kept whole (FlashInfer compares top_p with the mass itself)
    half = genfast.top_p_renorm_probs((probs.float() * 0.5).to(backend), 0.9).cpu()
    torch.testing.assert_close(half, renormalized(probs.float() * 0.5, probs > 0).float(), rtol=1e-5, atol=1e-6)


def test_renorm_matches_sampling_with_the_filter(backend):
    """top_k_renorm_probs then sampling_from_probs draws from the distribution top_k_sampling_from_probs uses."""
    logits = logits_like_a_model(4, 300, torch.Generator().manual_seed(5)).to(backend)
    probs = logits.softmax(-1)
    for renorm, kw in ((genfast.top_k_renorm_probs(probs, 9), dict(top_k=9)),
                       (genfast.top_p_renorm_probs(probs, 0.6), dict(top_p=0.6))):
        expected = hf_probs(logits.cpu(), **kw)
        torch.testing.assert_close(renorm.cpu().double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("fn, x, arg, error, match", [
    (genfast.top_k_mask_logits, torch.randn(2, 5), -1, ValueError, "top_k"),
    (genfast.top_k_mask_logits, torch.randn(2, 5), 1.5, TypeError, "top_k"),
    (genfast.top_k_mask_logits, torch.randn(5), 1, ValueError, "logits"),
    (genfast.top_k_renorm_probs, torch.rand(2, 5), torch.tensor([1, -2]), ValueError, "top_k .* row 1"),
    (genfast.top_k_renorm_probs, torch.randint(0, 3, (2, 5)), 1, TypeError, "probs"),
    (genfast.top_p_renorm_probs, torch.rand(2, 5), 0.0, ValueError, "top_p"),
    (genfast.top_p_renorm_probs, torch.rand(2, 5), torch.tensor([0.5, 1.5]), ValueError, "top_p .* row 1"),
    (genfast.top_p_renorm_probs, torch.rand(2, 5), torch.tensor([0.5]), ValueError, "top_p"),
    (genfast.top_p_renorm_probs, torch.rand(2, 5), torch.tensor([0.5, 0.5], device="meta"), ValueError,
     "top_p must be on the device of probs"),
])
def test_renorm_and_mask_bad_arguments(fn, x, arg, error, match, monkeypatch):
    monkeypatch.setattr(genfast._ops, "implementation", lambda *a: _never)
    with pytest.raises(error, match=match):
        fn(x, arg)


def test_renorm_and_mask_opcheck_and_compile(backend):
    device = backend
    probs = torch.rand(3, 29, device=device).softmax(-1)
    k = torch.tensor([1, 4, 0], device=device)
    p = torch.tensor([0.3, 0.9, 1.0], device=device)
    torch.library.opcheck(torch.ops.genfast.top_k_renorm_probs.default, (probs, k, 0))
    torch.library.opcheck(torch.ops.genfast.top_k_renorm_probs.default, (probs, None, 3))
    torch.library.opcheck(torch.ops.genfast.top_p_renorm_probs.default, (probs, p, 1.0))
    torch.library.opcheck(torch.ops.genfast.top_p_renorm_probs.default, (probs, None, 0.5))
    torch.library.opcheck(torch.ops.genfast.top_k_mask_logits.default, (probs.log(), k, 0))
    torch._dynamo.reset()

    def step(probs):
        return genfast.top_p_renorm_probs(genfast.top_k_renorm_probs(probs, 5), 0.8)

    assert torch.equal(torch.compile(step, fullgraph=True)(probs), step(probs))


def test_logits_sampler_advances_the_stream(backend):
    logits = logits_like_a_model(4, 90, torch.Generator().manual_seed(14)).to(backend)
    sampler = genfast.LogitsSampler(top_k=20, temperature=0.9, seed=5)
    a, b = sampler.sample(logits), sampler.sample(logits)
    assert sampler.offset == 8
    assert torch.equal(a, genfast.sample_tokens(logits, top_k=20, temperature=0.9, seed=5, offset=0))
    assert torch.equal(b, genfast.sample_tokens(logits, top_k=20, temperature=0.9, seed=5, offset=4))
    # the HF LogitsProcessor protocol: only the drawn token stays finite
    hf = genfast.LogitsSampler(top_p=0.9, repetition_penalty=1.2, seed=5)
    ids = torch.randint(0, 90, (4, 7), device=backend)
    scores = hf(ids, logits)
    drawn = genfast.sample_tokens(logits, top_p=0.9, repetition_penalty=1.2, prev_tokens=ids, seed=5)
    assert torch.equal(scores.argmax(-1), drawn) and torch.isfinite(scores).sum().item() == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_sampling_replays_in_a_cuda_graph_with_the_seed_on_the_device():
    logits = torch.randn(5, 1000, device="cuda") * 3
    seed = torch.tensor(3, device="cuda")
    kw = dict(top_k=50, top_p=0.9, temperature=0.8, check=False)
    genfast.sample_tokens(logits, seed=seed, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = genfast.sample_tokens(logits, seed=seed, **kw)
    for value in (5, 6):
        seed.fill_(value)
        graph.replay()
        assert torch.equal(tokens, genfast.sample_tokens(logits, seed=value, **kw))

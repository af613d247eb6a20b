"""genfast against HF transformers itself: sample_tokens against the logits
processors that ``generate`` applies, and LogitsSampler inside ``generate``
with a tiny random-weight Llama (nothing downloaded). Skipped without
transformers."""
import pytest
import torch

import genfast

from conftest import DEVICE

transformers = pytest.importorskip("transformers")
from transformers import (LlamaConfig, LlamaForCausalLM, LogitsProcessorList,  # noqa: E402
                          MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

CONFIGS = {
    "repetition": dict(repetition_penalty=1.3),
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.05),
    "all": dict(repetition_penalty=0.8, temperature=1.4, top_k=40, top_p=0.9, min_p=0.02),
}


def hf_process(logits, prev_tokens, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """transformers' processors on fp32 logits (batch, vocab), in the order ``generate`` builds them.

    HF has no padding id of its own in the repetition penalty: each row gets only its ids >= 0."""
    scores = logits.float().clone()
    if repetition_penalty != 1.0:
        penalty = RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty)
        rows = []
        for r in range(scores.shape[0]):
            ids = prev_tokens[r][prev_tokens[r] >= 0][None]
            rows.append(penalty(ids, scores[r:r + 1].clone()) if ids.numel() else scores[r:r + 1])
        scores = torch.cat(rows)
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers(prev_tokens.clamp(min=0), scores)


def logits_and_history(batch, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 3
    prev = torch.randint(0, vocab, (batch, 24), generator=g)
    prev[:, -5:] = -1  # right padding
    prev[1, :9] = -1  # left padding
    prev[0] = -1  # a row with no history
    return logits, prev


# ---- the processors ---------------------------------------------------------------

@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_greedy_with_repetition_penalty_is_hf_argmax(backend, penalty):
    logits, prev = logits_and_history(9, 257, seed=1)
    # make the penalty decide: 1.3 moves a row's top ids below the rest, 0.8 lifts ids just below the top
    top = logits.amax(dim=1, keepdim=True)
    value = top + 1 if penalty > 1 else top * 0.9
    # distinct values (no ties: top-k 1 keeps every tie); row 0 has no history
    logits[1:].scatter_(1, prev[1:, 10:13], value[1:] * torch.tensor([1.0, 0.99, 0.98]))
    expected = hf_process(logits, prev, repetition_penalty=penalty).argmax(dim=-1)
    assert (expected != logits.argmax(dim=-1)).sum() >= 6
    greedy = genfast.sample_tokens(logits.to(backend), temperature=0, repetition_penalty=penalty,
                                   prev_tokens=prev.to(backend))
    assert torch.equal(greedy.cpu(), expected)
    # top-k 1 at any temperature is greedy too: HF keeps only the arg-max as well
    top1 = genfast.sample_tokens(logits.to(backend), temperature=0.6, top_k=1, repetition_penalty=penalty,
                                 prev_tokens=prev.to(backend), seed=4)
    assert torch.equal(top1.cpu(), expected)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_draws_come_from_hf_filtered_distribution(backend, config):
    """Each drawn token is kept by HF's processors, its log-probability is HF's (so the kept mass
    is HF's), and it is the token that inverse-CDF sampling of HF's distribution picks with the
    same uniform (genfast.rand at the row's stream position)."""
    kw = CONFIGS[config]
    batch, vocab, seed, offset = 32, 301, 7, 5
    logits, prev = logits_and_history(batch, vocab, seed=len(config))
    tokens, logprobs = genfast.sample_tokens(logits.to(backend), prev_tokens=prev.to(backend), seed=seed,
                                             offset=offset, return_logprobs=True, **kw)
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    scores = hf_process(logits, prev, **kw)
    hf_logprobs = scores.double().log_softmax(dim=-1)
    assert torch.isfinite(scores.gather(1, tokens[:, None])).all()
    torch.testing.assert_close(logprobs.double(), hf_logprobs.gather(1, tokens[:, None])[:, 0], rtol=0, atol=1e-4)
    u = genfast.rand(batch, seed=seed, offset=offset, device=backend).cpu().double()
    cdf = hf_logprobs.exp().cumsum(dim=-1)
    assert torch.equal(tokens, (cdf <= u[:, None] * cdf[:, -1:]).sum(dim=-1))


def test_top_k_and_top_p_masks_are_hf_warpers(backend):
    logits, prev = logits_and_history(10, 500, seed=3)
    scores = logits / 0.9
    for k in (1, 13, 499, 500):
        hf_kept = torch.isfinite(TopKLogitsWarper(k)(prev, scores.clone()))
        assert torch.equal(torch.isfinite(genfast.top_k_mask_logits(scores.to(backend), k)).cpu(), hf_kept)
    for p in (0.05, 0.5, 0.95):
        hf_kept = torch.isfinite(TopPLogitsWarper(p)(prev, scores.clone()))
        kept = genfast.top_p_renorm_probs(scores.softmax(dim=-1).to(backend), p).cpu() > 0
        assert torch.equal(kept, hf_kept)


# ---- LogitsSampler inside generate ---------------------------------------------------

def tiny_llama(seed=0, attn_implementation="sdpa"):
    """Random weights; head_dim 64, the smallest genfast's attention takes; 4 query heads per KV head."""
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).to(DEVICE).eval()


def test_logits_sampler_greedy_in_generate_gives_hf_greedy_tokens():
    model = tiny_llama()
    ids = torch.randint(0, 96, (3, 6), device=DEVICE)
    expected = model.generate(ids, max_new_tokens=10, do_sample=False)
    got = model.generate(ids, max_new_tokens=10, do_sample=False,
                         logits_processor=[genfast.LogitsSampler(temperature=0)])
    assert torch.equal(got, expected)


@torch.no_grad()
def test_logits_sampler_in_generate_samples_like_a_plain_loop():
    """generate with the sampler draws what sample_tokens draws in a loop over the same logits,
    the penalties counting the prompt, the stream advancing by batch per step."""
    model = tiny_llama(seed=1)
    batch, n_new = 2, 8
    settings = dict(temperature=0.8, top_p=0.9, min_p=0.02, repetition_penalty=1.2)
    ids = torch.randint(0, 96, (batch, 5), device=DEVICE)
    got = model.generate(ids, max_new_tokens=n_new, do_sample=False,
                         logits_processor=[genfast.LogitsSampler(seed=3, **settings)])
    seq = ids
    for step in range(n_new):
        logits = model(seq).logits[:, -1].float()
        tok = genfast.sample_tokens(logits, prev_tokens=seq, seed=3, offset=step * batch, **settings)
        seq = torch.cat([seq, tok[:, None]], dim=1)
    assert torch.equal(got, seq)


# ---- genfast.hf: HF's Llama on genfast's attention and cache ----------------------------

@pytest.mark.parametrize("cache", ["dynamic", "genfast"])
def test_hf_llama_on_genfast_attention_gives_hf_greedy_tokens(backend, cache):
    hf = pytest.importorskip("genfast.hf")
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 96, (3, 6), device=backend)
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        expected_logits = model(ids).logits
    model.set_attn_implementation(hf.ATTENTION)
    store = hf.GenfastCache(model.config, 3, 16, device=backend) if cache == "genfast" else None
    kw = {hf.cache_argument(model): store} if store is not None else {}
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, **kw), expected)
    if store is not None:  # the last token is never fed back
        assert store.length == 6 + 8 - 1 and store.kv.seqlens.tolist() == [13] * 3
        store.reset()
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, **kw), expected)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_logits)


def test_genfast_attention_refuses_padding_and_hf_static_cache():
    hf = pytest.importorskip("genfast.hf")
    model = tiny_llama(attn_implementation=hf.ATTENTION)
    ids = torch.randint(0, 96, (2, 5), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="padded"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="static cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static")

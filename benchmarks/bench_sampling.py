"""Sampling family: one token per row of logits (batch, vocab).

Baselines, written the way the field writes them:

- ``eager``: HF transformers' sort-based warpers (``TopKLogitsWarper`` then
  ``TopPLogitsWarper``: sort, softmax, cumsum, scatter the mask back), then
  ``softmax`` and ``torch.multinomial``;
- ``torch.compile``: the same function compiled (static shapes);
- ``gpt-fast``: gpt-fast's ``sample`` (``torch.topk`` for the k-th value,
  mask, softmax, and an exponential-race draw); top-k cases only, it has no top-p.

FlashInfer's filter ops (``top_k_mask_logits``, ``top_k_renorm_probs``,
``top_p_renorm_probs``) against the PyTorch a serving stack falls back to
(``torch.topk`` for the k-th value; sort and cumsum for top-p) and its
``torch.compile``; they read the row once and write it once.

Bytes each op must move: read the logits once, B·V·s (s = 4 for fp32, 2 for
bf16), plus 8·B bytes of tokens. Everything beyond that (eager PyTorch moves
the row ~15 times and sorts it) is overhead, so the table's GB/s and % of copy
bandwidth say how close a sampler gets to one read of the logits.
"""
from __future__ import annotations

import torch

import genfast
from harness import Case

FAMILY = "sampling"
VOCABS = {"32k": 32000, "llama3": 128256, "qwen": 151936}
BATCHES = [1, 8, 64]
# (op name, genfast kwargs)
SETTINGS = {
    "top_k_top_p": dict(top_k=50, top_p=0.9),
    "top_p": dict(top_p=0.9),
}


def hf_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF's TopK then TopP warpers and a multinomial draw: the eager baseline."""
    scores = logits.float()
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.size(-1)))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_to_remove = cumulative_probs <= (1 - top_p)
        sorted_to_remove[..., -1:] = 0
        to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
        scores = scores.masked_fill(to_remove, -float("inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1)[:, 0]


def gpt_fast_sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 50) -> torch.Tensor:
    """gpt-fast's ``logits_to_probs`` + ``multinomial_sample_one_no_sync``."""
    logits = logits / max(temperature, 1e-5)
    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
    pivot = v.select(-1, -1).unsqueeze(-1)
    logits = torch.where(logits < pivot, -float("inf"), logits)
    probs = torch.softmax(logits.float(), dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1)


def eager_top_k_mask_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, -float("inf"))


def eager_top_k_renorm_probs(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]
    kept = probs.masked_fill(probs < kth, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-8)


def eager_top_p_renorm_probs(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the larger probabilities
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-8)


FILTERS = {  # op: (genfast function, eager function, argument, input is probs)
    "top_k_mask_logits": (genfast.top_k_mask_logits, eager_top_k_mask_logits, 50, False),
    "top_k_renorm_probs": (genfast.top_k_renorm_probs, eager_top_k_renorm_probs, 50, True),
    "top_p_renorm_probs": (genfast.top_p_renorm_probs, eager_top_p_renorm_probs, 0.9, True),
}


def _build_filter(batch: int, vocab: int, dtype: torch.dtype, device, op: str):
    fn, eager, arg, probs = FILTERS[op]
    x = torch.randn(batch, vocab, device=device) * 3
    x = (x.softmax(-1) if probs else x).to(dtype)
    compiled = torch.compile(eager, dynamic=False)
    return {"genfast": lambda: fn(x, arg), "eager": lambda: eager(x, arg), "torch.compile": lambda: compiled(x, arg)}


def _build(batch: int, vocab: int, dtype: torch.dtype, device, kw: dict):
    # Logits like a model's: a few nats of spread, so top-p keeps hundreds to thousands of tokens.
    logits = (torch.randn(batch, vocab, device=device) * 3).to(dtype)
    compiled = torch.compile(hf_top_k_top_p, dynamic=False)
    impls = {
        "genfast": lambda: genfast.sample_tokens(logits, seed=0, check=False, **kw),
        "eager": lambda: hf_top_k_top_p(logits, **kw),
        "torch.compile": lambda: compiled(logits, **kw),
    }
    if "top_k" in kw:
        impls["gpt-fast"] = lambda: gpt_fast_sample(logits, top_k=kw["top_k"])
    return impls


def cases(quick: bool, device) -> list[Case]:
    """quick: Llama 3's vocabulary at batch 8 in fp32 (on a GPU also batch 64);
    full: every vocabulary, batch 1/8/64, fp32 and bf16. The filter ops: the same grid (quick: its largest batch)."""
    device = torch.device(device)
    if quick:
        vocabs, batches, dtypes = ["llama3"], ([8, 64] if device.type == "cuda" else [8]), [torch.float32]
    else:
        vocabs, batches, dtypes = list(VOCABS), BATCHES, [torch.float32, torch.bfloat16]
    out = []
    for op, kw in SETTINGS.items():
        impls = ("genfast", "eager", "torch.compile") + (("gpt-fast",) if "top_k" in kw else ())
        for dtype in dtypes:
            for vname in vocabs:
                for batch in batches:
                    vocab = VOCABS[vname]
                    nbytes = batch * vocab * dtype.itemsize + 8 * batch
                    out.append(Case(
                        family=FAMILY, op=op, mode="sample", size=f"{batch}x{vname}", dtype=dtype, device=device,
                        nbytes=nbytes, footprint=nbytes, impls=impls,
                        build=lambda batch=batch, vocab=vocab, dtype=dtype, kw=kw: _build(batch, vocab, dtype,
                                                                                         device, kw),
                    ))
    for op in FILTERS:
        for dtype in dtypes:
            for vname in vocabs:
                for batch in (batches[-1:] if quick else batches):  # quick: the largest batch only
                    vocab = VOCABS[vname]
                    nbytes = 2 * batch * vocab * dtype.itemsize
                    out.append(Case(
                        family=FAMILY, op=op, mode="filter", size=f"{batch}x{vname}", dtype=dtype, device=device,
                        nbytes=nbytes, footprint=nbytes, impls=("genfast", "eager", "torch.compile"),
                        build=lambda batch=batch, vocab=vocab, dtype=dtype, op=op: _build_filter(batch, vocab, dtype,
                                                                                                device, op),
                    ))
    return out

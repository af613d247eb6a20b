"""Token sampling from logits, fused: penalties, temperature, top-k, top-p,
min-p and the draw in one op, with no full sort of the vocabulary.

Semantics (every backend; ``genfast/reference/sampling.py`` is the oracle):
HF transformers' logits processors in HF's order, then one draw.

- penalties from ``prev_tokens`` (ids < 0 are padding) or, equivalently, from
  ``token_counts`` (how often each id occurred): every token with count c > 0
  becomes ``(x * r if x < 0 else x / r) - presence_penalty - frequency_penalty * c``
  in fp32 (HF's repetition penalty, then OpenAI/vLLM's presence and frequency
  penalties);
- temperature: logits ``/ temperature``; temperature 0 is greedy (the first
  index of the max penalized logit);
- top-k keeps every token whose value is >= the k-th largest (ties at the
  threshold are kept, as HF's ``TopKLogitsWarper``); ``top_k`` 0 or >= vocab
  is no filter;
- top-p, on the distribution left by top-k: keeps the tokens whose value is
  >= the smallest value at which the descending cumulative mass (ties
  included) reaches ``top_p``; ``top_p = 1`` is no filter; the top token is
  always kept;
- min-p keeps the tokens with probability >= ``min_p`` times the top one's;
- the draw: inverse CDF in vocabulary order with one uniform per row,
  position ``offset + row`` of the uniform stream (``genfast.rng``), so a
  call consumes ``batch`` positions and the next step passes
  ``offset + batch``. The same (seed, offset) picks the same tokens on every
  backend (up to fp32 rounding at a CDF boundary, a ~1e-6 event per row).

-inf logits (and probabilities that underflow fp32) are never sampled.
"""
from __future__ import annotations

import functools
import math
from typing import Union

import torch

from . import _ops
from .reference.sampling import NAN_ROW, PARAM_NAMES
from .rng import check_offset, normalize_seed

Param = Union[float, int, torch.Tensor]
INT_DTYPES = (torch.int64, torch.int32)


def _fake_sample_tokens(logits, params, prev_tokens, token_counts, inv_temperature, top_k, top_p, min_p,
                        repetition_penalty, presence_penalty, frequency_penalty, seed, seed_tensor, offset,
                        return_logprobs):
    batch = logits.shape[0]
    return (logits.new_empty((batch,), dtype=torch.int64),
            logits.new_empty((batch if return_logprobs else 0,), dtype=torch.float32))


sample_tokens_op = _ops.define(
    "sample_tokens(Tensor logits, Tensor? params, Tensor? prev_tokens, Tensor? token_counts, "
    "float inv_temperature, int top_k, "
    "float top_p, float min_p, float repetition_penalty, float presence_penalty, float frequency_penalty, "
    "int seed, Tensor? seed_tensor, int offset, bool return_logprobs) -> (Tensor, Tensor)",
    "sampling",
    _fake_sample_tokens,
)


# ---- argument checks ---------------------------------------------------------

def _first_bad_row(bad: torch.Tensor) -> int | None:
    """Index of the first True (one host sync on a GPU), or None."""
    if not bool(bad.any()):
        return None
    return int(bad.nonzero()[0, 0])


# name -> (allowed-values text, scalar test, tensor test)
_RULES = {
    "temperature": (">= 0 and finite", lambda v: v >= 0 and math.isfinite(v),
                    lambda t: (t >= 0) & torch.isfinite(t)),
    "top_k": ("an int >= 0", lambda v: v >= 0, lambda t: t >= 0),
    "top_p": ("in (0, 1]", lambda v: 0 < v <= 1, lambda t: (t > 0) & (t <= 1)),
    "min_p": ("in [0, 1]", lambda v: 0 <= v <= 1, lambda t: (t >= 0) & (t <= 1)),
    "repetition_penalty": ("> 0 and finite", lambda v: v > 0 and math.isfinite(v),
                           lambda t: (t > 0) & torch.isfinite(t)),
    "presence_penalty": ("finite", math.isfinite, torch.isfinite),
    "frequency_penalty": ("finite", math.isfinite, torch.isfinite),
}


def _check_param(fn: str, name: str, value, batch: int, device, check_values: bool, of: str = "logits"):
    """Validate one parameter (of the tensor named ``of``); return it as a Python number or a (batch,) tensor."""
    text, scalar_ok, tensor_ok = _RULES[name]
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{fn}: {name} must be a number or a tensor of shape (batch,) = ({batch},), "
                             f"got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{fn}: {name} must be on the device of {of} ({device}), got {value.device}")
        if name == "top_k":
            if value.dtype not in INT_DTYPES:
                raise TypeError(f"{fn}: top_k must be an int or an integer tensor, got {value.dtype}")
        elif not value.dtype.is_floating_point:
            raise TypeError(f"{fn}: {name} must be a float or a floating tensor, got {value.dtype}")
        if check_values:
            row = _first_bad_row(~tensor_ok(value.double() if name != "top_k" else value))
            if row is not None:
                raise ValueError(f"{fn}: {name} must be {text}, got {value[row].item()} in row {row}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (name == "top_k" and isinstance(value, float)):
        kind = "an int" if name == "top_k" else "a float"
        raise TypeError(f"{fn}: {name} must be {kind} or a tensor of shape (batch,), got {type(value).__name__}")
    if not scalar_ok(value):
        raise ValueError(f"{fn}: {name} must be {text}, got {value}")
    return value


@functools.lru_cache(maxsize=256)
def _inv_temperature(t: float) -> float:
    """fp32(1 / fp32(t)); +inf (greedy) for 0 or a temperature whose inverse overflows fp32.
    Cached: a decode loop passes the same few temperatures every step (3 us a call uncached)."""
    if t == 0:
        return math.inf
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(t, dtype=torch.float32))


def _check_prev_tokens(fn: str, prev_tokens, logits, check_values: bool):
    if prev_tokens is None:
        return None
    if not isinstance(prev_tokens, torch.Tensor):
        raise TypeError(f"{fn}: prev_tokens must be a torch.Tensor or None, got {type(prev_tokens).__name__}")
    if prev_tokens.dtype not in INT_DTYPES:
        raise TypeError(f"{fn}: prev_tokens must be int64 or int32, got {prev_tokens.dtype}")
    batch, vocab = logits.shape
    if prev_tokens.dim() != 2 or prev_tokens.shape[0] != batch:
        raise ValueError(f"{fn}: prev_tokens must have shape (batch, n) with batch = {batch}, "
                         f"got {tuple(prev_tokens.shape)}")
    if prev_tokens.device != logits.device:
        raise ValueError(f"{fn}: prev_tokens must be on the device of logits ({logits.device}), "
                         f"got {prev_tokens.device}")
    if check_values and prev_tokens.numel():
        row = _first_bad_row((prev_tokens >= vocab).any(dim=1))
        if row is not None:
            raise ValueError(f"{fn}: prev_tokens must hold ids < vocab ({vocab}) or -1 for padding, got "
                             f"{int(prev_tokens[row].max())} in row {row}")
    return prev_tokens.to(torch.int64).contiguous()


def _check_token_counts(fn: str, token_counts, prev_tokens, logits, check_values: bool):
    if token_counts is None:
        return None
    if prev_tokens is not None:
        raise ValueError(f"{fn}: pass prev_tokens or token_counts, not both")
    if not isinstance(token_counts, torch.Tensor):
        raise TypeError(f"{fn}: token_counts must be a torch.Tensor or None, got {type(token_counts).__name__}")
    if token_counts.dtype not in INT_DTYPES:
        raise TypeError(f"{fn}: token_counts must be int64 or int32, got {token_counts.dtype}")
    if token_counts.shape != logits.shape:
        raise ValueError(f"{fn}: token_counts must have the shape of logits (batch, vocab) = "
                         f"{tuple(logits.shape)}, got {tuple(token_counts.shape)}")
    if token_counts.device != logits.device:
        raise ValueError(f"{fn}: token_counts must be on the device of logits ({logits.device}), "
                         f"got {token_counts.device}")
    if check_values and token_counts.numel():
        row = _first_bad_row((token_counts < 0).any(dim=1))
        if row is not None:
            raise ValueError(f"{fn}: token_counts must be >= 0, got {int(token_counts[row].min())} in row {row}")
    return token_counts.contiguous()


def _raise_bad_rows(fn: str, tokens: torch.Tensor, of: str) -> None:
    row = _first_bad_row(tokens < 0)
    if row is None:
        return
    if of == "probs":  # sampled as log(probs)
        if int(tokens[row]) == NAN_ROW:
            raise ValueError(f"{fn}: probs row {row} contains NaN, +inf or a negative value")
        raise ValueError(f"{fn}: probs row {row} has no token to sample: every probability is 0")
    if int(tokens[row]) == NAN_ROW:
        raise ValueError(f"{fn}: logits row {row} contains NaN or +inf")
    raise ValueError(f"{fn}: logits row {row} has no token to sample: every logit is -inf")


# ---- public functions ----------------------------------------------------------

def sample_tokens(logits: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
                  min_p: Param = 0.0, repetition_penalty: Param = 1.0, presence_penalty: Param = 0.0,
                  frequency_penalty: Param = 0.0, prev_tokens: torch.Tensor | None = None,
                  token_counts: torch.Tensor | None = None, seed=None, offset: int = 0,
                  return_logprobs: bool = False, check: bool = True):
    """Sample one token per row of ``logits`` in one fused op.

    Parameters
    ----------
    logits : Tensor (batch, vocab), fp32/fp16/bf16 (fp64 runs on the reference)
        Unnormalized log-probabilities; -inf marks a banned token. Not modified.
    temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty :
        Each a Python number for every row, or a tensor (batch,) on the logits'
        device (top_k an integer tensor) for per-row settings.
        temperature >= 0 (0: greedy); top_k >= 0 (0: off); top_p in (0, 1] (1: off);
        min_p in [0, 1] (0: off); repetition_penalty > 0 (1: off); presence and
        frequency penalties any finite value (0: off). See the module docstring
        for the order and the exact semantics (HF transformers' processors).
    prev_tokens : Tensor (batch, n) int64/int32, optional
        Previous tokens of each row (prompt and generated), -1 (any id < 0) for
        padding; the penalties apply to these ids.
    token_counts : Tensor (batch, vocab) int64/int32, optional
        Instead of prev_tokens: how often each id occurred in each row (>= 0),
        as a serving loop keeps it; the same penalties, so counts built from
        prev_tokens give the same tokens.
    seed : int, 0-d int64 tensor or None
        Noise key (``genfast.rng``); a tensor lets a CUDA graph replay with new seeds.
    offset : int
        Row r draws its uniform from stream position ``offset + r``; advance by ``batch`` per step.
    return_logprobs : bool
        Also return each chosen token's log-probability under the filtered,
        temperature-scaled distribution (0 for greedy rows).
    check : bool
        Validate data-dependent values: per-row parameter tensors, prev_tokens ids
        < vocab, token_counts >= 0, and after the op NaN/+inf logits and rows
        with nothing to sample (ValueError naming the row). On a GPU each check is a host sync: pass
        ``check=False`` inside CUDA graphs and ``torch.compile``; then a row with
        NaN/+inf returns token -1, a row of all -inf returns -2.

    Returns
    -------
    tokens : Tensor (batch,) int64
    logprobs : Tensor (batch,) float32, only with ``return_logprobs=True``
    """
    return _sample("sample_tokens", "logits", logits, temperature=temperature, top_k=top_k, top_p=top_p,
                   min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                   frequency_penalty=frequency_penalty, prev_tokens=prev_tokens, token_counts=token_counts,
                   seed=seed, offset=offset, return_logprobs=return_logprobs, check=check)


def _sample(fn: str, of: str, x: torch.Tensor, *, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0,
            min_p: Param = 0.0, repetition_penalty: Param = 1.0, presence_penalty: Param = 0.0,
            frequency_penalty: Param = 0.0, prev_tokens=None, token_counts=None, seed=None, offset: int = 0,
            return_logprobs: bool = False, check: bool = True, indices=None):
    """sample_tokens for the public function ``fn`` whose input ``of`` ("logits", or "probs", sampled as
    log(probs)) is x: errors name that function and argument. ``indices``: FlashInfer's row selection."""
    _ops.check_tensor(fn, of, x)
    x = _rows(x, indices)
    if x.dim() != 2:
        raise ValueError(f"{fn}: {of} must have shape (batch, vocab), got {tuple(x.shape)}")
    batch, vocab = x.shape
    if vocab == 0:
        raise ValueError(f"{fn}: {of} must have a non-empty vocabulary, got shape {tuple(x.shape)}")
    logits = torch.log(x) if of == "probs" else x  # log(0) = -inf: a zero-probability token is never drawn
    device = logits.device
    values = {}
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
                        ("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty)):
        values[name] = _check_param(fn, name, value, batch, device, check, of)
    token_counts = _check_token_counts(fn, token_counts, prev_tokens, logits, check)
    prev_tokens = _check_prev_tokens(fn, prev_tokens, logits, check)
    greedy = not isinstance(values["temperature"], torch.Tensor) and values["temperature"] == 0
    # Greedy decoding draws nothing: don't take a seed from (and advance) torch's generator.
    seed, seed_tensor = normalize_seed(fn, 0 if greedy and seed is None else seed, device)
    offset = check_offset(fn, offset, batch)

    params = None
    if any(isinstance(v, torch.Tensor) for v in values.values()):
        cols = []
        for name in PARAM_NAMES:
            v = values["temperature" if name == "inv_temperature" else name]
            if isinstance(v, torch.Tensor):
                v = v.to(torch.float32)
                cols.append(torch.reciprocal(v) if name == "inv_temperature" else v)  # 1/0 = inf: greedy
            else:
                v = _inv_temperature(v) if name == "inv_temperature" else v
                cols.append(torch.full((batch,), float(v), dtype=torch.float32, device=device))
        params = torch.stack(cols, dim=1)
        scalars = (math.inf, 0, 1.0, 0.0, 1.0, 0.0, 0.0)  # ignored by the kernels
    else:
        scalars = (_inv_temperature(values["temperature"]), values["top_k"], values["top_p"], values["min_p"],
                   values["repetition_penalty"], values["presence_penalty"], values["frequency_penalty"])
        if scalars[4:] == (1.0, 0.0, 0.0):
            prev_tokens = token_counts = None  # no penalty: skip the gather
    if prev_tokens is not None and prev_tokens.shape[1] == 0:
        prev_tokens = None
    tokens, logprobs = sample_tokens_op(logits.contiguous(), params, prev_tokens, token_counts, *scalars, seed,
                                        seed_tensor, offset, return_logprobs)
    if check:
        _raise_bad_rows(fn, tokens, of)
    return (tokens, logprobs) if return_logprobs else tokens


# ---- FlashInfer-compatible names ------------------------------------------------
# Same names, arguments and return dtype (int32) as flashinfer.sampling, so a
# serving stack can swap the import. The draws follow genfast's semantics above
# (ties at a threshold kept; filters in HF's order), from genfast's noise stream.

def _flashinfer_seed(seed, generator):
    if seed is None and generator is not None:
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), generator=generator, dtype=torch.int64))
    return seed


def _rows(x: torch.Tensor, indices) -> torch.Tensor:
    """FlashInfer's ``indices``: output row i samples from row indices[i] of x."""
    return x if indices is None else x.index_select(0, indices.to(device=x.device, dtype=torch.int64))


def sampling_from_logits(logits, indices=None, deterministic=True, generator=None, check_nan=False, seed=None,
                         offset=None):
    """``flashinfer.sampling.sampling_from_logits``: one token per row of logits (batch, vocab) -> int32 (batch,)."""
    return _sample("sampling_from_logits", "logits", logits, indices=indices,
                   seed=_flashinfer_seed(seed, generator), offset=offset or 0, check=check_nan).to(torch.int32)


def sampling_from_probs(probs, indices=None, deterministic=True, generator=None, check_nan=False, seed=None,
                        offset=None):
    """``flashinfer.sampling.sampling_from_probs``: probs (batch, vocab), rows summing to 1 -> int32 (batch,)."""
    return _sample("sampling_from_probs", "probs", probs, indices=indices,
                   seed=_flashinfer_seed(seed, generator), offset=offset or 0, check=check_nan).to(torch.int32)


def top_p_sampling_from_probs(probs, top_p, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None):
    """``flashinfer.sampling.top_p_sampling_from_probs``; top_p a float or a (batch,) tensor."""
    return _sample("top_p_sampling_from_probs", "probs", probs, indices=indices,
                   top_p=top_p, seed=_flashinfer_seed(seed, generator),
                   offset=offset or 0, check=check_nan).to(torch.int32)


def top_k_sampling_from_probs(probs, top_k, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None):
    """``flashinfer.sampling.top_k_sampling_from_probs``; top_k an int or a (batch,) integer tensor."""
    return _sample("top_k_sampling_from_probs", "probs", probs, indices=indices,
                   top_k=top_k, seed=_flashinfer_seed(seed, generator),
                   offset=offset or 0, check=check_nan).to(torch.int32)


def min_p_sampling_from_probs(probs, min_p, indices=None, deterministic=True, generator=None, check_nan=False,
                              seed=None, offset=None):
    """``flashinfer.sampling.min_p_sampling_from_probs``; min_p a float or a (batch,) tensor."""
    return _sample("min_p_sampling_from_probs", "probs", probs, indices=indices,
                   min_p=min_p, seed=_flashinfer_seed(seed, generator),
                   offset=offset or 0, check=check_nan).to(torch.int32)


def _check_order(fn: str, filter_apply_order: str) -> None:
    if filter_apply_order == "joint":
        raise NotImplementedError(f"{fn}: filter_apply_order='joint' is not supported; genfast applies top-k, "
                                  "then top-p on the renormalized distribution ('top_k_first')")
    _ops.check_choice(fn, "filter_apply_order", filter_apply_order, ("top_k_first",))


def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                     deterministic=True, generator=None, check_nan=False, seed=None, offset=None):
    """``flashinfer.sampling.top_k_top_p_sampling_from_logits`` (filter_apply_order="top_k_first")."""
    _check_order("top_k_top_p_sampling_from_logits", filter_apply_order)
    return _sample("top_k_top_p_sampling_from_logits", "logits", logits, indices=indices,
                   top_k=top_k, top_p=top_p, seed=_flashinfer_seed(seed, generator),
                   offset=offset or 0, check=check_nan).to(torch.int32)


def top_k_top_p_sampling_from_probs(probs, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                    deterministic=True, generator=None, check_nan=False, seed=None, offset=None):
    """``flashinfer.sampling.top_k_top_p_sampling_from_probs`` (filter_apply_order="top_k_first")."""
    _check_order("top_k_top_p_sampling_from_probs", filter_apply_order)
    return _sample("top_k_top_p_sampling_from_probs", "probs", probs, indices=indices,
                   top_k=top_k, top_p=top_p, seed=_flashinfer_seed(seed, generator),
                   offset=offset or 0, check=check_nan).to(torch.int32)


# The renorm/mask ops: FlashInfer's semantics (ties at the threshold kept; top_p
# absolute; rows renormalized by 1 / max(kept mass, 1e-8)), thresholds by
# selection in the kernels. genfast/reference/sampling.py states them exactly.

def _fake_filter(x, per_row, param):
    return torch.empty_like(x)


top_k_renorm_probs_op = _ops.define("top_k_renorm_probs(Tensor probs, Tensor? top_k_arr, int top_k) -> Tensor",
                                    "sampling", _fake_filter)
top_p_renorm_probs_op = _ops.define("top_p_renorm_probs(Tensor probs, Tensor? top_p_arr, float top_p) -> Tensor",
                                    "sampling", _fake_filter)
top_k_mask_logits_op = _ops.define("top_k_mask_logits(Tensor logits, Tensor? top_k_arr, int top_k) -> Tensor",
                                   "sampling", _fake_filter)


def _filter_args(fn: str, name: str, x, param, param_name: str):
    """Checked (x, per-row tensor or None, scalar) for a renorm/mask op."""
    _ops.check_tensor(fn, name, x)
    if x.dim() != 2:
        raise ValueError(f"{fn}: {name} must have shape (batch, vocab), got {tuple(x.shape)}")
    value = _check_param(fn, param_name, param, x.shape[0], x.device, check_values=True, of=name)
    if isinstance(value, torch.Tensor):
        dtype = torch.int64 if param_name == "top_k" else torch.float32
        return x.contiguous(), value.to(dtype).contiguous(), 0
    return x.contiguous(), None, value


def top_k_mask_logits(logits, top_k):
    """``flashinfer.sampling.top_k_mask_logits``: logits below the k-th largest of their row set to -inf.

    logits (batch, vocab) fp32/fp16/bf16; top_k an int or a (batch,) integer tensor, 0 or >= vocab for no
    mask. Ties at the k-th value are all kept. Returns a tensor of logits' shape and dtype.
    """
    x, per_row, k = _filter_args("top_k_mask_logits", "logits", logits, top_k, "top_k")
    return top_k_mask_logits_op(x, per_row, k)


def top_k_renorm_probs(probs, top_k):
    """``flashinfer.sampling.top_k_renorm_probs``: keep each row's probabilities >= its k-th largest (ties
    kept), zero the rest, renormalize.

    probs (batch, vocab) fp32/fp16/bf16; top_k an int or a (batch,) integer tensor, 0 or >= vocab to only
    renormalize. Returns probs' shape and dtype: ``kept * (1 / max(sum(kept), 1e-8))`` in fp32.
    """
    x, per_row, k = _filter_args("top_k_renorm_probs", "probs", probs, top_k, "top_k")
    return top_k_renorm_probs_op(x, per_row, k)


def top_p_renorm_probs(probs, top_p):
    """``flashinfer.sampling.top_p_renorm_probs``: keep the smallest set of each row's top probabilities
    whose mass reaches top_p (ties at the threshold kept), zero the rest, renormalize.

    probs (batch, vocab) fp32/fp16/bf16, rows summing to 1 (top_p is compared with the mass itself, as in
    FlashInfer; a row holding less than top_p is kept whole); top_p in (0, 1], a float or a (batch,) tensor.
    Returns probs' shape and dtype: ``kept * (1 / max(sum(kept), 1e-8))`` in fp32.
    """
    x, per_row, p = _filter_args("top_p_renorm_probs", "probs", probs, top_p, "top_p")
    return top_p_renorm_probs_op(x, per_row, p)


# ---- a sampler object for decode loops -------------------------------------------

class LogitsSampler:
    """sample_tokens with fixed settings and its own place in the noise stream.

    gpt-fast-style loop::

        sampler = genfast.LogitsSampler(temperature=0.7, top_p=0.9, seed=0)
        next_token = sampler.sample(logits[:, -1], prev_tokens=tokens)

    HF transformers' ``generate``, in one line: called as a ``LogitsProcessor``
    it leaves only the drawn token finite, so greedy decoding picks it; the
    penalties count ``input_ids`` (prompt and generated tokens)::

        model.generate(ids, do_sample=False, logits_processor=[genfast.LogitsSampler(top_p=0.9)])

    ``generate`` runs its own processors first (those the generation config
    asks for: leave its repetition penalty unset) and, with ``do_sample=True``,
    its warpers too: pass ``do_sample=False`` so that only genfast filters.

    Each call uses stream positions ``offset .. offset + batch - 1`` and advances
    ``offset`` by batch, so a run is reproducible from ``seed`` (drawn once from
    torch's generator when None). Inside a CUDA graph pass a fresh 0-d ``seed``
    tensor per step instead: the Python offset would be baked into the graph.
    """

    def __init__(self, *, temperature: Param = 1.0, top_k: Param = 0, top_p: Param = 1.0, min_p: Param = 0.0,
                 repetition_penalty: Param = 1.0, presence_penalty: Param = 0.0, frequency_penalty: Param = 0.0,
                 seed=None, offset: int = 0, check: bool = True):
        self.settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                             frequency_penalty=frequency_penalty)
        self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if seed is None else seed
        self.offset = offset
        self.check = check

    def sample(self, logits: torch.Tensor, prev_tokens: torch.Tensor | None = None, return_logprobs: bool = False,
               token_counts: torch.Tensor | None = None):
        """Tokens (batch,) int64 for logits (batch, vocab) (and log-probs with return_logprobs)."""
        out = sample_tokens(logits, prev_tokens=prev_tokens, token_counts=token_counts, seed=self.seed,
                            offset=self.offset, return_logprobs=return_logprobs, check=self.check, **self.settings)
        self.offset += logits.shape[0]
        return out

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """HF ``LogitsProcessor`` protocol: scores (batch, vocab) -> 0 at the drawn token, -inf elsewhere."""
        tokens = self.sample(scores, prev_tokens=input_ids)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, tokens[:, None], 0.0)

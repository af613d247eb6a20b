"""End to end, autoregressive: a Llama-style decoder, prefill then N greedy tokens.

The model is genfast's own minimal Llama (RMSNorm, RoPE, grouped-query
attention, SwiGLU), random weights from a seed; nothing is downloaded. Every
loop runs the same weights and differs only in how it attends and samples:

- genfast: the model through ``genfast.patch`` (a copy sharing its weights; on
  the CPU its ``nn.Linear`` weights packed once for oneDNN: PyTorch's fp32
  ``F.linear`` runs MKL, slow on non-Intel CPUs), ``genfast.KVCache`` (update →
  attend → advance, each layer's K/V written in place at the row's length) and
  ``genfast.sample_tokens``; on a GPU also with the decode step captured in a
  CUDA graph and replayed;
- eager: gpt-fast's way, a preallocated (batch, kv_heads, max_seq, head_dim)
  cache written with ``index_copy_``, K/V heads repeated to the query heads,
  SDPA with a boolean mask row per position, argmax;
- torch.compile: that eager decode step compiled (its compile time reported;
  on a GPU with ``mode="reduce-overhead"``, CUDA graphs, as gpt-fast runs it);
- HF generate: transformers' ``LlamaForCausalLM`` built from the same config
  sharing the same weights, SDPA attention, ``generate`` with its
  default dynamic cache and with ``cache_implementation="static"`` (which
  ``generate`` compiles on a GPU, not on the CPU). Skipped, with a note, when
  transformers is not installed;
- HF generate + genfast.hf: that model on genfast's attention
  (``attn_implementation="genfast"``) with a ``genfast.hf.GenfastCache``, and
  ``genfast.patch``-ed: what genfast gains inside an HF loop.

At temperature 0 the loops must produce the same tokens (asserted). The same
loops are also timed at temperature 0.8, top-p 0.9, the eager one sampling as
HF transformers' warpers do (sort, cumsum, multinomial) and HF generate with
those warpers.

    python benchmarks/e2e/decode.py [--full] [--device cpu|cuda] [--no-compile] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import genfast

try:
    from . import common
except ImportError:  # run as a script
    import common


@dataclass(frozen=True)
class Config:
    vocab: int = 32000
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn_dim: int = 1408
    max_seq: int = 256
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


QUICK = Config()
# TinyLlama-1.1B's shapes (22 layers, 2048 wide, 32/4 heads): for a GPU.
FULL = Config(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq=1024)
TINY = Config(vocab=512, dim=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=256, max_seq=64)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    """Rotate (batch, seq, heads, head_dim) pairs (first half, second half) by the positions' angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.attn_norm, self.ffn_norm = RMSNorm(c.dim), RMSNorm(c.dim)
        self.wqkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.w13 = nn.Linear(c.dim, 2 * c.ffn_dim, bias=False)
        self.w2 = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x, cos, sin, attend, layer):
        c = self.c
        b, s, _ = x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).split(
            [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], dim=-1)
        q = rope(q.view(b, s, c.n_heads, c.head_dim), cos, sin)
        k = rope(k.view(b, s, c.n_kv_heads, c.head_dim), cos, sin)
        v = v.view(b, s, c.n_kv_heads, c.head_dim)
        x = x + self.wo(attend(layer, q, k, v).reshape(b, s, -1))
        gate, up = self.w13(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class Llama(nn.Module):
    """A minimal Llama: ``forward(tokens, positions, attend)`` where ``attend(layer, q, k, v)``
    takes (batch, seq, heads, head_dim) tensors, stores k/v and returns the attention output."""

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim)
        self.out = nn.Linear(c.dim, c.vocab, bias=False)
        inv_freq = 1.0 / c.rope_base ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim)
        angles = torch.outer(torch.arange(c.max_seq).float(), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens, positions, attend):
        # (seq, head_dim/2) → broadcast over batch and heads
        cos, sin = self.cos[positions][None, :, None, :], self.sin[positions][None, :, None, :]
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attend, i)
        # the next token needs the last position's logits only (as HF generate computes them): a
        # prompt's other rows would cost seq x vocab x dim more
        return self.out(self.norm(x[:, -1:]))


def patched(model: nn.Module) -> nn.Module:
    """``genfast.patch`` of a copy of model that shares its parameters and buffers (the baselines
    keep the unpatched model)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    copied = copy.deepcopy(model, memo=shared)
    genfast.patch(copied)
    return copied


def build_model(c: Config, device, dtype=torch.float32, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(c)
    # Unit-variance activations (std 1/sqrt(fan_in)) so greedy logits are far apart:
    # with HF's std 0.02 the top-2 logits of random weights tie within rounding.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model.to(device=device, dtype=dtype).eval()


# ---- genfast ------------------------------------------------------------------

def _prefill_genfast(model: Llama, prompt: torch.Tensor, n_new: int):
    """(cache, attend, logits): a ``genfast.KVCache`` for the prompt and n_new tokens, the
    model's ``attend`` over it, and the prompt's last logits (the prompt committed)."""
    c = model.c
    batch, plen = prompt.shape
    cache = genfast.KVCache(c.n_layers, batch, plen + n_new, c.n_kv_heads, c.head_dim,
                            dtype=model.cos.dtype, device=prompt.device)

    def attend(layer, q, k, v):
        cache.update(layer, k, v)
        return cache.attend(layer, q)

    logits = model(prompt, torch.arange(plen, device=prompt.device), attend)
    cache.advance()
    return cache, attend, logits


@torch.no_grad()
def generate_genfast(model: Llama, prompt: torch.Tensor, n_new: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Tokens (batch, n_new) with genfast's cache, attention and sampling (greedy at temperature 0)."""
    batch, plen = prompt.shape
    cache, attend, logits = _prefill_genfast(model, prompt, n_new)
    out = torch.empty((batch, n_new), dtype=torch.long, device=prompt.device)

    def sample(logits, step):
        # check=False: the checks are host syncs, and the model's logits are finite. One seed
        # for the loop, each step's rows at fresh stream positions.
        return genfast.sample_tokens(logits[:, -1], temperature=temperature, top_p=top_p, seed=seed,
                                     offset=step * batch, check=False)

    tok = sample(logits, 0)
    out[:, 0] = tok
    positions = torch.arange(plen, plen + n_new, device=prompt.device)
    for i in range(1, n_new):
        logits = model(tok[:, None], positions[i - 1:i], attend)
        cache.advance()
        tok = sample(logits, i)
        out[:, i] = tok
    return out


@torch.no_grad()
def generate_genfast_graph(model: Llama, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """``generate_genfast`` (greedy) on a GPU with the decode step captured once in a CUDA
    graph and replayed: the step's inputs (the last tokens, their position, the output
    column) live in static tensors that the step itself advances, the cache's lengths
    live on the device, so a replay needs no Python and no host sync."""
    batch, plen = prompt.shape
    dev = prompt.device
    cache, attend, logits = _prefill_genfast(model, prompt, n_new)
    out = torch.empty((batch, n_new), dtype=torch.long, device=dev)
    tok = genfast.sample_tokens(logits[:, -1], temperature=0.0, check=False)[:, None].contiguous()
    out[:, :1] = tok
    pos = torch.full((1,), plen, dtype=torch.long, device=dev)  # the position of tok
    col = torch.ones((1,), dtype=torch.long, device=dev)  # where the next token goes in out

    def decode():
        logits = model(tok, pos, attend)
        cache.advance()
        tok.copy_(genfast.sample_tokens(logits[:, -1], temperature=0.0, check=False)[:, None])
        out.index_copy_(1, col, tok)
        pos.add_(1)
        col.add_(1)

    if n_new < 3:
        for _ in range(n_new - 1):
            decode()
        return out
    # The first decode step runs eagerly, on a side stream as CUDA graphs ask (it compiles the
    # Triton kernels and initializes cuBLAS); the second is recorded (not run) and replayed.
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        decode()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode()
    for _ in range(n_new - 2):
        graph.replay()
    cache.sync_lengths()  # the host's copy counted the recorded step, not the replays
    return out


# ---- the gpt-fast-style baseline ---------------------------------------------

class EagerCache:
    """gpt-fast's KV cache: (batch, kv_heads, max_seq, head_dim) per layer, written with index_copy_."""

    def __init__(self, c: Config, batch: int, max_seq: int, dtype, device):
        shape = (batch, c.n_kv_heads, max_seq, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]
        for t in (*self.k, *self.v):  # updated in place at fixed addresses: a compiled step's CUDA graph keeps them
            torch._dynamo.mark_static_address(t)
        self.causal = torch.ones(max_seq, max_seq, dtype=torch.bool, device=device).tril()
        self.rep = c.n_heads // c.n_kv_heads
        self.positions = None  # set by the step before the forward

    def attend(self, layer, q, k, v):
        pos = self.positions
        kc, vc = self.k[layer], self.v[layer]
        kc.index_copy_(2, pos, k.transpose(1, 2))
        vc.index_copy_(2, pos, v.transpose(1, 2))
        keys = kc.repeat_interleave(self.rep, dim=1)
        values = vc.repeat_interleave(self.rep, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=self.causal[pos][None, None])
        return out.transpose(1, 2)


def sample_hf(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling the way HF transformers' warpers do it: temperature, sort-based top-p, multinomial."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    sorted_logits, order = torch.sort(logits, descending=False)
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop[:, -1] = False  # the most likely token always stays
    logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1)[:, 0]


def eager_step(model: Llama, cache: EagerCache, tokens: torch.Tensor, positions: torch.Tensor,
               temperature: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
    """One forward (prefill or decode) and sampling: gpt-fast's decode_one_token."""
    cache.positions = positions
    logits = model(tokens, positions, cache.attend)
    return sample_hf(logits[:, -1], temperature, top_p)


@torch.no_grad()
def generate_eager(model: Llama, prompt: torch.Tensor, n_new: int, step=eager_step, temperature: float = 0.0,
                   top_p: float = 1.0) -> torch.Tensor:
    c = model.c
    batch, plen = prompt.shape
    cache = EagerCache(c, batch, plen + n_new, model.cos.dtype, prompt.device)
    out = torch.empty((batch, n_new), dtype=torch.long, device=prompt.device)
    tok = eager_step(model, cache, prompt, torch.arange(plen, device=prompt.device), temperature, top_p)
    out[:, 0] = tok
    positions = torch.arange(plen, plen + n_new, device=prompt.device)
    for i in range(1, n_new):
        tok = step(model, cache, tok[:, None], positions[i - 1:i], temperature, top_p)
        out[:, i] = tok
    return out


# ---- the HF transformers baseline ------------------------------------------------

def build_hf_model(model: Llama, attn_implementation: str = "sdpa"):
    """transformers' ``LlamaForCausalLM`` sharing ``model``'s weights (no copy), or None without
    transformers. The two compute the same function: HF's RoPE rotates the same (first half,
    second half) pairs, so the weights go over unpermuted. ``attn_implementation="genfast"``:
    HF's model on genfast's attention (``genfast.hf``)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    if attn_implementation == "genfast":
        import genfast.hf  # noqa: F401  (registers the attention)
    c = model.c
    config = LlamaConfig(vocab_size=c.vocab, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                         num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq,
                         rope_theta=c.rope_base, rms_norm_eps=model.norm.eps, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no EOS: every loop runs n_new
    with torch.device(model.cos.device):  # allocate (and randomly initialize) in place: 1.1B on a GPU is quick
        hf = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.out.weight}
    for i, block in enumerate(model.layers):
        wq, wk, wv = block.wqkv.weight.split([q, kv, kv])
        gate, up = block.w13.weight.chunk(2)
        for name, w in (("self_attn.q_proj", wq), ("self_attn.k_proj", wk), ("self_attn.v_proj", wv),
                        ("self_attn.o_proj", block.wo.weight), ("mlp.gate_proj", gate), ("mlp.up_proj", up),
                        ("mlp.down_proj", block.w2.weight), ("input_layernorm", block.attn_norm.weight),
                        ("post_attention_layernorm", block.ffn_norm.weight)):
            state[f"model.layers.{i}.{name}.weight"] = w
    hf.load_state_dict(state, assign=True)  # strict: every HF weight is one of the model's
    return hf.eval()


@torch.no_grad()
def generate_hf(hf, prompt: torch.Tensor, n_new: int, cache: str = "dynamic", temperature: float = 0.0,
                top_p: float = 1.0) -> torch.Tensor:
    """Tokens (batch, n_new) from HF ``generate`` (greedy at temperature 0; else HF's temperature
    and top-p warpers, no top-k). cache: "dynamic" (HF's default), "static", or "genfast" (a
    ``genfast.hf.GenfastCache`` made for the call, as generate makes its static cache)."""
    kw = (dict(do_sample=False) if temperature == 0 else
          dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0))
    if cache == "static":
        kw["cache_implementation"] = "static"
    elif cache == "genfast":
        import genfast.hf

        kw[genfast.hf.cache_argument(hf)] = genfast.hf.GenfastCache(
            hf.config, prompt.shape[0], prompt.shape[1] + n_new, dtype=hf.dtype, device=prompt.device)
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, **kw)
    return out[:, prompt.shape[1]:]


# ---- the benchmark --------------------------------------------------------------

def _check_tokens(case: str, name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    if not torch.equal(got, ref):
        bad = (got != ref).nonzero()[0].tolist()
        raise AssertionError(f"decode {case}: {name}'s greedy tokens differ from eager's first at "
                             f"(row, step) = {bad}")


def _bench_batch(model, fast, hf, hf_genfast, prompt, n_new, compiled_step, device, reps) -> list[common.Row]:
    """fast: model patched by genfast (sharing its weights)."""
    case = f"batch {prompt.shape[0]}"
    items = prompt.shape[0] * n_new
    ref = generate_eager(model, prompt, n_new)
    _check_tokens(case, "genfast", generate_genfast(fast, prompt, n_new), ref)
    fns = {"genfast": lambda: generate_genfast(fast, prompt, n_new),
           "eager (gpt-fast)": lambda: generate_eager(model, prompt, n_new)}
    if device.type == "cuda":  # the decode step captured once in a CUDA graph (its capture timed too)
        _check_tokens(case, "genfast CUDA graph", generate_genfast_graph(fast, prompt, n_new), ref)
        fns["genfast CUDA graph"] = lambda: generate_genfast_graph(fast, prompt, n_new)
    # time to the first sampled decode token in a warm process (genfast has nothing to compile;
    # a fresh copy packs its weights in this call)
    first_model = patched(model)
    firsts = {"genfast": common.time_once(lambda: generate_genfast(first_model, prompt, 2), device)}
    notes = {}
    if hf is not None:
        _check_tokens(case, "HF generate", generate_hf(hf, prompt, n_new), ref)
        fns["HF generate"] = lambda: generate_hf(hf, prompt, n_new)
        static = "HF generate static"
        if device.type == "cuda" and compiled_step is not None:
            # generate compiles the static-cache decode step: time it as a fresh run
            torch._dynamo.reset()
            firsts[static] = common.time_once(lambda: generate_hf(hf, prompt, 2, "static"), device)
            got = generate_hf(hf, prompt, n_new, "static")
            notes[static] = "compiled" + ("" if torch.equal(got, ref) else ", tokens differ")
            fns[static] = lambda: generate_hf(hf, prompt, n_new, "static")
        elif device.type != "cuda":
            _check_tokens(case, static, generate_hf(hf, prompt, n_new, "static"), ref)
            fns[static] = lambda: generate_hf(hf, prompt, n_new, "static")
        _check_tokens(case, "HF + genfast.hf", generate_hf(hf_genfast, prompt, n_new, "genfast"), ref)
        fns["HF + genfast.hf"] = lambda: generate_hf(hf_genfast, prompt, n_new, "genfast")
    if compiled_step is not None:
        torch._dynamo.reset()
        # compilation included: the prefill runs eager, the first decode step compiles
        firsts["torch.compile step"] = (
            common.time_once(lambda: generate_eager(model, prompt, 1, compiled_step), device)
            + common.time_once(lambda: generate_eager(model, prompt, 2, compiled_step), device))
        if not torch.equal(generate_eager(model, prompt, n_new, compiled_step), ref):
            notes["torch.compile step"] = "tokens differ"
        fns["torch.compile step"] = lambda: generate_eager(model, prompt, n_new, compiled_step)
    t = common.time_many(fns, device, reps)
    rows = [common.Row("decode", case, name, items, "tok/s", t[name], first_s=firsts.get(name),
                       note=notes.get(name, "")) for name in fns]
    # temperature 0.8, top-p 0.9: random tokens, so timed only; shows what sort-based top-p costs
    fns = {"genfast": lambda: generate_genfast(fast, prompt, n_new, 0.8, 0.9),
           "eager (HF top-p)": lambda: generate_eager(model, prompt, n_new, eager_step, 0.8, 0.9)}
    if hf is not None:
        fns["HF generate"] = lambda: generate_hf(hf, prompt, n_new, temperature=0.8, top_p=0.9)
    t = common.time_many(fns, device, reps)
    return rows + [common.Row("decode", f"{case} p.9", name, items, "tok/s", t[name]) for name in t]


def bench(quick: bool = True, device=None, compile: bool = True, batches=(1, 16), prompt_len: int = 32,
          n_new: int = 32, reps: int = 3) -> list[common.Row]:
    device = torch.device(device) if device is not None else common.default_device()
    c = QUICK if quick or device.type == "cpu" else FULL
    if not quick and (prompt_len, n_new) == (32, 32):
        n_new, prompt_len = 128, 128
    c = dataclasses.replace(c, max_seq=max(c.max_seq, prompt_len + n_new))  # the rotary table's length
    model = build_model(c, device)
    hf = build_hf_model(model)
    hf_genfast = build_hf_model(model, "genfast")
    if hf_genfast is not None:
        genfast.patch(hf_genfast)
    fast = patched(model)
    rows = []
    compiled_step = None
    if compile:
        # Time to first token as a fresh install sees it: inductor's on-disk caches would
        # otherwise turn a second run's compile into a cache load.
        import warnings

        import torch._inductor.config as inductor_config

        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # the point, not news
        inductor_config.force_disable_caches = True
        # on a GPU as gpt-fast runs it: CUDA graphs ("reduce-overhead"; the caches are marked static)
        compiled_step = torch.compile(eager_step, mode="reduce-overhead" if device.type == "cuda" else None)
    for batch in batches:
        prompt = torch.randint(0, c.vocab, (batch, prompt_len), device=device,
                               generator=torch.Generator(device).manual_seed(batch))
        rows += _bench_batch(model, fast, hf, hf_genfast, prompt, n_new, compiled_step, device, reps)
    title = (f"decode: Llama-style {c.n_layers} layers, dim {c.dim}, {c.n_heads}/{c.n_kv_heads} heads, "
             f"vocab {c.vocab}, fp32, random weights; prompt {prompt_len}, {n_new} new tokens, greedy; {device}")
    common.print_rows(rows, title)
    if hf is None:
        print("HF generate baseline skipped: transformers is not installed (pip install transformers)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="TinyLlama-1.1B shapes, 128+128 tokens (GPU)")
    common.add_common_args(p)
    p.add_argument("--no-compile", action="store_true",
                   help="skip the baselines that compile (the torch.compile step; on a GPU also HF generate static)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32; a chat turn is 500-2000)")
    p.add_argument("--new", type=int, default=32, help="generated tokens (default 32)")
    a = p.parse_args(argv)
    common.apply_common_args(a)
    bench(quick=not a.full, device=a.device, compile=not a.no_compile, batches=a.batches, prompt_len=a.prompt,
          n_new=a.new)


if __name__ == "__main__":
    main()

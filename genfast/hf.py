"""HF transformers models on genfast's attention and KV cache.

Importing this module registers genfast's attention under the name
``"genfast"`` in transformers' attention (and attention-mask) registries, so a
model built with ``attn_implementation="genfast"`` attends with
:func:`genfast.attention_with_kvcache`; :class:`GenfastCache` is a
transformers ``Cache`` whose storage is a preallocated :class:`genfast.KVCache`
written in place by genfast's append op::

    import genfast.hf

    model = LlamaForCausalLM.from_pretrained(name, attn_implementation="genfast")
    cache = genfast.hf.GenfastCache(model.config, batch_size=ids.shape[0], max_cache_len=1024,
                                    dtype=model.dtype, device=ids.device)
    out = model.generate(ids, max_new_tokens=256, **{genfast.hf.cache_argument(model): cache})

or ``model.set_attn_implementation("genfast")`` on a loaded model. A fresh
cache (or ``cache.reset()``) per ``generate`` call. The attention also works
with transformers' default dynamic cache; its static cache is refused (its
keys are the whole buffer). Limits: causal decoders, batches without padding
(every row the same length; a padded batch raises), no sliding window or
logit softcap, head_dim one of 64, 80, 96, 128, 256 (``attention_with_kvcache``'s),
no beam search with :class:`GenfastCache`. Tested with transformers 4.57 and
5.24 (it needs ``CacheLayerMixin`` layers and the attention and mask registries).
"""
from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, AttentionMaskInterface, Cache
from transformers.cache_utils import CacheLayerMixin

from .attention import KVCache, attention_with_kvcache

ATTENTION = "genfast"


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function protocol: query (batch, heads, seq_q, head_dim) over key,
    value (batch, kv_heads, seq_kv, head_dim), the cache's whole content after this step's append
    (causal, the queries being the last seq_q positions). Returns ((batch, seq_q, heads, head_dim), None)."""
    if attention_mask is not None:
        raise ValueError("genfast attention: attention masks are not supported (the kernel masks causally; "
                         f"padded batches neither), got a mask of shape {tuple(attention_mask.shape)}")
    if dropout:
        raise ValueError(f"genfast attention: dropout must be 0 (inference), got {dropout}")
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(f"genfast attention: {name} is not supported, got {kwargs[name]}")
    # (batch, heads, seq, head_dim) -> (batch, seq, heads, head_dim): transposed views, no copy
    out = attention_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                 softmax_scale=scaling, causal=True)
    return out, None


def causal_mask(batch_size=None, q_length=None, kv_length=None, q_offset=None, attention_mask=None, **kwargs):
    """The mask-function protocol, called once per forward: None (``attention_forward`` masks
    causally by itself), after checking that the keys will be exactly the tokens seen so far and
    this forward's (not so in transformers' static cache, whose keys are the whole buffer) and
    that no row is padded."""
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:  # transformers 4.5x: the new tokens' positions instead of offset and length
        q_offset, q_length = cache_position[0], cache_position.shape[0]
    if q_offset is not None and kv_length is not None and int(q_offset) + q_length != kv_length:
        raise ValueError(f"genfast attention: the keys must be the {int(q_offset)} cached tokens and the "
                         f"{q_length} new ones, the cache gives {kv_length} (transformers' static cache is not "
                         "supported: use genfast.hf.GenfastCache)")
    if attention_mask is not None and not bool(attention_mask[:, -kv_length:].all()):
        raise ValueError("genfast attention: padded batches are not supported (every row must hold the same "
                         "number of tokens)")


def cache_argument(model) -> str:
    """The keyword under which ``model.generate`` takes a cache: ``"cache"`` where transformers has
    renamed ``past_key_values`` (during 5.x), else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


AttentionInterface.register(ATTENTION, attention_forward)
AttentionMaskInterface.register(ATTENTION, causal_mask)


class _GenfastLayer(CacheLayerMixin):
    """One layer of a GenfastCache: appends with genfast's op, returns the filled part of the cache."""

    is_sliding = False

    def __init__(self, owner: GenfastCache, index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True
        self.device = owner.kv.k.device

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # preallocated

    def update(self, key_states, value_states, *args, **kwargs):
        owner, kv = self.owner, self.owner.kv
        if self.index == 0:  # a new forward
            owner.length += key_states.shape[2]
        kv.update(self.index, key_states.transpose(1, 2), value_states.transpose(1, 2))
        if self.index == kv.num_layers - 1:
            kv.advance()  # every layer has written: commit (the attention reads the views below, not seqlens)
        n = owner.length
        return kv.k[self.index, :, :n].transpose(1, 2), kv.v[self.index, :, :n].transpose(1, 2)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers 4.5x passes cache_position (seq_q,)
            query_length = query_length.shape[0]
        return self.owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.owner.kv.max_seqlen

    get_max_cache_shape = get_max_length  # the name in transformers 4.5x

    def reset(self) -> None:
        self.owner.reset()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("GenfastCache: beam search (reorder_cache) is not supported")


class GenfastCache(Cache):
    """A transformers ``Cache`` stored in a :class:`genfast.KVCache` (contiguous, preallocated).

    Parameters
    ----------
    config : transformers ``PretrainedConfig``
        The model's config: num_hidden_layers, num_key_value_heads and head_dim (or
        hidden_size / num_attention_heads) size the cache.
    batch_size, max_cache_len : int
        Rows, and tokens each row can hold (prompt and generated).
    dtype : torch.dtype, default torch.float32
        The model's dtype (the queries').
    device : torch.device or str, optional

    Attributes
    ----------
    kv : genfast.KVCache
        The storage; ``kv.k[layer]`` is (batch, max_cache_len, kv_heads, head_dim).
    length : int
        Tokens each row holds (``kv.seqlens`` on the host), including those of a forward in progress.
    """

    def __init__(self, config, batch_size: int, max_cache_len: int, *, dtype: torch.dtype = torch.float32,
                 device=None):
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.kv = KVCache(text.num_hidden_layers, batch_size, max_cache_len, text.num_key_value_heads, head_dim,
                          dtype=dtype, device=device)
        self.length = 0
        super().__init__(layers=[_GenfastLayer(self, i) for i in range(text.num_hidden_layers)])

    def reset(self) -> None:
        self.kv.reset()
        self.length = 0

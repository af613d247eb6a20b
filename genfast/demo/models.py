"""The demo's four tiny models, one per family genfast accelerates.

- ``VAE``: an MLP encoder (training only) and a conv decoder whose norms are
  ``genfast.nn.GroupNormAct`` (GroupNorm + SiLU in one op);
- ``Generator`` / ``Discriminator``: DCGAN for 8x8 images; the generator is a
  plain ``nn.Sequential`` of ConvTranspose2d → BatchNorm2d → ReLU, which
  ``genfast.patch`` folds (BatchNorm into the conv) in eval mode;
- ``UNet``: a small epsilon-prediction UNet for DDPM, with diffusers-style
  residual blocks: GroupNorm + SiLU, the time embedding added before the
  second norm, both as ``genfast.group_norm_act``;
- ``CharGPT``: a character-level GPT (pre-LayerNorm, learned positions). Its
  ``forward`` trains with SDPA; ``step`` runs the same weights over a
  ``genfast.KVCache`` for sampling (head dim 64: attention_with_kvcache takes
  64, 80, 96, 128 or 256).

The images are scikit-learn's 8x8 digits scaled to [-1, 1]. Every genfast op
here falls back to plain PyTorch under ``genfast.use_backend("reference")``,
which is how the demo computes its reference samples.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import genfast
from genfast.nn import GroupNormAct

IMAGE = 8  # the digits are 8x8


# ---- the plain-PyTorch twins, for the demo's eager baseline ----------------------

class GroupNormSiLU(nn.GroupNorm):
    """``GroupNormAct`` written the usual way: ``F.silu(nn.GroupNorm(x + add))``, same parameters."""

    def forward(self, x, add=None):
        if add is not None:
            x = x + add[:, :, None, None]
        return F.silu(super().forward(x))


def to_eager(model: nn.Module) -> nn.Module:
    """A copy of model with every ``GroupNormAct`` (SiLU) replaced by a ``GroupNormSiLU``."""
    import copy

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GroupNormAct):
                if child.activation != "silu":
                    raise ValueError(f"to_eager: {name} uses {child.activation!r}, not silu")
                eager = GroupNormSiLU(child.num_groups, child.num_channels, child.eps)
                eager.load_state_dict(child.state_dict())
                setattr(parent, name, eager)
    return model


# ---- VAE -------------------------------------------------------------------------

class VAE(nn.Module):
    def __init__(self, latent: int = 8, width: int = 32):
        super().__init__()
        self.latent = latent
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(IMAGE * IMAGE, 256), nn.SiLU(),
                                     nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 2 * latent))
        w = width
        self.fc = nn.Linear(latent, 2 * w * 2 * 2)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 4, 2, 1)   # 2x2 -> 4x4
        self.norm1 = GroupNormAct(8, w)
        self.up2 = nn.ConvTranspose2d(w, w, 4, 2, 1)       # 4x4 -> 8x8
        self.norm2 = GroupNormAct(8, w)
        self.out = nn.Conv2d(w, 1, 3, padding=1)

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        """z (N, latent) -> images (N, 1, 8, 8) in [-1, 1]."""
        h = self.fc(z).view(z.shape[0], -1, 2, 2)
        h = self.norm1(self.up1(h))
        h = self.norm2(self.up2(h))
        return torch.tanh(self.out(h))


# ---- DCGAN -----------------------------------------------------------------------

def Generator(nz: int = 16, ngf: int = 64) -> nn.Sequential:
    """DCGAN's generator scaled to 8x8: (N, nz, 1, 1) -> (N, 1, 8, 8) in [-1, 1]."""
    return nn.Sequential(
        nn.ConvTranspose2d(nz, 2 * ngf, 2, 1, 0, bias=False), nn.BatchNorm2d(2 * ngf), nn.ReLU(True),  # 2x2
        nn.ConvTranspose2d(2 * ngf, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),      # 4x4
        nn.ConvTranspose2d(ngf, 1, 4, 2, 1, bias=False), nn.Tanh())                                    # 8x8


def Discriminator(ndf: int = 64) -> nn.Sequential:
    """(N, 1, 8, 8) -> (N,) logits (training only)."""
    return nn.Sequential(
        nn.Conv2d(1, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True),                                   # 4x4
        nn.Conv2d(ndf, 2 * ndf, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * ndf), nn.LeakyReLU(0.2, True),  # 2x2
        nn.Conv2d(2 * ndf, 1, 2, 1, 0), nn.Flatten(0))


# ---- DDPM UNet -------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), as in DDPM's Transformer-style positions."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """diffusers' ResnetBlock2D: norm1+SiLU, conv1, (+ time embedding) norm2+SiLU, conv2, + shortcut."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int = 8):
        super().__init__()
        self.norm1 = GroupNormAct(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = GroupNormAct(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h, add=self.temb(temb)))  # SiLU(GroupNorm(h + temb)) in one op
        return self.skip(x) + h


class UNet(nn.Module):
    """Epsilon prediction for (N, 1, 8, 8): 8x8 (ch) -> 4x4 (2 ch) -> 8x8 with a skip connection."""

    def __init__(self, ch: int = 32, temb: int = 128):
        super().__init__()
        self.temb_dim = temb
        self.time = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb), nn.SiLU())
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.down1 = ResBlock(ch, ch, temb)
        self.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down2 = ResBlock(ch, 2 * ch, temb)
        self.mid = ResBlock(2 * ch, 2 * ch, temb)
        self.upsample = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.up = ResBlock(2 * ch, ch, temb)
        self.norm_out = GroupNormAct(8, ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x, t):
        temb = self.time(timestep_embedding(t, self.temb_dim))
        h1 = self.down1(self.conv_in(x), temb)
        h = self.mid(self.down2(self.downsample(h1), temb), temb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up(torch.cat([h, h1], dim=1), temb)
        return self.conv_out(self.norm_out(h))


def ddpm_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """DDPM's linear beta schedule (1e-4 .. 0.02), cumulative products in fp64."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


# ---- character-level GPT ---------------------------------------------------------

class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _qkv(self, x):
        b, s, d = x.shape
        return self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)  # (b, s, h, hd) each

    def forward(self, x):
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        x = x + self.proj(a)
        return x + self.mlp(self.ln2(x))

    def step(self, x, cache: genfast.KVCache, layer: int):
        """Like forward for the new positions x (b, s, d), attending over the cache."""
        q, k, v = self._qkv(x)
        cache.update(layer, k, v)
        x = x + self.proj(cache.attend(layer, q).reshape(x.shape))
        return x + self.mlp(self.ln2(x))

    def step_eager(self, x, cache: tuple[torch.Tensor, torch.Tensor], start: int):
        """step over a plain (batch, heads, max_len, head_dim) K/V pair, gpt-fast style: write, SDPA."""
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))
        end = start + x.shape[1]
        cache[0][:, :, start:end] = k
        cache[1][:, :, start:end] = v
        # prefill (start 0) is causal; one new token attends to every cached position
        a = F.scaled_dot_product_attention(q, cache[0][:, :, :end], cache[1][:, :, :end], is_causal=start == 0)
        x = x + self.proj(a.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, dim: int = 128, layers: int = 2, heads: int = 2, context: int = 64):
        super().__init__()
        self.vocab, self.dim, self.n_layers, self.heads, self.context = vocab, dim, layers, heads, context
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        """tokens (b, s) -> logits (b, s, vocab), causal (training)."""
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def new_cache(self, batch: int, max_len: int) -> genfast.KVCache:
        return genfast.KVCache(self.n_layers, batch, max_len, self.heads, self.dim // self.heads,
                               dtype=self.head.weight.dtype, device=self.head.weight.device)

    def step(self, tokens, start: int, cache: genfast.KVCache):
        """Logits (b, s, vocab) of tokens (b, s) at positions start.., appended to the cache."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache, i)
        cache.advance()
        return self.head(self.ln(x))

    def new_eager_cache(self, batch: int, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (batch, self.heads, max_len, self.dim // self.heads)
        w = self.head.weight
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in range(self.n_layers)]

    def step_eager(self, tokens, start: int, cache: list[tuple[torch.Tensor, torch.Tensor]]):
        """step with the plain-PyTorch cache of ``new_eager_cache``."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for block, layer_cache in zip(self.blocks, cache):
            x = block.step_eager(x, layer_cache, start)
        return self.head(self.ln(x))

"""Train the demo's four models and write their weights beside this file.

    pip install scikit-learn docutils   # the training data; sampling needs neither
    python -m genfast.demo.train [--only vae gan ddpm gpt] [--seed 0] [--threads 1]

Data:
- images: scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``,
  1797 images, a copy of the UCI "Optical Recognition of Handwritten Digits"
  test set shipped inside scikit-learn), scaled to [-1, 1];
- text: the docstrings of the docutils modules that declare themselves "placed
  in the public domain" (docutils' COPYING.txt), read from the installed
  package's source with ``ast`` (nothing is imported or executed), ASCII only.

Each model trains for a fixed number of steps from ``--seed`` on one CPU
thread by default (about two minutes each on the development machine).
Weights are stored in fp16 (the demo loads them as fp32) to keep the files small.
"""
from __future__ import annotations

import argparse
import ast
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import genfast

from . import models

HERE = Path(__file__).resolve().parent
WEIGHTS = {name: HERE / f"{name}.pt" for name in ("vae", "gan", "ddpm", "gpt")}


def digits() -> torch.Tensor:
    """(1797, 1, 8, 8) fp32 in [-1, 1]."""
    from sklearn.datasets import load_digits  # training only

    x = torch.tensor(load_digits().images, dtype=torch.float32)  # 0..16
    return (x / 8.0 - 1.0)[:, None]


def public_domain_text() -> str:
    """docutils' public-domain modules' docstrings, printable ASCII plus newlines."""
    import docutils  # training only

    parts = []
    for path in sorted(Path(docutils.__file__).parent.rglob("*.py")):
        src = path.read_text(encoding="utf-8")
        if "placed in the public domain" not in src:
            continue
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
    text = "\n\n".join(parts)
    return "".join(c for c in text if c == "\n" or " " <= c <= "~")


def batches(n: int, batch: int, steps: int, g: torch.Generator):
    """Index tensors of ``batch`` rows, reshuffled every epoch."""
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos:pos + batch]
        pos += batch


def save(name: str, model: torch.nn.Module, config: dict, **extra) -> None:
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"config": config, "state_dict": state, **extra}, WEIGHTS[name])
    size = WEIGHTS[name].stat().st_size
    print(f"  wrote {WEIGHTS[name]} ({size / 1024:.0f} KiB)")


def log(name: str, step: int, steps: int, loss: float, t0: float) -> None:
    if step % max(steps // 5, 1) == 0 or step == steps:
        print(f"  {name} step {step}/{steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)


def train_vae(data, seed: int, steps: int = 2000, batch: int = 64) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = {"latent": 8, "width": 32}
    model = models.VAE(**config)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for step, idx in enumerate(batches(len(data), batch, steps, g), 1):
        x = data[idx]
        mu, logvar = model.encode(x)
        # genfast draws eps inside the op (one stream position per element and step)
        z, kl = genfast.reparameterize_with_kl(mu, logvar, seed=seed, offset=step * mu.numel())
        # Gaussian likelihood with std 0.25 on [-1, 1] pixels; KL summed over latents; both per image
        recon = ((model.decode(z) - x) ** 2).sum() / (2 * 0.25**2)
        loss = (recon + kl) / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        log("vae", step, steps, loss.item(), t0)
    save("vae", model.eval(), config)


def train_gan(data, seed: int, steps: int = 2000, batch: int = 64) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = {"nz": 16, "ngf": 64}
    gen, disc = models.Generator(**config), models.Discriminator()
    for m in (*gen.modules(), *disc.modules()):  # DCGAN's init
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight, 1.0, 0.02)
            torch.nn.init.zeros_(m.bias)
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    ones, zeros = torch.ones(batch), torch.zeros(batch)
    t0 = time.perf_counter()
    for step, idx in enumerate(batches(len(data), batch, steps, g), 1):
        fake = gen(torch.randn(batch, config["nz"], 1, 1))
        loss_d = (F.binary_cross_entropy_with_logits(disc(data[idx]), ones)
                  + F.binary_cross_entropy_with_logits(disc(fake.detach()), zeros))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = F.binary_cross_entropy_with_logits(disc(fake), ones)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        log("gan (generator)", step, steps, loss_g.item(), t0)
    save("gan", gen.eval(), config)


def train_ddpm(data, seed: int, steps: int = 1500, batch: int = 64) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = {"ch": 32, "temb": 128}
    model = models.UNet(**config)
    abar = models.ddpm_alphas_cumprod().float()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.perf_counter()
    for step, idx in enumerate(batches(len(data), batch, steps, g), 1):
        x0 = data[idx]
        t = torch.randint(0, len(abar), (batch,))
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log("ddpm", step, steps, loss.item(), t0)
    save("ddpm", model.eval(), config)


def train_gpt(text: str, seed: int, steps: int = 1500, batch: int = 16) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    chars = "".join(sorted(set(text)))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    config = {"vocab": len(chars), "dim": 128, "layers": 2, "heads": 2, "context": 64}
    model = models.CharGPT(**config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    ctx = config["context"]
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - ctx - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + ctx] for s in starts.tolist()])
        y = torch.stack([data[s + 1:s + ctx + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        log("gpt", step, steps, loss.item(), t0)
    print(f"  gpt: {len(text)} characters of text, vocabulary {len(chars)}")
    save("gpt", model.eval(), config, chars=chars)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(WEIGHTS), default=list(WEIGHTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for name in a.only:
        print(f"training {name}", flush=True)
        t0 = time.perf_counter()
        if name == "gpt":
            train_gpt(public_domain_text(), a.seed)
        else:
            {"vae": train_vae, "gan": train_gan, "ddpm": train_ddpm}[name](digits(), a.seed)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

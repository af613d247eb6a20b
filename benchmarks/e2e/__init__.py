"""End-to-end sampling pipelines, one module each; ``run`` is what
``python -m genfast bench --e2e`` calls."""
from __future__ import annotations

import importlib

PIPELINES = ("decode", "diffusion", "vae", "gan")


def run(quick: bool = True, device=None, names=PIPELINES) -> list:
    """Run each pipeline's ``bench`` (each prints its table); returns every row."""
    unknown = sorted(set(names) - set(PIPELINES))
    if unknown:
        raise SystemExit(f"genfast bench --e2e: unknown pipelines {unknown}; choose from {list(PIPELINES)}")
    rows = []
    for name in names:
        rows += importlib.import_module(f"{__name__}.{name}").bench(quick=quick, device=device)
    return rows

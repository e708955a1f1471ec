"""The FLOP floor of ``../shared/notes/performance.md``: what a sweep truly needs (per
configuration, blocks ``l..L-1`` over positions ``t..T-1`` plus one last-position unembedding)
at the matmul rate measured on this machine."""

from __future__ import annotations

import time
from typing import Any

import torch
from _measure import sync
from _model import Shape

from kloc_lens.model import device_of


def layer_flops(shape: Shape, keys: int) -> float:
    """FLOPs of one block for one token attending to ``keys`` positions."""
    d = shape.d_model
    return 2 * (4 * d * d + 2 * d * shape.d_mlp) + 4 * keys * d


def unembed_flops(shape: Shape) -> float:
    return 2.0 * shape.d_model * shape.d_vocab


def forward_flops(shape: Shape, tokens: int) -> float:
    return tokens * (shape.n_layers * layer_flops(shape, shape.n_pos) + unembed_flops(shape))


def floor_flops(shape: Shape, starts: list[tuple[int, int]], rows: int) -> float:
    """What a sweep truly needs: per configuration, blocks ``l..L-1`` over positions ``t..T-1``
    plus one last-position unembedding, for each of its rows."""
    total = 0.0
    for layer, pos in starts:
        total += (shape.n_layers - layer) * (shape.n_pos - pos) * layer_flops(shape, shape.n_pos)
        total += unembed_flops(shape)
    return rows * total


def matmul_rate(model: Any, shape: Shape, batch: int, repeats: int = 3) -> float:
    """FLOP/s of a batch-large forward pass of the raw HF model (no hooks)."""
    hf = model.original_model
    device = device_of(model)
    tokens = torch.randint(2, shape.d_vocab, (batch, shape.n_pos), device=device)
    best = float("inf")
    with torch.no_grad():
        hf(tokens[:2])
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            hf(tokens)
            sync(device)
            best = min(best, time.perf_counter() - start)
    return forward_flops(shape, batch * shape.n_pos) / best

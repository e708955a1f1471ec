"""The memory budget: how many configurations and tokens one packed pass may hold.

A packed forward pass repeats the base run's rows once per configuration, so its activations
grow with the number of configurations packed into it. The executor sizes passes from a byte
budget (:data:`DEFAULT_MEMORY_BUDGET` unless the caller gives one), never more than half the
memory free on the model's device when the sweep starts. The estimates below are upper bounds
of the peak activation bytes of float32 passes of a GPT-style block (attention scores included).

>>> from types import SimpleNamespace
>>> model = SimpleNamespace(cfg=SimpleNamespace(d_model=8, d_mlp=32, n_heads=2, d_vocab=10))
>>> row_bytes(model, n_pos=4)
3648
>>> configs_per_pass(model, rows=1, n_pos=4, batch_size=None, memory_budget=10_000)
2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kloc_lens.errors import SweepError
from kloc_lens.model import available_bytes

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "MIN_PASS_TOKENS",
    "PassLimits",
    "configs_per_pass",
    "pass_limits",
    "row_bytes",
    "token_bytes",
    "usable_budget",
]

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
"""Bytes of activations one packed forward pass may use, by default (never more than half the
memory free on the model's device)."""

MIN_PASS_TOKENS = {"cpu": 256, "cuda": 4096}
"""Per device type: block-by-block passes smaller than this many token rows are packed together
even at some padding cost (small matmuls waste the device)."""


def _d_mlp(cfg: Any) -> int:
    return int(getattr(cfg, "d_mlp", None) or 4 * cfg.d_model)


def row_bytes(model: Any, n_pos: int) -> int:
    """Peak bytes of one row of a full forward pass (activations, logits and their softmax)."""
    cfg = model.cfg
    per_pos = 2 * cfg.d_vocab + 10 * cfg.d_model + 3 * _d_mlp(cfg) + 4 * cfg.n_heads * n_pos
    return 4 * n_pos * per_pos


def token_bytes(model: Any, n_pos: int) -> int:
    """Peak bytes per token row of a block-by-block pass (logits not included)."""
    cfg = model.cfg
    return 4 * (12 * cfg.d_model + 3 * _d_mlp(cfg) + 4 * cfg.n_heads * n_pos)


def usable_budget(memory_budget: int, device: torch.device) -> int:
    """The bytes a pass may use: ``memory_budget``, but at most half the free memory.

    Raises:
        SweepError: A budget below one byte.
    """
    if memory_budget < 1:
        raise SweepError(f"memory_budget must be >= 1 byte, got {memory_budget}")
    free = available_bytes(device)
    return memory_budget if free is None else max(1, min(memory_budget, free // 2))


def configs_per_pass(
    model: Any, rows: int, n_pos: int, batch_size: int | None, memory_budget: int
) -> int:
    """How many configurations to pack into one full forward pass.

    Raises:
        SweepError: A batch size below 1.
    """
    if batch_size is not None:
        if batch_size < 1:
            raise SweepError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size
    return max(1, memory_budget // max(1, row_bytes(model, n_pos) * rows))


@dataclass(frozen=True)
class PassLimits:
    """Bounds on one block-by-block pass.

    Attributes:
        max_tokens: Token rows (configurations x rows x positions run) per pass.
        max_configs: Configurations per pass (their logits share the budget), or ``None``.
        min_tokens: Passes smaller than this are packed together regardless of padding.
    """

    max_tokens: int
    max_configs: int | None
    min_tokens: int


def pass_limits(
    model: Any,
    rows: int,
    n_pos: int,
    *,
    reads_one_position: bool,
    batch_size: int | None,
    memory_budget: int,
    device: torch.device,
) -> PassLimits:
    """The bounds of block-by-block passes of ``rows`` rows of ``n_pos`` tokens."""
    vocab_bytes = 4 * int(model.cfg.d_vocab) * (2 if reads_one_position else n_pos)
    max_tokens = max(1, memory_budget // token_bytes(model, n_pos))
    # logits of every configuration's rows share the budget
    max_configs = max(1, memory_budget // max(1, 2 * vocab_bytes * rows))
    if batch_size is not None:
        max_configs = min(max_configs, batch_size)
    return PassLimits(max_tokens, max_configs, MIN_PASS_TOKENS.get(device.type, 256))

"""Measuring one row of a benchmark table: wall and CPU time, peak memory, load, agreement."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _model import Shape


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so the next row's growth shows in RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the starting point while the block runs: CUDA allocator peak on a GPU,
    resident-set size sampled every 2 ms on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            _release_free_heap()
            process = psutil.Process()
            self._start = process.memory_info().rss
            self._max = self._start

            def sample() -> None:
                while not self._stop.is_set():
                    self._max = max(self._max, process.memory_info().rss)
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._max - self._start


@dataclass
class Row:
    sweep: str
    method: str
    seconds: float
    peak_bytes: int
    floor_seconds: float
    values: torch.Tensor
    note: str = ""
    ratio: float | None = None  # baseline time / this time
    load: tuple[float, float] = (0.0, 0.0)
    cpu_seconds: float = 0.0  # CPU time of this process (all its threads)
    cpu_ratio: float | None = None


@dataclass
class Suite:
    shape: Shape
    device: torch.device
    rate: float
    rows: list[Row] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)


def timed(
    suite: Suite, sweep: str, method: str, floor: float, fn: Callable[[], torch.Tensor], note=""
) -> Row:
    load_before = os.getloadavg()[0]
    with PeakMemory(suite.device) as memory:
        sync(suite.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        values = fn()
        sync(suite.device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    row = Row(sweep, method, seconds, memory.peak, floor, values.detach().float().cpu(), note)
    row.load = (load_before, os.getloadavg()[0])
    row.cpu_seconds = cpu
    suite.rows.append(row)
    print(f"  {sweep:<34} {method:<44} {seconds:8.2f} s ({cpu:.2f} s cpu)", flush=True)
    return row


def compare_to(row: Row, base: Row) -> None:
    row.ratio = base.seconds / row.seconds
    row.cpu_ratio = base.cpu_seconds / row.cpu_seconds if row.cpu_seconds else None


def agree(suite: Suite, what: str, got: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Record whether two results agree to ``rtol`` of the expected values' largest magnitude."""
    got, expected = got.float().reshape(expected.shape), expected.float()
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    ok = diff <= rtol * scale
    suite.checks.append(
        f"{'OK  ' if ok else 'FAIL'} {what}: max |diff| = {diff:.3g} "
        f"({diff / scale if scale else 0:.2g} of max |value| {scale:.3g}; tolerance {rtol:g})"
    )
    if not ok:
        print("DISAGREE:", suite.checks[-1], flush=True)

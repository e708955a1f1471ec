"""The result table of a benchmark suite and where it is written."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import torch
from _measure import Suite

RESULTS = Path(__file__).resolve().parent / "results"
"""Where the benchmarks' latest outputs are committed."""


def write_result(text: str, name: str, out: Path | None = None) -> None:
    """Write a benchmark's report to ``out`` (default ``results/{name}.txt``) and say where."""
    path = out or RESULTS / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"written to {path}")


def machine() -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"cpu: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {importlib.metadata.version('transformers')}, "
        f"transformer_lens {importlib.metadata.version('transformer_lens')}",
    ]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    return lines


def report(suite: Suite, title: str, extra: list[str] = ()) -> str:
    shape = suite.shape
    out = [
        title,
        "=" * len(title),
        "",
        *machine(),
        f"device: {suite.device}",
        f"model: random GPT-2 ({shape.name}: {shape.n_layers} layers, d_model {shape.d_model}, "
        f"{shape.n_heads} heads, vocab {shape.d_vocab}), TransformerBridge in compatibility "
        f"mode; prompt of {shape.n_pos} tokens, 4-token subject right after BOS",
        f"matmul rate (raw HF forward, batch-large): {suite.rate / 1e12:.3f} TFLOP/s",
        *extra,
        "",
        f"{'sweep':<36}{'method':<48}{'time':>9}{'vs base':>9}{'/floor':>8}{'peak mem':>11}"
        f"{'cpu time':>10}{'vs base':>9}{'load':>11}",
    ]
    for row in suite.rows:
        ratio = f"{row.ratio:7.1f}x" if row.ratio is not None else "   (base)"
        cpu_ratio = f"{row.cpu_ratio:7.1f}x" if row.cpu_ratio is not None else "   (base)"
        out.append(
            f"{row.sweep:<36}{row.method:<48}{row.seconds:8.2f}s{ratio:>9}"
            f"{row.seconds / row.floor_seconds:7.1f}x{row.peak_bytes / 2**20:8.0f} MiB"
            f"{row.cpu_seconds:9.2f}s{cpu_ratio:>9}{row.load[0]:5.2f}-{row.load[1]:4.2f}"
        )
        if row.note:
            out.append(f"{'':<36}  {row.note}")
    out += [
        "",
        "vs base: time of the baseline row of the same sweep (TransformerLens patching or the",
        "ROME-style loop) over this row's time. /floor: time over the FLOP floor of",
        "shared/notes/performance.md (per configuration: blocks l..L-1 over positions t..T-1 plus",
        "one last-position unembedding, at the matmul rate above); below 1 means the sweep skipped",
        "configurations that change nothing, which the floor does not. peak mem: peak memory",
        "above the start of the row (CPU: resident set sampled every 2 ms; GPU: allocator peak).",
        "cpu time: CPU time of the benchmark process over the row (all its threads; with one",
        "thread it is the work done, whatever else runs on the machine). load: 1-minute load",
        "average before-after the row (other jobs share this machine).",
        "",
        "agreement:",
        *suite.checks,
    ]
    return "\n".join(out) + "\n"

"""Sweep speed on a GPU: the three comparisons of ``sweep_speed.py`` for a GPT-2-XL shape
(48 layers, d_model 1600, 25 heads, vocab 50257), in float32 and with bfloat16 opt-in.

Targets (issue 3, one H100, fp32): the full three-kind causal trace at least 10x faster than the
ROME-style loop (about 73 s there), and under 1 s with ``precision="bf16"``.

Usage::

    python benchmarks/sweep_speed_gpu.py                  # CUDA, GPT-2-XL shape
    python benchmarks/sweep_speed_gpu.py --small --cpu    # the same code on a small CPU model
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from _model import GPT2_XL, SMOKE, build_model
from _report import report, write_result
from _sweeps import run_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 4-layer model instead of GPT-2-XL")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (no GPU needed)")
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip TransformerLens patching (the ROME loop always runs)",
    )
    parser.add_argument("--out", type=Path, default=None, help="result file")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu (with --small) to exercise the script on a CPU")
    device = "cpu" if args.cpu else "cuda"
    shape = SMOKE if args.small else GPT2_XL
    print(f"building {shape.name} on {device}", flush=True)
    model = build_model(shape, device)
    precisions = ("fp32", "bf16")
    suite = run_suite(
        model,
        shape,
        precisions=precisions,
        plain=True,
        baselines=not args.no_baselines,
        rate_batch=320 if device == "cuda" else 64,
    )
    extra = [f"load average at start: {os.getloadavg()[0]:.2f}"] if device == "cpu" else []
    text = report(suite, f"kloc_lens sweep speed, {device.upper()}", extra)
    print(text)
    name = "sweep_speed_gpu" + ("_small" if args.small else "") + ("_cpu" if args.cpu else "")
    write_result(text, name, args.out)


if __name__ == "__main__":
    main()

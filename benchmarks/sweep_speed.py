"""Sweep speed on CPU: kloc_lens against transformer_lens.patching and the ROME-style loop.

One process, one random GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257),
a 16-token prompt:

1. layer x position residual patching with token corruption, against
   ``transformer_lens.patching.get_act_patch_resid_pre`` on the same bridge;
2. layer x head patching at all positions, against ``get_act_patch_attn_head_out_all_pos``;
3. the ROME causal trace (residual, MLP window 10, attention window 10; 10 noise samples on a
   4-token subject), against a loop that runs one forward of the noisy batch (1 clean + 10 noisy
   rows) with the restore hooks per (kind, layer, position), as ROME's code does.

Each pair is checked for agreement; the table (time, ratio, time over the FLOP floor, peak memory)
is printed and written to ``benchmarks/results/sweep_speed_cpu.txt``.

Usage::

    python benchmarks/sweep_speed.py             # the issue's benchmark (about 5 minutes)
    python benchmarks/sweep_speed.py --smoke     # a 4-layer model, for a quick check
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from _model import GPT2_SMALL, SMOKE, build_model
from _report import report, write_result
from _sweeps import run_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny 4-layer model, quick check")
    parser.add_argument(
        "--plain-trace",
        action="store_true",
        help="also time the trace with shortcuts off (adds about 2 minutes)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="result file")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = SMOKE if args.smoke else GPT2_SMALL
    load = os.getloadavg()
    print(f"building {shape.name} (load average {load[0]:.2f})", flush=True)
    model = build_model(shape, "cpu")
    suite = run_suite(model, shape, plain_trace=args.plain_trace)
    text = report(
        suite,
        "kloc_lens sweep speed, CPU",
        [f"load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)"],
    )
    print(text)
    name = "sweep_speed_cpu" + ("_smoke" if args.smoke else "")
    name += f"_{args.threads}thread" if args.threads is not None else ""
    write_result(text, name, args.out)


if __name__ == "__main__":
    main()

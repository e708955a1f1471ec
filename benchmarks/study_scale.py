"""The study at scale on this machine: one process against ``torchrun`` with two, a resumed run
that finds every unit done, and the key statistics of a GPT-2-XL-shaped layer.

1. **Processes.** One study of a fixed size on the shipped factworld (the command line, as a
   user runs it) in one process with every core, then under
   ``torchrun --standalone --nproc-per-node 2`` with one thread per rank; wall time of each
   and whether the two ``results.json`` are the same numbers (they must be). On a 2-core machine
   expect about 1x: the point is correctness and the cost of the ranks' start-up and barriers.
2. **Resume.** The same command again on the single process's output directory: every unit is
   found on disk, so the run only reads them and writes the report.
3. **Key statistics.** ``E[k k^T]`` of ``W_out``'s keys (``mlp.hook_post``, 6,400 wide) of a
   random GPT-2-XL-shaped layer (d_model 1600; the model is cut to the two first blocks, which is
   all the statistics of layer 1 run) over random texts of 64 tokens, in a fresh process each:
   :func:`kloc_lens.edit.second_moment` (float64 sum streamed one batch at a time) against the
   peer recipe that gathers every key first and multiplies once (the layout of a naive
   implementation; EasyEdit's users' most common complaint is this step running out of memory).
   Wall time and peak resident memory growth of each, and the largest difference of the two
   matrices.

Measurements, not targets. Output: ``benchmarks/results/study_scale_cpu.txt``.

Usage::

    python benchmarks/study_scale.py            # about 10 minutes on 2 cores
    python benchmarks/study_scale.py --smoke    # a tiny study and a small layer
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _model import GPT2_XL, SMOKE, Shape, build_model
from _report import machine, write_result

STUDY = [
    *("--n-trace", "20", "--n-trace-relation-prompts", "10", "--n-edit", "10"),
    *("--n-layer-sweep", "2", "--n-queries", "5", "--n-retrace", "2", "--samples", "5"),
]
SMOKE_STUDY = [
    *("--n-trace", "4", "--n-trace-relation-prompts", "2", "--n-edit", "2"),
    *("--n-layer-sweep", "1", "--n-queries", "2", "--n-retrace", "1", "--samples", "2"),
    *("--neuron-steps", "4"),
]


def _study(out: Path, args: list[str], ranks: int, threads: int | None = None) -> float:
    """Wall seconds of ``kloc-lens study`` in ``ranks`` processes (1: a plain process), each on
    ``threads`` threads (default: the cores shared out)."""
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "kloc_lens", "--no-progress", "study", "--out", str(out)]
    if ranks > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        command = [sys.executable, *launcher, "-m", "kloc_lens", *command[3:]]
    start = time.perf_counter()
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def _numbers(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {key: value for key, value in results.items() if key != "run"}


def _units(out: Path) -> tuple[int, int]:
    run = json.loads((out / "results.json").read_text())["run"]
    return int(run["units_computed"]), int(run["units_found"])


def _stats_worker(method: str, shape_name: str, n_texts: int, out: str) -> None:
    """One statistics measurement in this (fresh) process; writes its numbers to ``out``."""
    from kloc_lens.edit import second_moment

    shape = {"xl": GPT2_XL, "smoke": SMOKE}[shape_name]
    cut = Shape(shape.name, 2, shape.d_model, shape.n_heads, shape.d_vocab, n_pos=64)
    model = build_model(cut)
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(2000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(63)) for _ in range(n_texts)]
    layer = 1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "streamed":
        matrix = second_moment(model, layer, texts, progress=False).matrix
    else:  # the peer: every key gathered, then one product
        keys = []
        with torch.no_grad():
            for i in range(0, len(texts), 16):
                _, cache = model.run_with_cache(
                    texts[i : i + 16], names_filter=f"blocks.{layer}.mlp.hook_post"
                )
                keys.append(cache[f"blocks.{layer}.mlp.hook_post"][:, 1:].flatten(0, 1))
        every = torch.cat(keys).double()
        matrix = (every.T @ every / every.shape[0]).float()
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    torch.save(matrix, out + ".pt")
    Path(out).write_text(json.dumps({"seconds": seconds, "peak_growth_mib": grown / 1024}))


def _stats(shape: str, n_texts: int, work: Path) -> list[str]:
    rows = {}
    for method in ("streamed", "all keys"):
        out = work / f"stats-{method.replace(' ', '_')}.json"
        command = [
            sys.executable,
            __file__,
            "--stats-worker",
            method,
            shape,
            str(n_texts),
            str(out),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"statistics worker ({method}) failed:\n{done.stderr[-3000:]}")
        rows[method] = json.loads(out.read_text())
        rows[method]["matrix"] = torch.load(str(out) + ".pt")
    gap = float((rows["streamed"]["matrix"] - rows["all keys"]["matrix"]).abs().max())
    base = rows["all keys"]
    lines = [
        f"{'method':<40}{'wall s':>9}{'vs peer':>9}{'peak mem growth':>17}{'vs peer':>9}",
    ]
    for method, label in (
        ("all keys", "peer: every key gathered, one product"),
        ("streamed", "kloc_lens second_moment (float64 stream)"),
    ):
        row = rows[method]
        lines.append(
            f"{label:<40}{row['seconds']:>9.1f}{base['seconds'] / row['seconds']:>8.2f}x"
            f"{row['peak_growth_mib']:>13.0f} MiB"
            + (
                f"{base['peak_growth_mib'] / row['peak_growth_mib']:>8.2f}x"
                if row["peak_growth_mib"] >= 1.0
                else f"{'-':>9}"
            )
        )
    lines.append(
        "peak mem growth: the process's peak resident memory after the method minus before it "
        "(0: it stayed under the peak of building the model)"
    )
    lines.append(f"largest |difference| of the two matrices: {gap:.2e}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny study and a small layer")
    parser.add_argument("--texts", type=int, default=400, help="texts for the key statistics")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: results/)")
    parser.add_argument("--stats-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stats_worker:
        method, shape, n_texts, out = args.stats_worker
        _stats_worker(method, shape, int(n_texts), out)
        return
    study = SMOKE_STUDY if args.smoke else STUDY
    n_texts = 16 if args.smoke else args.texts
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kloc-scale-") as tmp:
        work = Path(tmp)
        one = _study(work / "one", study, ranks=1)
        single = _study(work / "single", study, ranks=1, threads=1)
        two = _study(work / "two", study, ranks=2)
        # float32 reductions depend on how many threads a kernel splits them over: the ranks
        # (one thread each) must equal one process on one thread exactly
        same = _numbers(work / "single") == _numbers(work / "two")
        same_threads = _numbers(work / "one") == _numbers(work / "two")
        resumed = _study(work / "one", study, ranks=1)
        computed, found = _units(work / "one")
        stats = _stats("smoke" if args.smoke else "xl", n_texts, work)
    end = os.getloadavg()
    shape = SMOKE if args.smoke else GPT2_XL
    title = "kloc_lens study at scale: processes, resume, key statistics (CPU)"
    lines = [
        title,
        "=" * len(title),
        "",
        *machine(),
        f"load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, at the end: "
        f"{end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} (1/5/15 min)",
        f"study: shipped factworld, kloc-lens study {' '.join(study)}",
        "",
        f"{'run':<52}{'wall s':>9}{'vs one process':>16}",
        f"{'one process (' + str(os.cpu_count()) + ' threads)':<52}{one:>9.1f}{1.0:>15.2f}x",
        f"{'one process (1 thread)':<52}{single:>9.1f}{one / single:>15.2f}x",
        f"{'torchrun, 2 processes (1 thread each)':<52}{two:>9.1f}{one / two:>15.2f}x",
        f"{'resumed, every unit on disk':<52}{resumed:>9.1f}{one / resumed:>15.2f}x",
        "",
        f"2-process results.json equal to one process on 1 thread: {same}",
        f"... and to one process on {os.cpu_count()} threads: {same_threads} (float32 reductions "
        "split over other thread counts round differently)",
        f"resumed run: {computed} units computed, {found} found on disk",
        "",
        f"key statistics: W_out keys of layer 1 of a random {shape.name} model (d_mlp "
        f"{shape.d_mlp}), {n_texts} texts of 64 tokens, each method in a fresh process",
        *stats,
        "",
        "wall s of a study include starting Python and loading the model in each process.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not same:
        print("the two studies' numbers differ: this is a bug", file=sys.stderr)
    write_result(text, "study_scale_cpu_smoke" if args.smoke else "study_scale_cpu", args.out)


if __name__ == "__main__":
    main()

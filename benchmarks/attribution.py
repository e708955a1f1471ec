"""Attribution patching (AtP, AtP*) against exact activation patching, on CPU.

Two models, three sweeps, each over many prompts:

- the embedded factworld model (``kloc_lens.factworld.load_factworld``): entity prompts of facts
  it answers, the subject swapped for another subject of the same token length (whose answer for
  the same relation differs), metric ``logit(answer) - logit(other subject's answer)``;
- a random GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257): 16-token
  prompts of random words, the 4 subject tokens after BOS swapped for 4 other random words,
  metric ``logit(French) - logit(English)``.

Sweeps (restore direction, clean into corrupted): ``resid_pre`` layer x position, ``z`` layer x
head, ``z`` layer x position x head. For each prompt: exact patching
(:func:`kloc_lens.activation_patching`, the batched engine), AtP and AtP*
(:func:`kloc_lens.attribution_patching`); wall time of each; Spearman rank correlation of the
estimated against the exact ``|effect|`` over every component (AtP* estimates an unsigned size, so
both are ranked by magnitude); top-10 recall (the share of the exact top 10 by ``|effect|`` among
the method's top 10); and false negatives (exact top-10 components the method ranks below 50th),
with the layers where they sit. Means over prompts are printed and written with the machine
description to ``benchmarks/results/attribution_cpu.txt``. Measurements, not targets.

On GPT-2-small the exact layer x position x head sweep (2,304 patches per prompt) runs on as many
prompts as fit in ``--lph-budget`` seconds (default 600), measured on the first prompt; the output
says how many.

Usage::

    python benchmarks/attribution.py            # both models, 50 prompts (about half an hour)
    python benchmarks/attribution.py --smoke    # a 4-layer random model and 3 prompts
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _model import ANSWER, GPT2_SMALL, SMOKE, WRONG, Shape, build_model
from _report import machine, write_result

import kloc_lens as kl

SWEEPS = (
    ("resid_pre", "layer_pos", "resid_pre layer x pos"),
    ("z", "layer_head", "z layer x head"),
    ("z", "layer_pos_head", "z layer x pos x head"),
)
METHODS = ("atp", "atp*")
TOP = 10
FALSE_NEGATIVE_RANK = 50


@dataclass(frozen=True)
class Case:
    """One prompt pair and its metric."""

    clean: Any
    corrupted: Any
    metric: Any


@dataclass
class Cell:
    """Per-prompt measurements of one (model, sweep, method)."""

    seconds: list[float] = field(default_factory=list)
    exact_seconds: list[float] = field(default_factory=list)
    spearman: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    false_negatives: int = 0
    top_total: int = 0
    fn_layers: dict[int, int] = field(default_factory=dict)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of ``values`` (ties get their average rank)."""
    order = values.argsort()
    ranked = torch.empty_like(values, dtype=torch.float64)
    ranked[order] = torch.arange(len(values), dtype=torch.float64)
    for value in values.unique():
        tied = values == value
        if int(tied.sum()) > 1:
            ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else float("nan")


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def compare(cell: Cell, exact: Any, estimate: Any, layers: Sequence[int]) -> None:
    truth = exact.effect.abs().flatten().cpu()
    guess = estimate.effect.abs().flatten().cpu()
    cell.spearman.append(spearman(guess, truth))
    top = min(TOP, len(truth))
    true_top = set(truth.argsort(descending=True)[:top].tolist())
    order = guess.argsort(descending=True).tolist()
    cell.recall.append(len(true_top & set(order[:top])) / top)
    position = {index: rank for rank, index in enumerate(order)}
    per_layer = truth.numel() // len(layers)
    for index in true_top:
        cell.top_total += 1
        if position[index] >= FALSE_NEGATIVE_RANK:
            cell.false_negatives += 1
            layer = layers[index // per_layer]
            cell.fn_layers[layer] = cell.fn_layers.get(layer, 0) + 1


def run_model(
    name: str, model: Any, cases: Sequence[Case], lph_budget: float | None
) -> tuple[dict[tuple[str, str], Cell], dict[str, int]]:
    cells: dict[tuple[str, str], Cell] = {}
    used: dict[str, int] = {}
    layers = list(range(model.cfg.n_layers))
    warm = cases[0]
    kl.attribution_patching(model, warm.clean, warm.corrupted, warm.metric)  # warm up
    for site, sweep, label in SWEEPS:
        n_cases = len(cases)
        for index, case in enumerate(cases):
            if index >= n_cases:
                break
            inputs = (model, case.clean, case.corrupted, case.metric)
            exact, exact_seconds = timed(
                kl.activation_patching, *inputs, site=site, sweep=sweep, progress=False
            )
            if index == 0 and lph_budget is not None and sweep == "layer_pos_head":
                n_cases = max(3, min(len(cases), int(lph_budget / exact_seconds)))
            for method in METHODS:
                estimate, seconds = timed(
                    kl.attribution_patching, *inputs, site=site, sweep=sweep, method=method
                )
                cell = cells.setdefault((label, method), Cell())
                cell.seconds.append(seconds)
                cell.exact_seconds.append(exact_seconds)
                compare(cell, exact, estimate, layers)
            if index % 10 == 0:
                print(f"  {name}: {label}, prompt {index + 1}/{n_cases}", flush=True)
        used[label] = min(n_cases, len(cases))
    return cells, used


def factworld_cases(n: int, seed: int) -> tuple[Any, list[Case], str]:
    from kloc_lens.factworld import load_factworld

    model, world = load_factworld()
    rng = random.Random(seed)
    facts = list(world.facts)
    rng.shuffle(facts)
    by_length: dict[int, list[str]] = {}
    for subject in sorted({f.subject for f in facts}):
        length = len(model.tokenizer(" " + subject, add_special_tokens=False)["input_ids"])
        by_length.setdefault(length, []).append(subject)
    cases: list[Case] = []
    for fact in facts:
        prompt = kl.tokenize(model, fact.entity_prompt())
        answer = kl.target_token_ids(model, prompt.prompt)[0]
        with torch.no_grad():
            if int(model(prompt.tokens[None])[0, -1].argmax()) != answer:
                continue  # only facts the model answers
        length = len(prompt.span("subject"))
        for other in rng.sample(by_length.get(length, []), len(by_length.get(length, []))):
            if other == fact.subject:
                continue
            other_fact = world.fact(other, fact.relation_id or "")
            wrong = kl.target_token_ids(model, prompt.prompt, other_fact.object)[0]
            if wrong == answer:
                continue
            try:
                corrupted = kl.TokenReplacement(other).apply(model, prompt).tokens
            except kl.CorruptionError:
                continue
            cases.append(Case(prompt, corrupted, kl.LogitDiff(answer, wrong)))
            break
        if len(cases) == n:
            break
    cfg = model.cfg
    description = (
        f"factworld (shipped): {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"vocab {cfg.d_vocab}; entity prompts of {len(cases)} facts it answers, subject swapped "
        "for another subject of the same token length"
    )
    return model, cases, description


def random_cases(shape: Shape, n: int, seed: int) -> tuple[Any, list[Case], str]:
    model = build_model(shape, "cpu")
    tokenizer = model.tokenizer
    fillers = [f"w{i}" for i in range(2000)]
    rng = random.Random(seed)
    answer = tokenizer.convert_tokens_to_ids(ANSWER)
    wrong = tokenizer.convert_tokens_to_ids(WRONG)
    bos = tokenizer.bos_token_id
    cases = []
    for _ in range(n):
        words = rng.sample(fillers, shape.n_pos - 1 + 4)
        clean = [bos, *tokenizer.convert_tokens_to_ids(words[: shape.n_pos - 1])]
        corrupted = list(clean)
        corrupted[1:5] = tokenizer.convert_tokens_to_ids(words[shape.n_pos - 1 :])
        cases.append(
            Case(torch.tensor([clean]), torch.tensor([corrupted]), kl.LogitDiff(answer, wrong))
        )
    description = (
        f"random GPT-2 ({shape.name}: {shape.n_layers} layers, d_model {shape.d_model}, "
        f"{shape.n_heads} heads, vocab {shape.d_vocab}, HF default initialisation), "
        f"TransformerBridge; {n} prompts of {shape.n_pos} random words, the 4 tokens after BOS "
        "swapped for 4 others"
    )
    return model, cases, description


def table(name: str, cells: dict[tuple[str, str], Cell], used: dict[str, int]) -> list[str]:
    lines = [
        f"{'model':<14}{'sweep':<24}{'method':<8}{'prompts':>8}{'exact s':>10}{'method s':>10}"
        f"{'speed-up':>10}{'spearman':>10}{'(min)':>8}{'top10 rec':>10}{'FN':>9}  FN layers"
    ]
    for (label, method), cell in cells.items():
        n = len(cell.seconds)
        exact_s = sum(cell.exact_seconds) / n
        method_s = sum(cell.seconds) / n
        rho = torch.tensor(cell.spearman)
        recall = sum(cell.recall) / n
        layers = ", ".join(f"L{k}:{v}" for k, v in sorted(cell.fn_layers.items())) or "-"
        lines.append(
            f"{name:<14}{label:<24}{method:<8}{used[label]:>8}{exact_s:>10.3f}{method_s:>10.3f}"
            f"{exact_s / method_s:>9.1f}x{float(rho.nanmean()):>10.3f}"
            f"{float(rho.nan_to_num(2.0).min()):>8.3f}{recall:>10.2f}"
            f"{cell.false_negatives:>5}/{cell.top_total:<4} {layers}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a 4-layer random model, 3 prompts")
    parser.add_argument("--prompts", type=int, default=50, help="prompts per model and sweep")
    parser.add_argument(
        "--lph-budget",
        type=float,
        default=600.0,
        help="seconds of exact layer x pos x head patching on GPT-2-small (fewer prompts if over)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="result file")
    parser.add_argument("--note", action="append", default=[], help="a line for the header")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    n = 3 if args.smoke else args.prompts
    runs = []
    if not args.smoke:
        print(f"factworld (load average {load[0]:.2f})", flush=True)
        model, cases, description = factworld_cases(n, args.seed)
        runs.append(("factworld", description, *run_model("factworld", model, cases, None)))
        del model
    shape = SMOKE if args.smoke else GPT2_SMALL
    print(f"{shape.name} (load average {os.getloadavg()[0]:.2f})", flush=True)
    model, cases, description = random_cases(shape, n, args.seed)
    budget = None if args.smoke else args.lph_budget
    short = "smoke" if args.smoke else "gpt2-small"
    runs.append((short, description, *run_model(short, model, cases, budget)))
    end = os.getloadavg()

    title = "kloc_lens attribution patching (AtP, AtP*) against exact patching, CPU"
    out = [title, "=" * len(title), "", *machine(), *args.note]
    out.append(
        f"load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, at the end: "
        f"{end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f} (1/5/15 min; other jobs share this machine)"
    )
    for short, description, _, used in runs:
        out.append(f"{short}: {description}")
        for label, count in used.items():
            if count < n:
                out.append(
                    f"  {label}: {count} prompts only (the exact sweep would take over "
                    f"{args.lph_budget:.0f} s for {n})"
                )
    out.append("")
    header = None
    for short, _, cells, used in runs:
        lines = table(short, cells, used)
        if header is None:
            header = lines[0]
            out.append(header)
        out += lines[1:]
    out += [
        "",
        "exact s / method s: mean wall seconds per prompt of exact patching (the batched engine,",
        "its skipping shortcuts on) and of the estimate (2 forward passes and 1 backward pass for",
        "AtP, n_layers backward passes for AtP*); speed-up: their ratio. spearman: rank",
        "correlation of the estimated with the exact |effect| over every component, mean over",
        "prompts ((min): the worst prompt). top10 rec: share of the exact top 10 among the",
        "method's top 10, mean over prompts. FN: exact top-10 components the method ranks",
        f"{FALSE_NEGATIVE_RANK}th or lower, of all exact top-10 components; FN layers: where",
        "they sit.",
    ]
    text = "\n".join(out) + "\n"
    print(text)
    write_result(text, "attribution_cpu" + ("_smoke" if args.smoke else ""), args.out)


if __name__ == "__main__":
    main()

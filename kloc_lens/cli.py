"""The ``kloc-lens`` command line.

``kloc-lens demo`` is the main job until the factworld study lands: it traces a fact of the
planted model (the embedded default: a tiny model with hand-set weights whose fact lives in a
known MLP and attention head) from the entity perspective, sweeps its heads, and writes the
figures (standalone HTML) and machine-readable results (JSON + safetensors).

``kloc-lens trace`` traces one prompt of any local checkpoint or hub model.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _write(fig: Any, path: Path) -> Path:
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def _trace_outputs(traces: Any, out: Path, stem: str) -> list[Path]:
    from kloc_lens import plot

    paths = [
        _write(plot.trace_grid(traces), out / f"{stem}_trace.html"),
        _write(plot.effect_curves(traces, position="subject_last"), out / f"{stem}_curves.html"),
        traces.save(out / f"{stem}_trace.safetensors"),
    ]
    return paths


def _summary(traces: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "clean_score": traces.clean_score,
        "corrupted_score": traces.corrupted_score,
        "tokens": list(traces.traces[0].str_tokens),
        "corruption": traces.traces[0].corruption,
        "peaks": {},
    }
    for trace in traces:
        effect = trace.indirect_effect
        flat = int(effect.argmax())
        layer, pos = divmod(flat, effect.shape[1])
        summary["peaks"][trace.label] = {
            "layer": trace.layers[layer],
            "position": trace.positions[pos],
            "token": trace.str_tokens[trace.positions[pos]],
            "indirect_effect": float(effect.max()),
        }
    return summary


def demo(out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Trace and sweep a planted fact; write figures and results under ``out``."""
    import kloc_lens as kl
    from kloc_lens import plot
    from kloc_lens.planted import planted_model

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model, facts = planted_model()
    prompts = [
        kl.tokenize(model, kl.Prompt.from_text(facts.prompt(i), obj, subject=subject))
        for i, (subject, obj) in enumerate(facts.pairs())
    ]
    noise = kl.GaussianNoise.from_prompts(model, prompts, samples=10, seed=0)
    prompt = prompts[0]
    traces = kl.causal_trace(
        model, prompt, corruption=noise, window=1, sever=("mlp", "attn"), progress=progress
    )
    files = _trace_outputs(traces, out, "planted")
    target = kl.target_token_ids(model, prompt.prompt)[0]
    heads: Any = kl.activation_patching(
        model,
        prompt,
        noise,
        kl.TargetProb(target),
        site="z",
        sweep="layer_head",
        progress=progress,
    )
    files.append(_write(plot.head_heatmap(heads), out / "planted_heads.html"))
    files.append(heads.save(out / "planted_heads.safetensors"))
    summary = {
        "model": "kloc-planted",
        "prompt": prompt.text,
        "target": prompt.prompt.target,
        "planted": {
            "mlp_layer": facts.mlp_layer,
            "attn_layer": facts.attn_layer,
            "head": facts.head,
        },
        "trace": _summary(traces),
        "seconds": round(time.perf_counter() - start, 2),
    }
    summary["files"] = [p.name for p in files]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def trace(
    model_name: str,
    prompt: str,
    subject: str,
    target: str,
    out: Path,
    *,
    window: int,
    samples: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Trace one prompt of a named or local model."""
    import kloc_lens as kl

    out.mkdir(parents=True, exist_ok=True)
    model = kl.load_model(model_name)
    tokenized = kl.tokenize(model, kl.Prompt.from_text(prompt, target, subject=subject))
    traces = kl.causal_trace(
        model,
        tokenized,
        corruption=kl.GaussianNoise(samples=samples),
        window=window,
        sever=("mlp", "attn"),
        progress=progress,
    )
    files = _trace_outputs(traces, out, "trace")
    summary = {"model": model_name, "prompt": prompt, "target": target, "trace": _summary(traces)}
    summary["files"] = [p.name for p in files]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kloc-lens``."""
    parser = argparse.ArgumentParser(prog="kloc-lens", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_cmd = commands.add_parser("demo", help="trace the planted model's fact (main job)")
    demo_cmd.add_argument("--out", type=Path, default=Path("out/demo"))
    trace_cmd = commands.add_parser("trace", help="causal trace of one prompt")
    trace_cmd.add_argument("--model", required=True, help="hub name or save_pretrained dir")
    trace_cmd.add_argument("--prompt", required=True)
    trace_cmd.add_argument("--subject", required=True)
    trace_cmd.add_argument("--target", required=True)
    trace_cmd.add_argument("--window", type=int, default=10)
    trace_cmd.add_argument("--samples", type=int, default=10)
    trace_cmd.add_argument("--out", type=Path, default=Path("out/trace"))
    args = parser.parse_args(argv)

    from kloc_lens.errors import KlocLensError

    try:
        if args.command == "demo":
            summary = demo(args.out, progress=not args.no_progress)
        else:
            summary = trace(
                args.model,
                args.prompt,
                args.subject,
                args.target,
                args.out,
                window=args.window,
                samples=args.samples,
                progress=not args.no_progress,
            )
    except KlocLensError as err:
        print(f"kloc-lens: error: {err}")
        return 2
    trace_summary = summary["trace"]
    print(
        f"clean p = {trace_summary['clean_score']:.3f}, "
        f"corrupted p = {trace_summary['corrupted_score']:.3f}"
    )
    for label, peak in trace_summary["peaks"].items():
        print(
            f"  {label:22s} peak at layer {peak['layer']}, token {peak['position']} "
            f"({peak['token'].strip()!r}): indirect effect {peak['indirect_effect']:.3f}"
        )
    print(f"wrote {', '.join(summary['files'])} and summary.json to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

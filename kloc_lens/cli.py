"""The ``kloc-lens`` command line.

- ``kloc-lens study [--model NAME_OR_PATH] [--facts FILE] [--out DIR]``: the main job, both
  halves of the study with its HTML report (default: the shipped factworld model and its facts);
- ``kloc-lens trace``: ROME causal tracing of one fact, with its figures;
- ``kloc-lens edit``: one rank-one edit from each perspective, scored on both, with its figure;
- ``kloc-lens factworld build``: regenerate the factworld from scratch;
- ``kloc-lens demo``: trace the planted model (hand-set weights, known answer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


@contextmanager
def _process_group() -> Iterator[None]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), one ``torch.distributed`` process group for the
    command: NCCL with one GPU per rank (``LOCAL_RANK``) where CUDA is available, else gloo."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank_device(device: str | None = None) -> str:
    """The device to load on: ``device`` (default CUDA when available, else the CPU); a bare
    ``cuda`` under ``torchrun`` is this rank's GPU (``LOCAL_RANK``)."""
    from kloc_lens.model import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return str(resolved)


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _model_and_facts(
    model_name: str | None,
    facts_file: Path | None,
    device: str | None = None,
    dtype: str | None = None,
    memory_budget: int | None = None,
) -> tuple[Any, list[Any], Any]:
    """The model (on ``device`` in ``dtype``), its fact set and its factworld (``None`` for
    other models). A local model whose weights (and ``memory_budget``) do not fit the device's
    free memory is refused before it loads."""
    import kloc_lens as kl
    from kloc_lens.datasets import load_facts, real_world_facts
    from kloc_lens.model import check_fits, parse_dtype

    parse_dtype(dtype)  # a bad dtype is named before the device is looked at
    device = _rank_device(device)
    if model_name is None or (Path(model_name) / "world.json").is_file():
        # the shipped factworld, or a factworld directory written by `factworld build`
        from kloc_lens.factworld import factworld_path, load_factworld

        directory = factworld_path() if model_name is None else Path(model_name)
        check_fits(directory, device, dtype, working_bytes=memory_budget or 0)
        model, world = load_factworld(model_name, device=device, dtype=dtype)
        facts = load_facts(facts_file) if facts_file else list(world.facts)
        return model, facts, world
    check_fits(model_name, device, dtype, working_bytes=memory_budget or 0)
    model = kl.load_model(model_name, device=device, dtype=dtype)
    facts = load_facts(facts_file) if facts_file else real_world_facts()
    return model, facts, None


def _pick(facts: list[Any], subject: str | None, index: int) -> Any:
    from kloc_lens.datasets import DatasetError

    if subject is not None:
        for fact in facts:
            if fact.subject == subject:
                return fact
        raise DatasetError(f"no fact about subject {subject!r} in the fact set")
    if not 0 <= index < len(facts):
        raise DatasetError(f"fact index {index} outside the {len(facts)} facts")
    return facts[index]


def trace(
    model_name: str | None,
    facts_file: Path | None,
    subject: str | None,
    index: int,
    out: Path,
    *,
    window: int | None,
    samples: int,
    span: str,
    progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    memory_budget: int | None = None,
) -> dict[str, Any]:
    """Trace one fact (entity prompt, ``span`` corrupted) and write its figures."""
    import kloc_lens as kl
    from kloc_lens.trace import default_window

    out.mkdir(parents=True, exist_ok=True)
    model, facts, _ = _model_and_facts(model_name, facts_file, device, dtype, memory_budget)
    fact = _pick(facts, subject, index)
    prompt = kl.tokenize(model, fact.entity_prompt())
    prompts = [kl.tokenize(model, f.entity_prompt()) for f in facts[:200]]
    prompts = [p for p in prompts if span in p.spans] or [prompt]
    noise = kl.GaussianNoise.from_prompts(model, prompts, span=span, samples=samples)
    size = window if window is not None else default_window(int(model.cfg.n_layers))
    traces = kl.causal_trace(
        model,
        prompt,
        corruption=noise,
        window=size,
        sever=("mlp", "attn"),
        progress=progress,
        memory_budget=memory_budget,
    )
    files = _trace_outputs(traces, out, "trace")
    summary = {
        "model": model_name or SHIPPED,
        "prompt": prompt.text,
        "target": prompt.prompt.target,
        "trace": _summary(traces),
    }
    summary["files"] = [p.name for p in files]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def edit(
    model_name: str | None,
    facts_file: Path | None,
    subject: str | None,
    index: int,
    out: Path,
    *,
    layer: int | None,
    new_object: str | None,
    progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    memory_budget: int | None = None,
) -> dict[str, Any]:
    """Edit one fact from each perspective, score both, write the transfer figure."""
    from kloc_lens.edit import EditRequest, RomeEditor, evaluate_editor, second_moment
    from kloc_lens.edit.plot import transfer_heatmap
    from kloc_lens.factworld import EDIT_LAYER, NONE_ANSWER, rome_editor

    out.mkdir(parents=True, exist_ok=True)
    model, facts, world = _model_and_facts(model_name, facts_file, device, dtype, memory_budget)
    fact = _pick(facts, subject, index)
    if world is not None:  # a factworld: the settings that edit it
        layer = layer if layer is not None else min(EDIT_LAYER, int(model.cfg.n_layers) - 1)
        editor = rome_editor(model, world, layer=layer, progress=progress)
    else:
        layer = layer if layer is not None else int(model.cfg.n_layers) // 2
        texts = [p.text for f in facts for p in f.prompts("entity")]
        stats = second_moment(model, layer, texts, progress=progress)
        editor = RomeEditor(layer=layer, stats=stats)
    none = NONE_ANSWER if world is not None else "None"
    requests = [
        EditRequest(fact, new_object, perspective=p, none_target=none)
        for p in ("entity", "relation")
    ]
    evaluation = evaluate_editor(model, requests, editor, progress=progress)
    figure = transfer_heatmap(evaluation.transfer())
    path = _write(figure, out / "edit_transfer.html")
    evaluation.to_dataframe().to_csv(out / "edit_scores.csv", index=False)
    records = evaluation.summary().to_dict(orient="records")
    summary = {
        "model": model_name or SHIPPED,
        "fact": fact.entity_prompt().text,
        "old_object": fact.object,
        "new_object": requests[0].target,
        "layer": layer,
        "editor": editor.name,
        "scores": records,
        "files": [path.name, "edit_scores.csv"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def study(
    model_name: str | None,
    facts_file: Path | None,
    out: Path,
    options: dict[str, Any],
    *,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    memory_budget: int | None = None,
) -> Any:
    """Run the study and write its report.

    ``options`` are :class:`~kloc_lens.study.StudyConfig` fields; those left ``None`` take the
    defaults. On a factworld the "no relation" answer is the world's, the key statistics are
    read over the world's biographies, edits average keys over
    :data:`~kloc_lens.factworld.EDIT_CONTEXTS` contexts per length, and the report says how the
    model was trained.
    """
    from kloc_lens.engine import ExecutionOptions
    from kloc_lens.study import StudyConfig, run_study

    model, facts, world = _model_and_facts(model_name, facts_file, device, dtype, memory_budget)
    given = {key: value for key, value in options.items() if value is not None}
    extra: dict[str, Any] = {}
    if world is not None:
        from kloc_lens.factworld import EDIT_CONTEXTS, NONE_ANSWER, describe_factworld

        given.setdefault("none_target", NONE_ANSWER)
        given.setdefault("edit_contexts", EDIT_CONTEXTS)
        corpus = list(world.corpus())
        extra = {
            "corpus": corpus,
            "corpus_name": f"{len(corpus)} biographies of the world (its training text)",
            "about": describe_factworld(model_name),
        }
    config = StudyConfig(**given)
    return run_study(
        model,
        facts,
        config,
        out=out,
        model_name=model_name or SHIPPED,
        overwrite=overwrite,
        progress=progress,
        options=None if memory_budget is None else ExecutionOptions(memory_budget=memory_budget),
        **extra,
    )


SHIPPED = "factworld (shipped)"
"""How results name the shipped factworld model."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}  # fmt: skip


def _bytes(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1.5GB`` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"must be a size such as 2GiB, 512MiB, 1.5GB or a number of bytes, got {text!r}"
        )
    value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def _layers(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'all' or a comma-separated list of layers, got {text!r}"
        ) from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"layers must be >= 0, got {text!r}")
    return layers


def _parser() -> argparse.ArgumentParser:
    from kloc_lens.model import DTYPES
    from kloc_lens.study import StudyConfig

    parser = argparse.ArgumentParser(prog="kloc-lens", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_args(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "--model",
            default=None,
            help="hub name or save_pretrained dir (default: the shipped factworld)",
        )
        cmd.add_argument(
            "--facts",
            type=Path,
            default=None,
            help="facts file: kloc_lens JSON or CounterFact (default: the model's)",
        )
        cmd.add_argument(
            "--device",
            default=None,
            help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu; under "
            "torchrun, cuda is each rank's LOCAL_RANK GPU)",
        )
        cmd.add_argument(
            "--dtype",
            default=None,
            choices=list(DTYPES),
            help="parameter dtype (default float32); probabilities are compared in float32",
        )
        cmd.add_argument(
            "--memory-budget",
            type=_bytes,
            default=None,
            help="bytes of activations one forward pass may use, e.g. 2GiB (default: 2GiB, "
            "at most half the free memory); a local model whose weights and budget exceed the "
            "free memory is refused before it loads",
        )

    def fact_args(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--subject", default=None, help="the fact's subject")
        cmd.add_argument("--index", type=_count, default=0, help="the fact's index if no subject")

    defaults = StudyConfig()
    cmd = commands.add_parser("study", help="both halves of the study, with its report")
    model_args(cmd)
    cmd.add_argument(
        "--out", type=Path, default=Path("out/study"), help="output directory (%(default)s)"
    )
    cmd.add_argument(
        "--n-trace",
        type=_positive,
        default=defaults.n_trace,
        help="known facts traced per perspective (%(default)s)",
    )
    cmd.add_argument(
        "--n-trace-relation-prompts",
        type=_count,
        default=defaults.n_trace_relation_prompts,
        help="facts known from both perspectives whose relation-perspective prompt is traced "
        "with the subject and with the object corrupted; 0 skips it (%(default)s)",
    )
    cmd.add_argument(
        "--n-edit",
        type=_count,
        default=defaults.n_edit,
        help="known facts edited per perspective at the chosen layer; 0 skips editing "
        "(%(default)s)",
    )
    cmd.add_argument(
        "--n-layer-sweep",
        type=_count,
        default=defaults.n_layer_sweep,
        help="of those, facts also edited at every layer of --edit-layers (%(default)s)",
    )
    cmd.add_argument(
        "--n-retrace",
        type=_count,
        default=defaults.n_retrace,
        help="of the edited facts, how many are traced again on the edited model (%(default)s)",
    )
    cmd.add_argument(
        "--edit-layers",
        type=_layers,
        default=None,
        help="layers of the edit sweep: 'all' or a list such as 0,1,2 (default: all)",
    )
    cmd.add_argument(
        "--window",
        type=_positive,
        default=None,
        help="MLP/attention window of the traces (default: 10 of 48 layers, at least 2)",
    )
    cmd.add_argument(
        "--samples",
        type=_positive,
        default=defaults.samples,
        help="noise samples per trace (%(default)s)",
    )
    cmd.add_argument(
        "--seed", type=_count, default=defaults.seed, help="sampling and noise seed (%(default)s)"
    )
    cmd.add_argument(
        "--edit-layer",
        type=_count,
        default=None,
        help="the edited layer (default: the entity trace's MLP peak at the last subject token)",
    )
    cmd.add_argument(
        "--edit-steps",
        type=_count,
        default=None,
        help="cap on the value fit's steps (default: the editor's, ROME's 20)",
    )
    cmd.add_argument(
        "--edit-contexts",
        type=_count,
        default=None,
        help="generated contexts per length (5, 10 tokens) for keys and value fits, besides "
        "the bare prompt; 0 = bare prompt only (default: ROME's 10; 3 on a factworld model)",
    )
    cmd.add_argument(
        "--n-queries",
        type=_count,
        default=defaults.n_queries,
        help="facts known from both perspectives whose knowledge neurons are compared across "
        "their queries (query localization); 0 skips it (%(default)s)",
    )
    cmd.add_argument(
        "--neuron-steps",
        type=_positive,
        default=defaults.neuron_steps,
        help="integrated-gradient steps of the knowledge neurons (%(default)s)",
    )
    cmd.add_argument(
        "--neuron-threshold",
        type=float,
        default=defaults.neuron_threshold,
        help="a prompt's neurons: attribution >= this share of its largest (%(default)s)",
    )
    cmd.add_argument(
        "--neuron-share",
        type=float,
        default=defaults.neuron_share,
        help="selected neurons: kept on more than this share of a perspective's prompts "
        "(%(default)s)",
    )
    cmd.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output directory that holds a study with other settings",
    )
    cmd.set_defaults(handler=_cmd_study)

    cmd = commands.add_parser("trace", help="causal trace of one fact, with its figures")
    model_args(cmd)
    fact_args(cmd)
    cmd.add_argument("--span", default="subject", choices=["subject", "relation"])
    cmd.add_argument("--window", type=_positive, default=None, help="MLP/attention window")
    cmd.add_argument("--samples", type=_positive, default=10, help="noise samples (10)")
    cmd.add_argument("--out", type=Path, default=Path("out/trace"), help="output directory")
    cmd.set_defaults(handler=_cmd_trace)

    cmd = commands.add_parser("edit", help="edit one fact from both perspectives")
    model_args(cmd)
    fact_args(cmd)
    cmd.add_argument("--layer", type=_count, default=None, help="the edited layer")
    cmd.add_argument("--new-object", default=None, help="the new object (default: the fact's)")
    cmd.add_argument("--out", type=Path, default=Path("out/edit"), help="output directory")
    cmd.set_defaults(handler=_cmd_edit)

    cmd = commands.add_parser("factworld", help="the embedded factworld model")
    cmd.add_argument("action", choices=["build"])
    cmd.add_argument("rest", nargs=argparse.REMAINDER, help="options of the build")
    cmd.set_defaults(handler=_cmd_factworld)

    cmd = commands.add_parser("demo", help="trace the planted model's fact")
    cmd.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory")
    cmd.set_defaults(handler=_cmd_demo)
    return parser


def _print_trace(summary: dict[str, Any]) -> None:
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
    print(f"wrote {', '.join(summary['files'])} and summary.json to {summary['out']}")


def _cmd_study(args: argparse.Namespace) -> int:
    from kloc_lens.study import summary_text

    options = {
        "n_trace": args.n_trace,
        "n_trace_relation_prompts": args.n_trace_relation_prompts,
        "n_edit": args.n_edit,
        "n_layer_sweep": args.n_layer_sweep,
        "n_retrace": args.n_retrace,
        "edit_layers": args.edit_layers,
        "window": args.window,
        "samples": args.samples,
        "seed": args.seed,
        "edit_layer": args.edit_layer,
        "edit_steps": args.edit_steps,
        "edit_contexts": args.edit_contexts,
        "n_queries": args.n_queries,
        "neuron_steps": args.neuron_steps,
        "neuron_threshold": args.neuron_threshold,
        "neuron_share": args.neuron_share,
    }
    with _process_group():
        result = study(
            args.model,
            args.facts,
            args.out,
            options,
            overwrite=args.overwrite,
            progress=not args.no_progress and _is_rank_zero(),
            device=args.device,
            dtype=args.dtype,
            memory_budget=args.memory_budget,
        )
    if _is_rank_zero():
        for line in summary_text(result.summary()):
            print(line)
        print(f"wrote report.html, results.json and tensors/ to {args.out}")
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    summary = trace(
        args.model,
        args.facts,
        args.subject,
        args.index,
        args.out,
        window=args.window,
        samples=args.samples,
        span=args.span,
        progress=not args.no_progress,
        device=args.device,
        dtype=args.dtype,
        memory_budget=args.memory_budget,
    )
    _print_trace({**summary, "out": args.out})
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    summary = edit(
        args.model,
        args.facts,
        args.subject,
        args.index,
        args.out,
        layer=args.layer,
        new_object=args.new_object,
        progress=not args.no_progress,
        device=args.device,
        dtype=args.dtype,
        memory_budget=args.memory_budget,
    )
    for row in summary["scores"]:
        print(
            f"  {row['edited']:8s} edit  {row['metric']:20s} {row['pre']:.2f} -> {row['post']:.2f}"
        )
    print(f"wrote {', '.join(summary['files'])} and summary.json to {args.out}")
    return 0


def _cmd_factworld(args: argparse.Namespace) -> int:
    from kloc_lens.factworld import build_main

    return build_main(args.rest)


def _cmd_demo(args: argparse.Namespace) -> int:
    summary = demo(args.out, progress=not args.no_progress)
    _print_trace({**summary, "out": args.out})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kloc-lens``: parse the command line and run the subcommand.

    Returns:
        The exit status: 0, 2 for bad input (a one-line message), 130 when interrupted.
    """
    from kloc_lens.errors import KlocLensError

    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KlocLensError as err:
        print(f"kloc-lens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "kloc-lens: interrupted; finished units are kept, run again to resume", file=sys.stderr
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""The three comparisons of the suite: layer x position residual patching and layer x head
patching against ``transformer_lens.patching``, and ROME's three-kind causal trace against the
ROME-style loop, each checked for agreement."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _floor import floor_flops, matmul_rate
from _measure import Suite, agree, compare_to, timed
from _model import Shape, make_inputs

import kloc_lens as kl
from kloc_lens import engine
from kloc_lens.model import device_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from reference import rome_trace_loop  # the tests' oracle: ROME's procedure


def run_suite(
    model: Any,
    shape: Shape,
    *,
    precisions: tuple[str, ...] = ("fp32",),
    plain: bool = True,
    plain_trace: bool = False,
    baselines: bool = True,
    rate_batch: int = 64,
) -> Suite:
    """Run the three comparisons of issue 3 on ``model`` and collect a table."""
    from transformer_lens import patching

    device = device_of(model)
    inputs = make_inputs(model, shape)
    rate = matmul_rate(model, shape, rate_batch)
    suite = Suite(shape, device, rate)
    L, T = shape.n_layers, shape.n_pos
    with torch.no_grad():
        model(inputs.clean)  # warm up

    def kl_call(fn: Callable[..., Any], precision: str, shortcuts: bool = True) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            original = engine.execute

            def execute(*a: Any, **k: Any) -> Any:
                k["precision"] = precision
                k["shortcuts"] = shortcuts
                out = original(*a, **k)
                call.stats = out.stats  # type: ignore[attr-defined]
                return out

            kl.trace.execute = execute
            try:
                return fn(*args, **kwargs)
            finally:
                kl.trace.execute = original

        return call

    def patch_sweep(
        name: str, configs: list[tuple[int, int]], tl_patch: Callable, **kl_kwargs: Any
    ) -> None:
        """One activation-patching sweep: TransformerLens's patching function as the baseline,
        then kloc_lens at each precision, then kloc_lens with its shortcuts off."""
        floor = floor_flops(shape, configs, 1) / rate
        print(f"{name}: floor {floor:.3f} s", flush=True)
        ref = None
        if baselines:
            with torch.no_grad():
                _, cache = model.run_with_cache(inputs.clean)
            ref = timed(
                suite,
                name,
                "transformer_lens.patching (1 forward/config)",
                floor,
                lambda: tl_patch(model, inputs.corrupted, cache, inputs.patch_metric),
            )
            del cache

        def run(call: Callable) -> torch.Tensor:
            return call(
                model, inputs.clean, inputs.corrupted, inputs.patch_metric, progress=False,
                **kl_kwargs,
            ).values  # fmt: skip

        for precision in precisions:
            call = kl_call(kl.activation_patching, precision)
            row = timed(suite, name, f"kloc_lens ({precision})", floor, lambda c=call: run(c))
            row.note = _stats_note(call)
            if ref is not None:
                compare_to(row, ref)
                rtol = 1e-5 if precision == "fp32" else 5e-2
                agree(suite, f"{name}, kloc_lens {precision} vs TL", row.values, ref.values, rtol)
        if plain:
            call = kl_call(kl.activation_patching, "fp32", shortcuts=False)
            method = "kloc_lens, shortcuts off (batched full passes)"
            row = timed(suite, name, method, floor, lambda: run(call))
            if ref is not None:
                compare_to(row, ref)
                agree(suite, f"{name}, kloc_lens plain vs TL", row.values, ref.values, 1e-5)

    # 1. layer x position residual patching, token corruption
    patch_sweep(
        "1. resid_pre layer x pos (tokens)",
        [(layer, pos) for layer in range(L) for pos in range(T)],
        patching.get_act_patch_resid_pre,
    )
    # 2. layer x head patching, all positions
    patch_sweep(
        "2. z layer x head, all positions",
        [(layer, 0) for layer in range(L) for _ in range(shape.n_heads)],
        patching.get_act_patch_attn_head_out_all_pos,
        site="z",
        sweep="layer_head",
    )

    # 3. ROME causal trace: resid, MLP window 10, attention window 10
    sweep = "3. causal trace resid+mlp10+attn10"
    starts = [(min(layer + 1, L - 1), pos) for layer in range(L) for pos in range(T)]
    for _kind in ("mlp", "attn"):
        starts += [(max(0, layer - 5), pos) for layer in range(L) for pos in range(T)]
    floor = floor_flops(shape, starts, inputs.noisy_tokens.shape[0]) / rate
    print(f"{sweep}: floor {floor:.3f} s", flush=True)

    def rome_loop() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(
                [
                    rome_trace_loop(
                        model,
                        inputs.clean,
                        inputs.noisy_tokens,
                        inputs.embed_edit,
                        inputs.target,
                        kind,
                        10,
                    )
                    for kind in ("resid", "mlp", "attn")
                ]
            )

    def trace(call: Callable) -> torch.Tensor:
        traces = call(model, inputs.prompt, corruption=inputs.noise, window=10, progress=False)
        return torch.stack([traces.get(kind).values for kind in ("resid", "mlp", "attn")])

    ref = timed(suite, sweep, "ROME-style loop (1 forward of 11 rows/config)", floor, rome_loop)
    for precision in precisions:
        call = kl_call(kl.causal_trace, precision)
        row = timed(suite, sweep, f"kloc_lens ({precision})", floor, lambda c=call: trace(c))
        row.note = _stats_note(call)
        compare_to(row, ref)
        rtol = 1e-4 if precision == "fp32" else 1e-1
        agree(suite, f"{sweep}, kloc_lens {precision} vs ROME loop", row.values, ref.values, rtol)
        if precision != "fp32":
            full = next(r for r in suite.rows if r.sweep == sweep and r.method.endswith("(fp32)"))
            agree(suite, f"{sweep}, kloc_lens {precision} vs fp32", row.values, full.values, rtol)
    if plain_trace:
        call = kl_call(kl.causal_trace, "fp32", shortcuts=False)
        row = timed(
            suite,
            sweep,
            "kloc_lens, shortcuts off (batched full passes)",
            floor,
            lambda: trace(call),
        )
        compare_to(row, ref)
        agree(suite, f"{sweep}, kloc_lens plain vs ROME loop", row.values, ref.values, 1e-4)
    return suite


def _stats_note(call: Any) -> str:
    stats = getattr(call, "stats", None)
    if stats is None:
        return ""
    note = (
        f"{stats.fast} fast / {stats.unchanged} unchanged / {stats.plain} plain configs, "
        f"{stats.passes} passes, work {stats.work:.2f} of full"
    )
    return note + (f"; fallback: {stats.fallback}" if stats.fallback else "")

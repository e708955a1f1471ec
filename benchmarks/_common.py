"""Shared parts of the sweep benchmarks: a random GPT-2-shaped model, the three sweeps, their
TransformerLens / ROME-style baselines, the FLOP floor of ``../shared/notes/performance.md`` and
the result table.

Not a test: run ``benchmarks/sweep_speed.py`` (CPU) or ``benchmarks/sweep_speed_gpu.py`` (CUDA).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import kloc_lens as kl
from kloc_lens import _engine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from reference import rome_trace_loop  # the tests' oracle: ROME's procedure


@dataclass(frozen=True)
class Shape:
    """A GPT-2-shaped model and prompt length."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int = 50257
    n_pos: int = 16

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model


GPT2_SMALL = Shape("GPT-2-small shape", 12, 768, 12)
GPT2_XL = Shape("GPT-2-XL shape", 48, 1600, 25)
SMOKE = Shape("smoke shape", 4, 128, 4)

SUBJECT = ("Sa", "Sb", "Sc", "Sd")  # 4 tokens right after BOS: the least favourable placement
WORDS = (
    *SUBJECT,
    "speaks",
    "the",
    "language",
    "of",
    "its",
    "old",
    "home",
    "town",
    "which",
    "they",
    "call",
)
ANSWER, WRONG = "French", "English"


def synthetic_tokenizer(n_vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``n_vocab`` entries (``<bos>``, ``<unk>``, the prompt's
    words, then filler words)."""
    vocab = {"<bos>": 0, "<unk>": 1}
    for word in (*WORDS, ANSWER, WRONG, "Xa", "Xb", "Xc", "Xd"):
        vocab.setdefault(word, len(vocab))
    index = 0
    while len(vocab) < n_vocab:
        vocab.setdefault(f"w{index}", len(vocab))
        index += 1
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<bos>",
        unk_token="<unk>",
    )
    tok.init_kwargs["name_or_path"] = "kloc-bench"
    tok.init_kwargs["add_bos_token"] = True
    return tok


def build_model(shape: Shape, device: str = "cpu", seed: int = 0) -> Any:
    """A random GPT-2 of ``shape`` (HF default initialisation) as a TransformerBridge."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=shape.d_vocab,
        n_positions=1024,
        n_embd=shape.d_model,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"
    hf = GPT2LMHeadModel(config).eval()
    model = kl.from_hf(hf, synthetic_tokenizer(shape.d_vocab), name="kloc-bench")
    del hf
    if device != "cpu":
        model.to(device, print_details=False)
    return model


@dataclass
class Inputs:
    prompt: Any
    clean: torch.Tensor
    corrupted: torch.Tensor
    patch_metric: Any
    target: int
    noise: Any
    noisy_tokens: torch.Tensor
    embed_edit: Any


def make_inputs(model: Any, shape: Shape) -> Inputs:
    words = WORDS[: shape.n_pos - 1]
    text = " ".join(words)
    prompt = kl.tokenize(model, kl.Prompt.from_text(text, ANSWER, subject=" ".join(SUBJECT)))
    assert len(prompt) == shape.n_pos, (len(prompt), shape.n_pos)
    corrupted = kl.TokenReplacement("Xa Xb Xc Xd").apply(model, prompt).tokens
    answer = kl.target_token_ids(model, prompt.prompt)[0]
    wrong = kl.target_token_ids(model, prompt.prompt, WRONG)[0]
    noise = kl.GaussianNoise(samples=10, seed=0)
    made = noise.apply(model, prompt)
    device = _engine._device_of(model)
    return Inputs(
        prompt=prompt,
        clean=prompt.tokens[None].to(device),
        corrupted=corrupted.to(device),
        patch_metric=kl.LogitDiff(answer, wrong),
        target=answer,
        noise=noise,
        noisy_tokens=made.tokens.to(device),
        embed_edit=made.embed_edit,
    )


# ---- FLOPs --------------------------------------------------------------------------------------


def layer_flops(shape: Shape, keys: int) -> float:
    """FLOPs of one block for one token attending to ``keys`` positions."""
    d = shape.d_model
    return 2 * (4 * d * d + 2 * d * shape.d_mlp) + 4 * keys * d


def unembed_flops(shape: Shape) -> float:
    return 2.0 * shape.d_model * shape.d_vocab


def forward_flops(shape: Shape, tokens: int) -> float:
    return tokens * (shape.n_layers * layer_flops(shape, shape.n_pos) + unembed_flops(shape))


def floor_flops(shape: Shape, starts: list[tuple[int, int]], rows: int) -> float:
    """What a sweep truly needs: per configuration, blocks ``l..L-1`` over positions ``t..T-1``
    plus one last-position unembedding, for each of its rows."""
    total = 0.0
    for layer, pos in starts:
        total += (shape.n_layers - layer) * (shape.n_pos - pos) * layer_flops(shape, shape.n_pos)
        total += unembed_flops(shape)
    return rows * total


def matmul_rate(model: Any, shape: Shape, batch: int, repeats: int = 3) -> float:
    """FLOP/s of a batch-large forward pass of the raw HF model (no hooks)."""
    hf = model.original_model
    device = _engine._device_of(model)
    tokens = torch.randint(2, shape.d_vocab, (batch, shape.n_pos), device=device)
    best = float("inf")
    with torch.no_grad():
        hf(tokens[:2])
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            hf(tokens)
            sync(device)
            best = min(best, time.perf_counter() - start)
    return forward_flops(shape, batch * shape.n_pos) / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- memory and time ----------------------------------------------------------------------------


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


# ---- the three sweeps ---------------------------------------------------------------------------


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

    device = _engine._device_of(model)
    inputs = make_inputs(model, shape)
    rate = matmul_rate(model, shape, rate_batch)
    suite = Suite(shape, device, rate)
    L, T = shape.n_layers, shape.n_pos
    with torch.no_grad():
        model(inputs.clean)  # warm up

    def kl_call(fn: Callable[..., Any], precision: str, shortcuts: bool = True) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            original = _engine.execute

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


# ---- report -------------------------------------------------------------------------------------


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

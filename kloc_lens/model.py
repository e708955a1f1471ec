"""The hooked-model substrate: loading models and checking that they can be swept.

kloc_lens works on any *hooked model*: an object with the HookedTransformer interface
(``cfg``, ``tokenizer``, ``to_tokens``, ``run_with_hooks``, ``run_with_cache``, ``hook_dict`` and
hook names such as ``blocks.3.hook_mlp_out``). In TransformerLens 4.x that is a
``TransformerBridge`` after ``enable_compatibility_mode()``; in 3.x also a ``HookedTransformer``.
Nothing in kloc_lens checks the class: it reads hook names and ``model.cfg``.

Example (the first line needs the hub, the second a ``save_pretrained`` directory)::

    model = load_model("gpt2-xl")
    model = load_model("path/to/dir")
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from kloc_lens.errors import ModelError

__all__ = [
    "DTYPES",
    "HookedModel",
    "available_bytes",
    "check_fits",
    "check_model",
    "device_of",
    "from_hf",
    "load_hooked_transformer",
    "load_model",
    "model_identity",
    "parse_dtype",
    "resolve_device",
    "substrate",
    "weight_bytes",
]

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tiktoken.model",
)


@runtime_checkable
class HookedModel(Protocol):
    """What kloc_lens needs from a model: the HookedTransformer interface."""

    cfg: Any
    tokenizer: Any
    training: bool

    @property
    def hook_dict(self) -> dict[str, Any]: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, *args: Any, **kwargs: Any) -> Any: ...


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The parameter dtypes a model can be loaded in, by name."""


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A parameter dtype from its name (``float32``, ``bfloat16``, ``float16``), or any floating
    ``torch.dtype`` as itself (``torch.float64`` for reference computations).

    >>> parse_dtype("bfloat16")
    torch.bfloat16
    >>> parse_dtype("fp8")
    Traceback (most recent call last):
    ...
    kloc_lens.errors.ModelError: dtype must be one of 'float32', 'bfloat16', 'float16', got 'fp8'
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    options = ", ".join(repr(name) for name in DTYPES)
    raise ModelError(f"dtype must be one of {options}, got {value!r}")


def resolve_device(value: str | torch.device | None) -> torch.device:
    """The device a model goes to: ``value``, or CUDA when it is available, else the CPU.

    Raises:
        ModelError: A device name torch does not know, or a CUDA / MPS device this machine does
            not have (the message says which devices it has).
    """
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ModelError(
            f"device {str(value)!r} is not a device name; use cpu, cuda, cuda:N or mps"
        ) from err
    have = ["cpu"]
    if torch.cuda.is_available():
        have += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        have.append("mps")
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ModelError(
                f"device {str(value)!r} is not on this machine; it has {', '.join(have)}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {str(value)!r} is not on this machine; it has {', '.join(have)}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device {str(value)!r}: use one of {', '.join(have)}")
    return device


_SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_PICKLED_WEIGHTS = ("pytorch_model.bin", ".pt", ".pth")


def _safetensors_elements(path: Path) -> tuple[int, int]:
    """``(floating-point elements, bytes of the other tensors)`` from a safetensors header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    floats = other = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for size in entry["shape"]:
            count *= int(size)
        if entry["dtype"].startswith(("F", "BF")):
            floats += count
        else:
            other += count * _SAFETENSORS_ITEMSIZE.get(entry["dtype"], 8)
    return floats, other


def weight_bytes(path: str | Path, dtype: str | torch.dtype | None = None) -> int | None:
    """Bytes the weights of a local ``save_pretrained`` directory take once loaded in ``dtype``
    (``None``: float32, as :func:`load_model` loads them).

    Exact for safetensors files (element counts from their headers); pickled ``.bin`` files
    are scaled from the dtype ``config.json`` says they hold. ``None`` when the directory holds
    no weight file kloc_lens can size.

    Raises:
        ModelError: An unknown dtype, or a damaged safetensors header.
    """
    itemsize = torch.empty((), dtype=parse_dtype(dtype) or torch.float32).element_size()
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return None
    total, found = 0, False
    for file in sorted(directory.iterdir()):
        if file.suffix == ".safetensors":
            try:
                floats, other = _safetensors_elements(file)
            except (OSError, ValueError, KeyError, struct.error) as err:
                raise ModelError(
                    f"cannot read the safetensors header of {str(file)!r}: {err}"
                ) from err
            total += floats * itemsize + other
            found = True
        elif file.name.endswith(_PICKLED_WEIGHTS):
            stored = _config_itemsize(directory)
            total += file.stat().st_size * itemsize // stored
            found = True
    return total if found else None


def _config_itemsize(directory: Path) -> int:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return 4
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    stored = {**DTYPES, "float64": torch.float64}.get(name, torch.float32)
    return torch.empty((), dtype=stored).element_size()


def available_bytes(device: str | torch.device) -> int | None:
    """Free memory on ``device``: free CUDA memory, the CPU's ``MemAvailable``; ``None`` where
    it cannot be known (MPS, a machine without ``/proc/meminfo``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def check_fits(
    name_or_path: str | Path,
    device: str | torch.device,
    dtype: str | torch.dtype | None = None,
    *,
    working_bytes: int = 0,
) -> int | None:
    """Refuse, before loading, a model whose weights and working memory do not fit the device.

    The weights are sized by :func:`weight_bytes` (a local directory; a hub name is not sized
    without downloading it, so it is not checked), ``working_bytes`` is the activations' memory
    budget, and the free memory is :func:`available_bytes`. The check is a lower bound: loading
    may briefly need more.

    Returns:
        The weights' bytes, or ``None`` when they cannot be sized here.

    Raises:
        ModelError: Weights plus working memory exceed the device's free memory; the message
            gives both and what to change.
    """
    device = torch.device(device)
    needed = weight_bytes(name_or_path, dtype)
    if needed is None:
        return None
    free = available_bytes(device)
    if free is not None and needed + working_bytes > free:
        shown = str(parse_dtype(dtype) or torch.float32).removeprefix("torch.")
        raise ModelError(
            f"model {str(name_or_path)!r} does not fit on {device}: its weights take "
            f"{_gib(needed)} in {shown} and the memory budget {_gib(working_bytes)}, but "
            f"{device} has {_gib(free)} free; use --dtype bfloat16, a smaller --memory-budget "
            "or another --device"
        )
    return needed


def _bridge_class() -> Any:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as err:  # pragma: no cover - depends on the installed TransformerLens
        raise ModelError(
            "this TransformerLens has no TransformerBridge; install transformer_lens>=3.9"
        ) from err
    return TransformerBridge


def load_model(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Any:
    """Load a hub model or a local ``save_pretrained`` directory as a hooked model.

    The model comes back as a TransformerLens ``TransformerBridge`` in compatibility mode
    (HookedTransformer hook names and numerics), in eval mode.

    Args:
        name_or_path: A hub name such as ``"gpt2-xl"`` or a directory written by
            ``save_pretrained`` that holds both the model and its tokenizer.
        device: Where to put the model; ``None`` lets TransformerLens choose.
        dtype: Parameter dtype (a :data:`DTYPES` name or the dtype); ``None`` means float32.

    Returns:
        The hooked model.

    Raises:
        ModelError: An unknown dtype, the directory does not exist as a directory, has no
            tokenizer files (TransformerLens would silently load an empty tokenizer), or
            loading fails.
    """
    dtype = parse_dtype(dtype)
    path = Path(name_or_path)
    is_local = path.exists() or str(name_or_path).startswith((".", "/", "~"))
    if is_local:
        path = path.expanduser()
        _check_local_dir(path, str(name_or_path))
    bridge_cls = _bridge_class()
    kwargs: dict[str, Any] = {"device": device}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = bridge_cls.boot_transformers(str(path if is_local else name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load model {str(name_or_path)!r}: {err}") from err
    model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    _check_tokenizer(model, str(name_or_path))
    return model


def load_hooked_transformer(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """Load a local ``save_pretrained`` directory as a TransformerLens 3.x ``HookedTransformer``.

    ``HookedTransformer.from_pretrained`` only accepts official hub names and asks the hub for
    the config. This builds the TransformerLens config from the local HuggingFace config, converts
    the local weights, and applies the usual processing (LayerNorm folding, centring), without
    any network access. Logits equal a bridge's in compatibility mode (within 1e-5).

    Args:
        path: Directory with the model and its tokenizer.
        device: Where to put the model.
        dtype: Parameter dtype (default float32).

    Returns:
        A ``HookedTransformer`` in eval mode.

    Raises:
        ModelError: TransformerLens 4.x (no ``HookedTransformer``), or an unusable directory.
    """
    import importlib
    import json
    import shutil
    import tempfile

    try:
        # Looked up by name: the class exists in 3.x only (4.x raises ImportError on access).
        package: Any = importlib.import_module("transformer_lens")
        hooked_transformer: Any = package.HookedTransformer
        loading: Any = importlib.import_module("transformer_lens.loading_from_pretrained")
    except (ImportError, AttributeError) as err:
        raise ModelError(
            "HookedTransformer exists only in TransformerLens 3.x; use load_model on 4.x"
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(path).expanduser().resolve()
    _check_local_dir(source, str(path))
    dtype = dtype or torch.float32
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(source), dtype=dtype, local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    # TransformerLens 3.x reads the config again by name: it recognises some architectures by
    # substrings of the name ("llama", ...) and reads GPT-2's n_ctx, which transformers 5 no
    # longer writes. A neutral directory name with a completed config avoids both.
    scratch = Path(tempfile.mkdtemp(prefix="kloc-tl3-"))
    staged = scratch / "model"
    staged.mkdir()
    try:
        for entry in source.iterdir():
            if entry.name != "config.json":
                (staged / entry.name).symlink_to(entry)
        config = json.loads((source / "config.json").read_text())
        if config.get("model_type") == "gpt2":
            config.setdefault("n_ctx", config.get("n_positions", 1024))
        (staged / "config.json").write_text(json.dumps(config))
        cfg = loading.get_pretrained_model_config(
            str(staged),
            hf_cfg=hf_model.config.to_dict(),
            fold_ln=True,
            device=device,
            dtype=dtype,
        )
        cfg.model_name = source.name
        cfg.tokenizer_name = str(source)
        state_dict = loading.get_pretrained_state_dict(str(staged), cfg, hf_model, dtype=dtype)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    model = hooked_transformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
    )
    model.move_model_modules_to_device()
    model.eval()
    _check_tokenizer(model, str(path))
    return model


def _check_local_dir(path: Path, name: str) -> None:
    if not path.is_dir():
        raise ModelError(f"model path {name!r} is not a directory")
    if not (path / "config.json").exists():
        raise ModelError(f"model directory {str(path)!r} has no config.json")
    if not any((path / entry).exists() for entry in _TOKENIZER_FILES):
        raise ModelError(
            f"model directory {str(path)!r} has no tokenizer files (looked for "
            f"{', '.join(_TOKENIZER_FILES)}); save the tokenizer with save_pretrained too"
        )


def from_hf(hf_model: Any, tokenizer: Any, *, name: str = "local-model") -> Any:
    """Wrap an in-memory HuggingFace causal LM and tokenizer as a hooked model.

    The HuggingFace model is copied first: compatibility mode folds LayerNorm weights into the
    wrapped module in place, and the caller's model must stay as it was.

    Args:
        hf_model: A ``transformers`` causal language model (eager attention recommended).
        tokenizer: Its fast tokenizer.
        name: A label recorded as the model's name.

    Returns:
        A ``TransformerBridge`` in compatibility mode and eval mode.
    """
    import copy

    bridge_cls = _bridge_class()
    own = copy.deepcopy(hf_model).eval()
    tokenizer.init_kwargs.setdefault("name_or_path", name)
    tokenizer.init_kwargs.setdefault("add_bos_token", True)
    model = bridge_cls.boot_transformers(name, hf_model=own, tokenizer=tokenizer)
    model.enable_compatibility_mode(disable_warnings=True)
    model.eval()
    _check_tokenizer(model, name)
    return model


def _check_tokenizer(model: Any, name: str) -> None:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or len(tokenizer) == 0:
        raise ModelError(f"model {name!r} has no usable tokenizer (empty vocabulary)")


def substrate(model: Any) -> str:
    """Name the substrate of a hooked model: ``"bridge"`` or ``"hooked_transformer"``."""
    return "bridge" if hasattr(model, "enable_compatibility_mode") else "hooked_transformer"


def device_of(model: Any) -> torch.device:
    """The device a model computes on: its parameters', else ``cfg.device``, else the CPU.

    The one place kloc_lens picks a device; nothing hard-codes one.
    """
    try:
        return next(iter(model.parameters())).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device(str(getattr(model.cfg, "device", None) or "cpu"))


def model_identity(model: Any) -> str:
    """A short string that identifies a model's architecture and name (for caches and reports)."""
    cfg = model.cfg
    name = getattr(cfg, "model_name", None) or type(model).__name__
    return f"{name}|L{cfg.n_layers}|d{cfg.d_model}|h{cfg.n_heads}|v{cfg.d_vocab}|{substrate(model)}"


def check_model(model: Any, hook_names: Iterable[str] = ()) -> None:
    """Refuse a model that cannot be swept.

    Args:
        model: The hooked model.
        hook_names: Hook names the caller is about to use.

    Raises:
        ModelError: The model lacks the hooked-model interface, is in train mode (dropout would
            make every patch random), or lacks one of ``hook_names``.
    """
    for attr in ("cfg", "run_with_hooks", "hook_dict"):
        if not hasattr(model, attr):
            raise ModelError(
                f"{type(model).__name__} is not a hooked model (no {attr!r}); use "
                "kloc_lens.load_model or a TransformerLens model"
            )
    if getattr(model, "training", False):
        raise ModelError(
            f"{type(model).__name__} is in train mode (dropout makes patching random); "
            "call model.eval() first"
        )
    available = model.hook_dict
    missing = sorted({name for name in hook_names if name not in available})
    if missing:
        raise ModelError(
            f"model {type(model).__name__} has no hook point(s) {missing[:5]}"
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        )

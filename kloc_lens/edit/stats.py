"""Second-moment statistics of keys: ``C = E[k k^T]`` over a text corpus.

ROME chooses the direction of a rank-one update as ``u = C^-1 k*``: the update ``W + u r^T``
changes the output for the edited key ``k*`` while disturbing as little as possible the outputs
for the keys the model usually sees (the solution of a least-squares problem weighted by ``C``).
``C`` is the uncentred covariance of the projection's input over ordinary text, one matrix per
model, layer and projection (the reference code uses 100k Wikipedia samples).

:func:`second_moment` runs the model over a corpus (any iterable of strings), accumulates
``k k^T`` over every token (the BOS position excluded by default), and returns a
:class:`SecondMoment`. With ``cache_dir`` the result is stored on disk under a name built from
the model's identity, a fingerprint of the weights that produce the keys, the layer, the
projection and a hash of the corpus (or a ``corpus_id`` you choose), and read back next time.
``SecondMoment.save`` / :func:`load_second_moment` write and read one ``.safetensors`` file.

Editors accept ``stats=None`` and then fall back to ``C = I`` (``u = k*``), saying so in the edit.

Example:
    >>> from kloc_lens.planted import planted_model
    >>> from kloc_lens.edit.corpus import planted_corpus
    >>> model, planted = planted_model()
    >>> stats = second_moment(model, planted.mlp_layer, planted_corpus(planted), progress=False)
    >>> stats.matrix.shape, stats.layer, stats.projection.value
    (torch.Size([512, 512]), 1, 'W_out')
    >>> stats.count > 500
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from kloc_lens._formats import read_tag, tag
from kloc_lens.edit._errors import EditError, choice, integer
from kloc_lens.edit._tokens import bos_id, encode, pad_rows
from kloc_lens.edit.projection import Projection
from kloc_lens.model import device_of, model_identity

__all__ = [
    "SecondMoment",
    "corpus_hash",
    "load_second_moment",
    "second_moment",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)

_FORMAT = "kloc_lens.SecondMoment"
_VERSION = 1


@dataclass(frozen=True, eq=False)
class SecondMoment:
    """The second moment ``E[k k^T]`` of one projection's keys over a corpus.

    Attributes:
        matrix: ``E[k k^T]``, float32 on the CPU.
        count: How many keys (tokens) were averaged.
        model: :func:`~kloc_lens.model.model_identity` of the model.
        fingerprint: :func:`weights_fingerprint` of the model at ``layer``.
        layer: The layer.
        projection: The projection whose input the keys are.
        corpus: The corpus hash, or the ``corpus_id`` given.
    """

    matrix: Float[Tensor, "d_in d_in"]
    count: int
    model: str
    fingerprint: str
    layer: int
    projection: Projection
    corpus: str

    @property
    def size(self) -> int:
        """The key length."""
        return int(self.matrix.shape[0])

    def describe(self) -> str:
        """One line for edit provenance and reports."""
        return (
            f"E[kk^T] of {self.projection.value} at layer {self.layer} over {self.count} keys "
            f"of corpus {self.corpus[:16]}"
        )

    def damped(self, keys: Float[Tensor, "n d_in"], ridge: float) -> Float[Tensor, "d_in d_in"]:
        """``C + ridge * max(tr C, mean |k|^2) / d * I`` in float64, on the keys' device.

        The ridge (relative to the mean eigenvalue of ``C``, or of the keys' power if larger)
        keeps solves stable for statistics of less than full rank (a small corpus, a tiny
        vocabulary) and against the float32 rounding of the stored matrix, whose noise is about
        1e-7 of its largest eigenvalue.
        """
        matrix = self.matrix.to(device=keys.device, dtype=torch.float64)
        key_power = float((keys.double().norm(dim=-1) ** 2).mean())
        scale = max(float(matrix.diagonal().sum()), key_power) / self.size
        eye = torch.eye(self.size, dtype=torch.float64, device=keys.device)
        return matrix + ridge * scale * eye

    def check(self, model: Any, layer: int, projection: Projection | str) -> None:
        """Refuse statistics that do not belong to ``model`` at ``layer`` and ``projection``.

        Raises:
            EditError: Another model, layer or projection, or a matrix of the wrong shape.
        """
        projection = choice(Projection, projection, "projection")
        identity = model_identity(model)
        if self.model != identity:
            raise EditError(
                f"statistics were computed on model {self.model!r}, not on {identity!r}"
            )
        if self.layer != layer or self.projection is not projection:
            raise EditError(
                f"statistics are for {self.projection.value} at layer {self.layer}, not "
                f"{projection.value} at layer {layer}"
            )
        size = projection.key_size(model)
        if tuple(self.matrix.shape) != (size, size):
            raise EditError(
                f"statistics matrix has shape {tuple(self.matrix.shape)}; {projection.value} "
                f"keys at layer {layer} need ({size}, {size})"
            )
        if self.fingerprint != weights_fingerprint(model, layer, projection):
            logger.warning(
                "statistics for %s at layer %d were computed on other weights of %s",
                projection.value,
                layer,
                identity,
            )

    def save(self, path: str | Path) -> Path:
        """Write to one ``.safetensors`` file (matrix + labels as metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = {
            "count": self.count,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "layer": self.layer,
            "projection": self.projection.value,
            "corpus": self.corpus,
        }
        meta = {"format": tag(_FORMAT, _VERSION), "labels": json.dumps(labels)}
        # written beside its name, then renamed: a killed run leaves no half-written cache file
        fd, part = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            save_file({"matrix": self.matrix.detach().cpu().contiguous()}, part, metadata=meta)
            os.replace(part, path)
        finally:
            Path(part).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SecondMoment:
        """Read a file written by :meth:`save`.

        Raises:
            EditError: No such file, or not a statistics file.
        """
        path = Path(path)
        if not path.is_file():
            raise EditError(f"no statistics file at {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except Exception as err:  # safetensors raises its own error types
            raise EditError(
                f"{str(path)!r} is not a kloc_lens statistics file (damaged or truncated?): {err}"
            ) from err
        read_tag(meta.get("format"), _FORMAT, _VERSION, repr(str(path)), EditError)
        try:
            tensors = load_file(str(path))
            labels = json.loads(meta["labels"])
            return cls(
                matrix=tensors["matrix"].float(),
                count=int(labels["count"]),
                model=str(labels["model"]),
                fingerprint=str(labels["fingerprint"]),
                layer=int(labels["layer"]),
                projection=Projection(labels["projection"]),
                corpus=str(labels["corpus"]),
            )
        except EditError:
            raise
        except Exception as err:  # safetensors and json raise their own types
            raise EditError(f"{str(path)!r} is not a kloc_lens statistics file: {err}") from err


def load_second_moment(
    path: str | Path,
    *,
    model: Any = None,
    layer: int | None = None,
    projection: Projection | str = Projection.W_OUT,
) -> SecondMoment:
    """Read statistics from a file, checked against ``model`` and ``layer`` when given.

    Raises:
        EditError: Not a statistics file, or statistics of another model, layer, projection or
            shape.
    """
    projection = choice(Projection, projection, "projection")
    stats = SecondMoment.load(path)
    if model is not None:
        stats.check(model, stats.layer if layer is None else layer, projection)
    return stats


def weights_fingerprint(model: Any, layer: int, projection: Projection | str) -> str:
    """A short hash of the weights that produce the projection's keys at ``layer``.

    ``W_in`` (and ``b_in``) of the MLP for ``W_out``; ``W_V`` of the attention for ``W_O``.
    Part of the cache key, so that retrained weights under the same model name miss the cache.

    Raises:
        EditError: An unknown projection.
    """
    projection = choice(Projection, projection, "projection")
    block = model.blocks[layer]
    if projection is Projection.W_OUT:
        tensors = [getattr(block.mlp, name, None) for name in ("W_in", "b_in")]
    else:
        tensors = [getattr(block.attn, name, None) for name in ("W_V", "b_V")]
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        if isinstance(tensor, Tensor):
            data = tensor.detach().float().cpu().contiguous()
            digest.update(str(tuple(data.shape)).encode())
            digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def corpus_hash(texts: Iterable[str]) -> str:
    """A hash of the texts, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _cache_path(cache_dir: Path, identity: str, fingerprint: str, key: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", identity)[:80]
    return cache_dir / f"{name}-{fingerprint}-{key}.safetensors"


def _texts(corpus: Iterable[Any], text_column: str) -> Iterator[str]:
    """The corpus's texts: strings as they are, records (a dataset's rows) by ``text_column``."""
    for index, item in enumerate(corpus):
        if isinstance(item, Mapping):
            if text_column not in item:
                raise EditError(
                    f"corpus item {index} has no {text_column!r} field (fields: "
                    f"{sorted(item)[:8]}); pass text_column="
                )
            item = item[text_column]
        if not isinstance(item, str):
            raise EditError(
                f"corpus items must be strings or records with a {text_column!r} text field; "
                f"item {index} is {type(item).__name__}"
            )
        yield item


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def second_moment(
    model: Any,
    layer: int,
    corpus: Iterable[Any],
    *,
    projection: Projection | str = Projection.W_OUT,
    cache_dir: str | Path | None = None,
    corpus_id: str | None = None,
    text_column: str = "text",
    max_length: int | None = None,
    include_bos: bool = False,
    batch_size: int = 16,
    progress: bool = True,
    distributed: bool = False,
) -> SecondMoment:
    """Estimate ``E[k k^T]`` of a projection's keys over a corpus.

    The sum of ``k k^T`` is streamed in float64, one batch at a time (the keys of one batch are
    the most ever held). With ``distributed=True``, under an initialised ``torch.distributed``
    process group, rank ``r`` of ``w`` reads every ``w``-th batch from the ``r``-th, the sums and
    counts are all-reduced, and rank 0 alone writes the cache; every rank must then call it with
    the same arguments, like any collective. The result differs from one process's by the order
    of float64 additions only.

    Args:
        model: The hooked model.
        layer: The layer.
        corpus: Texts: any iterable of strings (a list, a generator, a dataset's text column),
            or of records such as the rows of a Hugging Face ``datasets.Dataset``.
        projection: ``W_out`` (keys: ``mlp.hook_post``) or ``W_O`` (keys: ``attn.hook_z``).
        cache_dir: A folder to read the statistics from if present and write them to if not.
        corpus_id: A name for the corpus in the cache key instead of its hash (the hash reads
            the whole corpus into memory first; with an id, a cache hit reads none of it).
        text_column: The text field of record items.
        max_length: Truncate each text to this many tokens (default ``cfg.n_ctx``).
        include_bos: Also count the BOS position's key (an outlier in many models).
        batch_size: Texts per forward.
        progress: Show a progress bar.
        distributed: Share the corpus over the ranks of the initialised process group (one
            process: ignored).

    Returns:
        The statistics.

    Raises:
        EditError: The corpus holds no tokens, or an item is neither a string nor a record
            with a ``text_column`` string.
    """
    projection = choice(Projection, projection, "projection")
    integer(batch_size, "batch_size", minimum=1)
    projection.weight(model, layer)  # refuses a bad layer early
    identity = model_identity(model)
    fingerprint = weights_fingerprint(model, layer, projection)
    n_ctx = int(model.cfg.n_ctx)
    if max_length is not None:
        integer(max_length, "max_length", minimum=1, maximum=n_ctx)
    length = int(max_length or n_ctx)
    texts: Iterable[str] = _texts(corpus, text_column)
    if corpus_id is None:
        texts = list(texts)
        corpus_key = corpus_hash(texts)
    else:
        corpus_key = corpus_id
    settings = f"L{layer}-{projection.value}-n{length}-bos{int(include_bos)}"
    rank, world = _ranks(distributed)
    path = None
    if cache_dir is not None:
        key = hashlib.blake2b(f"{settings}|{corpus_key}".encode(), digest_size=8).hexdigest()
        path = _cache_path(Path(cache_dir), identity, fingerprint, f"{settings}-{key}")
        if path.is_file():
            logger.info("reading key statistics from %s", path)
            return load_second_moment(path, model=model, layer=layer, projection=projection)

    size = projection.key_size(model)
    device = device_of(model)
    dtype = torch.float32 if device.type == "mps" else torch.float64
    total = torch.zeros(size, size, dtype=dtype, device=device)
    count = 0
    bos = bos_id(model)
    hook_name = projection.key_hook(layer)
    n_texts = len(texts) if isinstance(texts, list) else None
    if n_texts is None and isinstance(corpus, Sized):
        n_texts = len(corpus)
    bar = tqdm(total=n_texts, desc=f"key statistics L{layer}", disable=not progress, leave=False)
    with torch.no_grad():
        for index, batch in enumerate(_batches(texts, batch_size)):
            bar.update(len(batch))
            if index % world != rank:
                continue  # another rank's batch
            ids = [encode(model, text)[:length] for text in batch]
            ids = [row for row in ids if len(row) > (0 if include_bos or bos is None else 1)]
            if not ids:
                continue
            rows = pad_rows(model, ids)
            mask = torch.zeros(rows.tokens.shape, dtype=torch.bool, device=device)
            for index, n in enumerate(rows.lengths):
                mask[index, :n] = True
            if bos is not None and not include_bos:
                mask[:, 0] = False
            seen: list[Tensor] = []

            def capture(activation: Tensor, hook: Any, seen: list[Tensor] = seen) -> None:
                seen.append(activation.detach())

            model.run_with_hooks(
                rows.tokens, fwd_hooks=[(hook_name, capture)], stop_at_layer=layer + 1
            )
            keys = projection.keys(seen[-1])[mask].to(dtype)
            total += keys.T @ keys
            count += int(keys.shape[0])
    bar.close()
    if world > 1:
        counted = torch.tensor([count], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(counted)
        count = int(counted.item())
    if count == 0:
        raise EditError("the corpus holds no tokens to compute key statistics from")
    stats = SecondMoment(
        matrix=(total / count).float().cpu(),
        count=count,
        model=identity,
        fingerprint=fingerprint,
        layer=layer,
        projection=projection,
        corpus=corpus_key,
    )
    if path is not None and rank == 0:
        stats.save(path)
        logger.info("wrote key statistics to %s", path)
    return stats


def _ranks(distributed: bool) -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or one process's (0, 1)."""
    dist = torch.distributed
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

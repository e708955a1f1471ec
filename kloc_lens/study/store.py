"""Content-addressed results of a study's work units, written atomically.

A study is a set of independent *units* (one fact's traces from one side; one fact's edit and
its evaluation). A unit's result is stored under a key hashed from everything that determines
it (the model's fingerprint, the fact, the settings that affect that unit, the format version),
in ``<out>/units/<kind>/<key[:2]>/<key>.<ext>``. Writes go to a temporary file in the same
directory, then :func:`os.replace` renames it into place, so a unit is either complete or
absent: an interrupted run (Ctrl-C, ``kill -9``) loses at most the units in flight, and the next
run with the same settings finds the rest and skips them. Because keys name their content,
units shared by two parts of a study (the edits of the chosen layer, also part of the layer
sweep) are computed once.

Example:
    >>> import tempfile
    >>> store = UnitStore(tempfile.mkdtemp())
    >>> key = unit_key("example", {"fact": "Paris", "layer": 3})
    >>> store.has("example", key)
    False
    >>> store.write_json("example", key, {"efficacy": 1.0})
    >>> store.read_json("example", key)
    {'efficacy': 1.0}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from kloc_lens.facts import Fact
from kloc_lens.study.config import StudyError

T = TypeVar("T")

__all__ = [
    "UNIT_FORMAT",
    "Shard",
    "UnitStore",
    "Units",
    "atomic_write_text",
    "fact_data",
    "sample_items",
    "unit_key",
]

UNIT_FORMAT = 1
"""Version of the unit files; part of every key, so a new format never reads an old unit."""


def unit_key(kind: str, payload: Mapping[str, Any]) -> str:
    """The content key of a unit: a hash of its kind, the format version and its payload.

    The payload is hashed as canonical JSON (sorted keys), so equal settings give equal keys
    whatever their order.
    """
    text = json.dumps(
        {"kind": kind, "format": UNIT_FORMAT, "payload": payload},
        sort_keys=True,
        separators=(",", ":"),
        allow_nan=False,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class UnitStore:
    """The unit results of one study output directory.

    Args:
        root: The study's output directory; units live under ``root/units``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.units = self.root / "units"

    def path(self, kind: str, key: str, ext: str) -> Path:
        """Where a unit's result lives."""
        return self.units / kind / key[:2] / f"{key}.{ext}"

    def has(self, kind: str, key: str, ext: str = "json") -> bool:
        """Whether the unit is done."""
        return self.path(kind, key, ext).is_file()

    def count(self, kind: str) -> int:
        """How many units of ``kind`` are stored."""
        folder = self.units / kind
        return sum(1 for _ in folder.glob("*/*.*")) if folder.is_dir() else 0

    def write_json(self, kind: str, key: str, data: Any) -> None:
        """Store a unit's JSON result atomically."""
        text = json.dumps(data, allow_nan=False, sort_keys=True)
        atomic_write_text(self.path(kind, key, "json"), text)

    def read_json(self, kind: str, key: str) -> Any:
        """A unit's JSON result.

        Raises:
            StudyError: The unit is missing or its file is not JSON.
        """
        path = self.path(kind, key, "json")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StudyError(f"unit {kind}/{key} is not in {self.units}") from None
        except json.JSONDecodeError as err:
            raise StudyError(f"unit file {path} is not JSON ({err}); delete it to redo") from None

    def write_file(self, kind: str, key: str, ext: str, writer: Callable[[Path], Any]) -> Path:
        """Store a unit's file atomically: ``writer(tmp_path)`` writes it, a rename publishes it.

        For results with their own ``save`` (``lambda path: trace_set.save(path)``).
        """
        path = self.path(kind, key, ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{ext}")
        os.close(handle)
        try:
            writer(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def fact_data(fact: Fact) -> dict[str, Any]:
    """The fact as it enters unit keys."""
    return dataclasses.asdict(fact)


@dataclass(frozen=True)
class Shard:
    """This process's share of a study: rank ``rank`` of ``world`` processes.

    One process is ``Shard()``; under ``torchrun`` :meth:`from_env` reads the initialised
    ``torch.distributed`` process group.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Shard:
        """The shard of this process (one process unless ``torch.distributed`` is initialised)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.world > 1:
            torch.distributed.barrier()

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th, starting at ``rank`` (deterministic)."""
        return list(items[self.rank :: self.world])


class Units:
    """Runs the units of one phase: skips those on disk, splits the rest over the ranks."""

    def __init__(self, store: UnitStore, shard: Shard, progress: bool) -> None:
        self.store = store
        self.shard = shard
        self.progress = progress
        self.computed = 0
        self.found = 0

    def run(
        self,
        kind: str,
        keys: Sequence[str],
        compute: Callable[[int], Any],
        *,
        ext: str,
        save: Callable[[str, Any], object],
        load: Callable[[str], T],
        desc: str,
    ) -> list[T]:
        return self.run_groups(
            kind,
            keys,
            [[i] for i in range(len(keys))],
            lambda group: [compute(i) for i in group],
            ext=ext,
            save=save,
            load=load,
            desc=desc,
        )

    def run_groups(
        self,
        kind: str,
        keys: Sequence[str],
        groups: Sequence[Sequence[int]],
        compute: Callable[[Sequence[int]], list[Any]],
        *,
        ext: str,
        save: Callable[[str, Any], object],
        load: Callable[[str], T],
        desc: str,
    ) -> list[T]:
        """Units computed a group at a time (``compute(group)`` returns one result per index).

        The groups are fixed by the caller's plan, never by what is on disk: a group with any
        unit missing is computed whole (its units on disk are left as they are), so a resumed
        or sharded run computes every unit in the same company as a fresh one, and batched
        arithmetic gives the same numbers.
        """
        if sorted(i for group in groups for i in group) != list(range(len(keys))):
            raise ValueError(f"{kind}: the groups must cover each of the {len(keys)} units once")
        done = [self.store.has(kind, key, ext) for key in keys]
        # Every rank must split the same list: none may write a unit of this phase before all
        # have looked at the disk (a rank that saw a unit another had just written would shift
        # its share, and some unit would be left to nobody).
        self.shard.barrier()
        todo = [group for group in groups if not all(done[i] for i in group)]
        missing = sum(not done[i] for group in todo for i in group)
        self.found += len(keys) - missing
        mine = self.shard.mine(todo)
        bar = tqdm(
            total=len(keys),
            initial=len(keys) - missing,
            desc=desc,
            disable=not self.progress or self.shard.rank != 0,
            unit="unit",
        )
        with bar:
            for group in mine:
                results = compute(group)
                if len(results) != len(group):
                    raise ValueError(f"{kind}: {len(results)} results for {len(group)} units")
                for i, result in zip(group, results, strict=True):
                    if not done[i]:
                        save(keys[i], result)
                        self.computed += 1
                        bar.update(self.shard.world)
        self.shard.barrier()
        return [load(key) for key in keys]

    def json(
        self, kind: str, keys: Sequence[str], compute: Callable[[int], Any], desc: str
    ) -> list[Any]:
        return self.run(
            kind,
            keys,
            compute,
            ext="json",
            save=lambda key, data: self.store.write_json(kind, key, data),
            load=lambda key: self.store.read_json(kind, key),
            desc=desc,
        )


def sample_items(items: Sequence[T], n: int, seed: int) -> list[T]:
    """``n`` of ``items`` in a seeded random order (the study's samples of facts)."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:n]

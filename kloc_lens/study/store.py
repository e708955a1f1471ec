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

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kloc_lens.study.config import StudyError

__all__ = ["UNIT_FORMAT", "UnitStore", "atomic_write_text", "unit_key"]

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

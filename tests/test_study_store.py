"""The unit store: content keys, atomic writes, nothing half-written."""

from __future__ import annotations

import pytest

from kloc_lens.study import StudyError, UnitStore
from kloc_lens.study.store import atomic_write_text, unit_key


def test_keys_name_content_not_order():
    assert unit_key("edit", {"a": 1, "b": [1, 2]}) == unit_key("edit", {"b": [1, 2], "a": 1})
    assert unit_key("edit", {"a": 1}) != unit_key("edit", {"a": 2})
    assert unit_key("edit", {"a": 1}) != unit_key("trace", {"a": 1})


def test_round_trip_and_counts(tmp_path):
    store = UnitStore(tmp_path)
    key = unit_key("k", {"x": 1})
    assert not store.has("k", key) and store.count("k") == 0
    store.write_json("k", key, {"value": [1.5, None]})
    assert store.has("k", key) and store.count("k") == 1
    assert store.read_json("k", key) == {"value": [1.5, None]}


def test_a_failed_write_leaves_nothing(tmp_path):
    store = UnitStore(tmp_path)
    key = unit_key("k", {"x": 2})

    def failing(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.write_file("k", key, "bin", failing)
    assert not store.has("k", key, "bin")
    assert list(store.path("k", key, "bin").parent.iterdir()) == []
    with pytest.raises(ValueError):
        store.write_json("k", key, {"x": float("nan")})  # never a NaN on disk
    assert not store.has("k", key)


def test_atomic_text_replaces_whole(tmp_path):
    path = tmp_path / "a" / "f.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


def test_damaged_units_are_named(tmp_path):
    store = UnitStore(tmp_path)
    key = unit_key("k", {})
    with pytest.raises(StudyError, match="is not in"):
        store.read_json("k", key)
    path = store.path("k", key, "json")
    path.parent.mkdir(parents=True)
    path.write_text("{broken")
    with pytest.raises(StudyError, match="is not JSON"):
        store.read_json("k", key)

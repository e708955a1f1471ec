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


def _grouped(store, shard, keys, groups, calls):
    from kloc_lens.study.store import Units as _Units

    def compute(group):
        calls.append(list(group))
        return [{"unit": i, "company": list(group)} for i in group]

    units = _Units(store, shard, progress=False)
    results = units.run_groups(
        "g",
        keys,
        groups,
        compute,
        ext="json",
        save=lambda key, data: store.write_json("g", key, data),
        load=lambda key: store.read_json("g", key),
        desc="groups",
    )
    return units, results


def test_groups_are_computed_whole_in_the_plans_company(tmp_path, monkeypatch):
    """A group with one unit missing is computed whole, with the company the plan gave it;
    its units on disk stay; groups done are not recomputed; shards split groups, not units."""
    from kloc_lens.study.store import Shard

    store = UnitStore(tmp_path)
    keys = [unit_key("g", {"i": i}) for i in range(7)]
    groups = [[0, 1, 2], [3, 4, 5], [6]]
    calls: list[list[int]] = []
    _, first = _grouped(store, Shard(), keys, groups, calls)
    assert calls == groups
    assert [r["company"] for r in first] == [g for g in groups for _ in g]

    (store.path("g", keys[4], "json")).write_text('{"unit": 4, "company": "on disk"}')
    store.path("g", keys[5], "json").unlink()
    calls.clear()
    units, again = _grouped(store, Shard(), keys, groups, calls)
    assert calls == [[3, 4, 5]]  # only the group with a unit missing, and all of it
    assert again[4]["company"] == "on disk"  # what was on disk is kept
    assert again[5]["company"] == [3, 4, 5]
    assert (units.computed, units.found) == (1, 6)

    for key in keys:
        store.path("g", key, "json").unlink()
    calls.clear()
    monkeypatch.setattr(Shard, "barrier", lambda self: None)  # no process group here
    with pytest.raises(StudyError, match="is not in"):  # rank 0's units never come here
        _grouped(store, Shard(rank=1, world=2), keys, groups, calls)
    assert calls == [[3, 4, 5]]  # rank 1 of 2: every other group


def test_groups_must_cover_the_units_once(tmp_path):
    store = UnitStore(tmp_path)
    keys = [unit_key("g", {"i": i}) for i in range(3)]
    from kloc_lens.study.store import Shard

    for groups in ([[0, 1]], [[0, 1], [1, 2]]):
        with pytest.raises(ValueError, match="the groups must cover each of the 3 units once"):
            _grouped(store, Shard(), keys, groups, [])

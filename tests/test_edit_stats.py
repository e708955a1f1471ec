"""Key statistics: the right matrix, cached by model, layer, site and corpus, checked on use."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import kloc_lens as kl
from kloc_lens.edit import (
    EditError,
    EditRequest,
    Projection,
    RomeEditor,
    SecondMoment,
    load_second_moment,
    planted_corpus,
    second_moment,
)
from kloc_lens.errors import KlocLensError
from kloc_lens.facts import Fact

pytestmark = [pytest.mark.substrate, pytest.mark.one_thread]


CORPUS = (
    "The mother tongue of Danielle Darrieux is French .",
    "Edwin Hubble works in the field of astronomy",
    "Paris is the capital of",
)


def _reference(model, layer: int, hook: str, texts, flatten: bool = False) -> torch.Tensor:
    """E[k k^T] by brute force: every text alone, every position but BOS."""
    keys = []
    for text in texts:
        _, cache = model.run_with_cache(text)
        activation = cache[hook][0, 1:]
        keys.append(activation.flatten(-2) if flatten else activation)
    stacked = torch.cat(keys).double()
    return stacked.T @ stacked / stacked.shape[0]


def test_mlp_statistics_match_brute_force(tiny):
    stats = second_moment(tiny, 1, CORPUS, batch_size=2, progress=False)
    expected = _reference(tiny, 1, "blocks.1.mlp.hook_post", CORPUS)
    assert stats.count == sum(len(tiny.to_str_tokens(text)) - 1 for text in CORPUS)
    assert stats.matrix.shape == (tiny.cfg.d_mlp, tiny.cfg.d_mlp)
    torch.testing.assert_close(stats.matrix.double(), expected, atol=1e-6, rtol=1e-5)


def test_attention_statistics_flatten_the_heads(tiny):
    stats = second_moment(tiny, 2, CORPUS, projection="W_O", progress=False)
    expected = _reference(tiny, 2, "blocks.2.attn.hook_z", CORPUS, flatten=True)
    assert stats.projection is Projection.W_O
    assert stats.matrix.shape == (tiny.cfg.n_heads * tiny.cfg.d_head,) * 2
    torch.testing.assert_close(stats.matrix.double(), expected, atol=1e-6, rtol=1e-5)


def test_cache_is_keyed_by_corpus_and_read_back(tiny, tmp_path):
    first = second_moment(tiny, 1, CORPUS, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    again = second_moment(tiny, 1, list(CORPUS), cache_dir=tmp_path, progress=False)
    assert torch.equal(first.matrix, again.matrix)
    assert list(tmp_path.iterdir()) == files
    other = second_moment(tiny, 1, CORPUS[:2], cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2
    assert other.corpus != first.corpus
    second_moment(tiny, 2, CORPUS, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 3


def test_a_named_corpus_hits_the_cache_without_reading_it(tiny, tmp_path):
    def texts():
        yield from CORPUS

    def untouchable():
        raise AssertionError("the corpus was read on a cache hit")
        yield ""

    stored = second_moment(tiny, 0, texts(), cache_dir=tmp_path, corpus_id="wiki-3", progress=False)
    assert stored.corpus == "wiki-3"
    cached = second_moment(
        tiny, 0, untouchable(), cache_dir=tmp_path, corpus_id="wiki-3", progress=False
    )
    assert torch.equal(stored.matrix, cached.matrix)


def test_save_and_load_round_trip(tiny, tmp_path):
    stats = second_moment(tiny, 1, CORPUS, progress=False)
    path = stats.save(tmp_path / "stats" / "layer1.safetensors")
    loaded = load_second_moment(path, model=tiny, layer=1)
    assert torch.equal(loaded.matrix, stats.matrix)
    for name in ("count", "model", "fingerprint", "layer", "projection", "corpus"):
        assert getattr(loaded, name) == getattr(stats, name), name


def test_statistics_are_checked_against_model_layer_and_shape(tiny, planted, tmp_path):
    model, facts = planted
    tiny_stats = second_moment(tiny, 1, CORPUS, progress=False)
    request = EditRequest(Fact(facts.subjects[0], "home", facts.objects[0]), "Quito")
    with pytest.raises(EditError, match="statistics were computed on model 'kloc-tiny"):
        RomeEditor(layer=1, stats=tiny_stats).compute(model, request)
    planted_stats = second_moment(model, 1, planted_corpus(facts, n_texts=16), progress=False)
    with pytest.raises(EditError, match="for W_out at layer 1, not W_out at layer 2"):
        RomeEditor(layer=2, stats=planted_stats).compute(model, request)
    with pytest.raises(EditError, match="for W_out at layer 1, not W_O at layer 1"):
        RomeEditor(layer=1, projection="W_O", stats=planted_stats).compute(model, request)
    wrong_shape = SecondMoment(
        matrix=torch.eye(100),
        count=10,
        model=planted_stats.model,
        fingerprint=planted_stats.fingerprint,
        layer=1,
        projection=Projection.W_OUT,
        corpus="x",
    )
    with pytest.raises(EditError, match=r"shape \(100, 100\); W_out keys at layer 1 need"):
        RomeEditor(layer=1, stats=wrong_shape).compute(model, request)
    path = tiny_stats.save(tmp_path / "tiny.safetensors")
    with pytest.raises(KlocLensError, match="computed on model"):
        load_second_moment(path, model=model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(EditError, match="is not a kloc_lens statistics file"):
        load_second_moment(tmp_path / "junk.safetensors")
    with pytest.raises(EditError, match="no statistics file"):
        load_second_moment(tmp_path / "missing.safetensors")


def test_statistics_files_carry_a_versioned_format(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tiny_stats = second_moment(tiny, 1, CORPUS, progress=False)
    path = tiny_stats.save(tmp_path / "tiny.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    assert meta["format"] == "kloc_lens.SecondMoment/1"
    newer = {**meta, "format": "kloc_lens.SecondMoment/2"}
    save_file(load_file(str(path)), str(path), metadata=newer)
    with pytest.raises(EditError, match="SecondMoment format version 2, newer than this kloc_lens"):
        load_second_moment(path)
    cut = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(EditError, match="damaged or truncated"):
        load_second_moment(tmp_path / "cut.safetensors")
    result = kl.LayerPosResult(
        values=torch.zeros(1, 1), layers=(0,), positions=(0,), heads=(), str_tokens=(),
        spans={}, site="resid_pre", direction=kl.Direction.RESTORE, metric="m", corruption="c",
        clean_score=1.0, corrupted_score=0.0,
    )  # fmt: skip
    with pytest.raises(EditError, match="is a 'kloc_lens.result' file, not a 'kloc_lens.SecondM"):
        load_second_moment(result.save(tmp_path / "result.safetensors"))
    with pytest.raises(kl.ResultError, match="is a 'kloc_lens.SecondMoment' file, not a 'kloc_"):
        kl.load_result(tiny_stats.save(tmp_path / "stats.safetensors"))


def test_empty_corpus_is_refused(tiny):
    with pytest.raises(EditError, match="holds no tokens"):
        second_moment(tiny, 0, [], progress=False)


def test_a_dataset_of_records_is_read_by_its_text_column(tiny):
    from datasets import Dataset  # a dependency of transformer_lens

    plain = second_moment(tiny, 1, CORPUS, progress=False)
    table = Dataset.from_dict({"id": list(range(len(CORPUS))), "text": list(CORPUS)})
    from_rows = second_moment(tiny, 1, table, progress=False)
    assert from_rows.count == plain.count
    assert from_rows.corpus == plain.corpus  # the same texts hash the same
    torch.testing.assert_close(from_rows.matrix, plain.matrix, atol=1e-6, rtol=0)
    renamed = [{"body": text} for text in CORPUS]
    same = second_moment(tiny, 1, renamed, text_column="body", progress=False)
    torch.testing.assert_close(same.matrix, plain.matrix, atol=1e-6, rtol=0)
    with pytest.raises(EditError, match="corpus item 0 has no 'text' field"):
        second_moment(tiny, 1, renamed, progress=False)
    with pytest.raises(EditError, match="item 1 is int"):
        second_moment(tiny, 1, ["a text", 3], progress=False)


def test_counts_and_layers_must_be_integers_in_range(tiny):
    with pytest.raises(EditError, match="batch_size must be an integer >= 1, got 0"):
        second_moment(tiny, 1, CORPUS, batch_size=0, progress=False)
    with pytest.raises(EditError, match="max_length must be an integer in 1..64, got 65"):
        second_moment(tiny, 1, CORPUS, max_length=65, progress=False)
    with pytest.raises(EditError, match="max_length must be an integer in 1..64, got 0"):
        second_moment(tiny, 1, CORPUS, max_length=0, progress=False)
    with pytest.raises(EditError, match="layer -1 is outside 0..2"):
        second_moment(tiny, -1, CORPUS, progress=False)
    from kloc_lens.planted import planted_facts

    with pytest.raises(EditError, match="n_texts must be an integer >= 1, got -1"):
        planted_corpus(planted_facts(), n_texts=-1)


def test_counts_of_the_wrong_type(tiny, unchecked):
    with pytest.raises(EditError, match="layer must be an integer in 0..2, got 1.5"):
        second_moment(tiny, 1.5, CORPUS, progress=False)  # type: ignore[arg-type]
    with pytest.raises(EditError, match="batch_size must be an integer >= 1, got 2.0"):
        second_moment(tiny, 1, CORPUS, batch_size=2.0, progress=False)  # type: ignore[arg-type]
    from kloc_lens.planted import planted_facts

    with pytest.raises(EditError, match="n_texts must be an integer >= 1, got 8.0"):
        planted_corpus(planted_facts(), n_texts=8.0)  # type: ignore[arg-type]


_RANK_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from kloc_lens.edit import planted_corpus, second_moment
from kloc_lens.planted import planted_model

out = Path(sys.argv[1])
dist.init_process_group("gloo")
model, planted = planted_model()
rows = []
run = model.run_with_hooks
def counted(tokens, **kwargs):
    rows.append(int(tokens.shape[0]))
    return run(tokens, **kwargs)
model.run_with_hooks = counted
texts = planted_corpus(planted)
stats = second_moment(
    model, planted.mlp_layer, texts, cache_dir=out / "cache", batch_size=4, progress=False,
    distributed=True,
)
rank = dist.get_rank()
stats.save(out / f"rank{rank}.safetensors")
(out / f"rank{rank}.json").write_text(json.dumps({"rows": sum(rows), "texts": len(texts)}))
dist.destroy_process_group()
"""


def test_two_ranks_share_the_corpus_and_sum_to_one_process(planted, tmp_path):
    """Under torchrun each rank reads half of the batches; the all-reduced statistics are one
    process's (up to the order of float64 additions), on both ranks; rank 0 alone caches them."""
    model, facts = planted
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    texts = planted_corpus(facts)
    alone = second_moment(model, facts.mlp_layer, texts, batch_size=4, progress=False)
    ranks = [load_second_moment(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    read = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert read[0]["texts"] == len(texts)
    # every text read once, split between the ranks (batches of 4 dealt in turn)
    assert read[0]["rows"] + read[1]["rows"] == len(texts)
    assert abs(read[0]["rows"] - read[1]["rows"]) <= 4
    assert torch.equal(ranks[0].matrix, ranks[1].matrix)
    assert ranks[0].count == ranks[1].count == alone.count
    torch.testing.assert_close(ranks[0].matrix, alone.matrix, rtol=1e-6, atol=1e-9)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1
    assert not list((tmp_path / "cache").rglob("*.part"))

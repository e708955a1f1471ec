"""The substrate: loading local checkpoints, refusing unusable models."""

from __future__ import annotations

import pytest
import torch
from models import save_tiny_checkpoint
from transformers import AutoModelForCausalLM

import kloc_lens as kl
from kloc_lens.model import model_identity, substrate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(directory)
    return directory


def test_load_local_checkpoint_matches_huggingface(checkpoint):
    model = kl.load_model(checkpoint)
    assert not model.training and substrate(model) == "bridge"
    hf = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokens = model.to_tokens("The mother tongue of Danielle Darrieux is")
    ours = torch.log_softmax(model(tokens), -1)
    theirs = torch.log_softmax(hf(tokens).logits, -1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert "blocks.1.hook_mlp_out" in model.hook_dict
    assert "|L2|d32|" in model_identity(model)


def test_load_model_with_dtype(checkpoint):
    model = kl.load_model(checkpoint, dtype=torch.float64)
    assert model.W_E.dtype == torch.float64


def test_directory_without_tokenizer_is_refused(tmp_path):
    save_tiny_checkpoint(tmp_path, tokenizer=False)
    with pytest.raises(kl.ModelError, match="has no tokenizer files"):
        kl.load_model(tmp_path)


def test_missing_directory_and_file_are_refused(tmp_path):
    with pytest.raises(kl.ModelError, match="is not a directory"):
        kl.load_model(tmp_path / "nothing")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(kl.ModelError, match="is not a directory"):
        kl.load_model(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(kl.ModelError, match="has no config.json"):
        kl.load_model(tmp_path / "empty")


@pytest.mark.slow
def test_unreachable_hub_name_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(kl.ModelError, match="could not load model 'kloc-lens/no-such-model'"):
        kl.load_model("kloc-lens/no-such-model")


@pytest.mark.substrate
def test_train_mode_is_refused(tiny):
    prompt = kl.tokenize(tiny, "The capital of Germany is", subject="Germany")
    tiny.train()
    try:
        with pytest.raises(kl.ModelError, match="is in train mode"):
            kl.activation_patching(
                tiny, prompt, kl.ZeroAblation(), kl.TargetProb(1), progress=False
            )
    finally:
        tiny.eval()


def test_not_a_hooked_model():
    with pytest.raises(kl.ModelError, match="is not a hooked model"):
        kl.check_model(torch.nn.Linear(2, 2))


@pytest.mark.substrate
def test_load_hooked_transformer_matches_huggingface(checkpoint):
    from models import SUBSTRATE

    from kloc_lens.model import load_hooked_transformer

    if SUBSTRATE != "hooked_transformer":  # TransformerLens 4.x has no HookedTransformer
        with pytest.raises(kl.ModelError, match="exists only in TransformerLens 3.x"):
            load_hooked_transformer(checkpoint)
        return
    model = load_hooked_transformer(checkpoint)
    assert substrate(model) == "hooked_transformer" and not model.training
    hf = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokens = model.to_tokens("The mother tongue of Danielle Darrieux is")
    torch.testing.assert_close(
        torch.log_softmax(model(tokens), -1),
        torch.log_softmax(hf(tokens).logits, -1),
        atol=1e-4,
        rtol=0,
    )
    with pytest.raises(kl.ModelError, match="has no tokenizer files"):
        empty = checkpoint.parent / "no_tok"
        save_tiny_checkpoint(empty, tokenizer=False)
        load_hooked_transformer(empty)

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


def test_weight_bytes_of_a_checkpoint_count_its_tensors(checkpoint, tmp_path):
    from safetensors.torch import load_file

    from kloc_lens.model import weight_bytes

    tensors = load_file(str(checkpoint / "model.safetensors"))
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert weight_bytes(checkpoint) == stored  # float32 on disk, float32 loaded
    floats = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    assert weight_bytes(checkpoint, "bfloat16") == stored - 2 * floats
    # a pickled checkpoint is scaled from its file size and config's dtype
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    size = (tmp_path / "pytorch_model.bin").stat().st_size
    assert weight_bytes(tmp_path) == size
    assert weight_bytes(tmp_path, torch.float16) == size // 2
    assert weight_bytes(tmp_path / "missing") is None
    assert weight_bytes("gpt2-xl") is None  # a hub name is not sized without the hub


def test_a_model_that_does_not_fit_is_refused_before_it_loads(checkpoint, monkeypatch):
    import kloc_lens.model as model_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_module, "available_bytes", lambda device: 10_000)
    with pytest.raises(kl.ModelError, match=r"does not fit on cpu: its weights take .* float32"):
        model_module.check_fits(checkpoint, "cpu")
    with pytest.raises(kl.ModelError, match="use --dtype bfloat16, a smaller --memory-budget"):
        model_module.check_fits(checkpoint, "cpu", "bfloat16")
    needed = model_module.weight_bytes(checkpoint)
    monkeypatch.setattr(model_module, "available_bytes", lambda device: needed + 100)
    assert model_module.check_fits(checkpoint, "cpu") == needed
    with pytest.raises(kl.ModelError, match="memory budget"):
        model_module.check_fits(checkpoint, "cpu", working_bytes=101)
    # through the command line: refused, and nothing loads
    from kloc_lens.cli import main

    monkeypatch.setattr(model_module, "available_bytes", lambda device: 10_000)
    monkeypatch.setattr(model_module, "load_model", never)
    monkeypatch.setattr(kl, "load_model", never)
    assert main(["--no-progress", "trace", "--model", str(checkpoint), "--device", "cpu"]) == 2

"""Knowledge neurons: integrated gradients against a one-forward-per-step loop and their
completeness identity, the selection rule, the planted lookup neurons, suppression against random
neurons on the embedded world, and hooks that never outlive their block."""

from __future__ import annotations

import random

import pytest
import torch
from models import as_substrate, word_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

import kloc_lens as kl
import kloc_lens.neurons as neurons
from kloc_lens.neurons import (
    KnowledgeNeurons,
    NeuronAttribution,
    NeuronError,
    knowledge_neurons,
)

pytestmark = pytest.mark.one_thread
# Tests marked `substrate` also run on a TransformerLens 3.9 HookedTransformer; the others use
# float64 models, which a HookedTransformer loads as float32.

TEXTS = ["The mother tongue of Danielle Darrieux is", "Edwin Hubble works in the field of"]


@pytest.fixture(scope="module")
def float64():
    torch.manual_seed(3)
    config = GPT2Config(
        vocab_size=len(word_tokenizer()),
        n_positions=64,
        n_embd=32,
        n_layer=3,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.3,  # far from linear: integrated gradients have work to do
    )
    config._attn_implementation = "eager"
    hf = GPT2LMHeadModel(config).eval().double()
    return as_substrate(hf, word_tokenizer(), "kloc-kn64")


def _prob(model, text, target_id, hooks=()):
    with torch.no_grad():
        logits = model.run_with_hooks(model.to_tokens(text), fwd_hooks=list(hooks))
    return float(torch.softmax(logits[0, -1].double(), -1)[target_id])


def _zero_at(layer, position):
    def hook(activation, hook):
        out = activation.clone()
        out[:, position] = 0.0
        return out

    return (f"blocks.{layer}.mlp.hook_post", hook)


@pytest.mark.parametrize("from_each_layer", [True, False])
def test_integrated_gradients_equal_a_loop_of_single_steps(float64, monkeypatch, from_each_layer):
    """The batched computation against one forward and one backward per step and layer: with
    each layer's rows starting at their layer (the engine drives the blocks), and with every
    row running the whole model (as for a model the engine cannot drive)."""
    model = float64
    target = "French"
    texts = [*TEXTS, "The capital of Germany is"]  # of another length
    started = []
    real = neurons._from_each_layer

    def spy(*args, **kwargs):
        started.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(neurons, "_from_each_layer", spy)
    if not from_each_layer:
        monkeypatch.setattr(neurons.BlockDriver, "for_model", lambda model: (None, "off"))
    found = knowledge_neurons(model, texts, target, steps=7)
    assert bool(started) is from_each_layer
    for p, text in enumerate(texts):
        tokens = model.to_tokens(text)
        target_id = kl.target_token_ids(model, text, target)[0]
        _, cache = model.run_with_cache(tokens)
        for row, layer in enumerate(found.layers):
            name = f"blocks.{layer}.mlp.hook_post"
            clean = cache[name][0, -1]
            total = torch.zeros_like(clean)
            for k in range(7):
                alpha = (k + 0.5) / 7
                leaf = (alpha * clean).detach().requires_grad_(True)

                def put(activation, hook, leaf=leaf):
                    out = activation.clone()
                    out[0, -1] = leaf
                    return out

                with torch.enable_grad():
                    logits = model.run_with_hooks(tokens, fwd_hooks=[(name, put)])
                    prob = torch.softmax(logits[0, -1], -1)[target_id]
                    (grad,) = torch.autograd.grad(prob, [leaf])
                total += grad
            expected = clean * total / 7
            torch.testing.assert_close(found.scores[p, row], expected, atol=1e-12, rtol=1e-9)
        assert found.target_ids[p] == target_id
        assert float(found.probs[p]) == pytest.approx(_prob(model, text, target_id), abs=1e-12)


def test_completeness_within_one_percent_at_50_steps(float64):
    model = float64
    found = knowledge_neurons(model, TEXTS, "French", steps=50)
    rough = knowledge_neurons(model, TEXTS, "French", steps=2)
    checked = 0
    for p, text in enumerate(TEXTS):
        target_id = found.target_ids[p]
        p_clean = _prob(model, text, target_id)
        for row, layer in enumerate(found.layers):
            p_zero = _prob(model, text, target_id, [_zero_at(layer, -1)])
            difference = p_clean - p_zero
            assert float(found.baseline_probs[p, row]) == pytest.approx(p_zero, abs=1e-12)
            total = float(found.scores[p, row].sum())
            assert abs(difference) > 1e-4  # the layer matters at all
            assert abs(total - difference) <= 0.01 * abs(difference)
            checked += 1
    assert checked == len(TEXTS) * model.cfg.n_layers
    # the identity is not automatic: two steps miss it by far more
    assert rough.completeness_gap.abs().max() > 10 * found.completeness_gap.abs().max()


def test_selection_rule_thresholds_and_shares():
    scores = torch.zeros(3, 2, 4)
    scores[0, 0] = torch.tensor([10.0, 2.0, 1.9, -20.0])  # max 10: keeps 0 and 1 at t=0.2
    scores[1, 0] = torch.tensor([4.0, 0.0, 1.0, 0.0])  # max 4: keeps 0 and 2
    scores[2, 1] = torch.tensor([0.0, 3.0, 0.0, 0.0])  # max 3 (layer 5): keeps (5, 1)
    attribution = NeuronAttribution(
        scores=scores,
        layers=(2, 5),
        prompts=("a", "b", "c"),
        target="x",
        target_ids=(1, 1, 1),
        steps=20,
        probs=torch.ones(3),
        baseline_probs=torch.zeros(3, 2),
        model="m",
    )
    assert attribution.select(0.2, 0.5).neurons == ((2, 0),)  # 2 of 3 prompts > 0.5
    assert attribution.select(0.2, 0.0).neurons == ((2, 0), (2, 1), (2, 2), (5, 1))
    assert attribution.select(0.25, 0.0).neurons == ((2, 0), (2, 2), (5, 1))
    assert attribution.select(0.2, 0.7).neurons == ()  # no neuron in more than 70% of them
    assert attribution.select(1.0, 0.34).neurons == ((2, 0),)  # maxima: (2, 0) in 2 of 3
    kept = attribution.select(0.2, 0.5)
    assert (kept.threshold, kept.share, kept.n_prompts, kept.target) == (0.2, 0.5, 3, "x")
    with pytest.raises(NeuronError, match="threshold must be in \\(0, 1\\], got 0"):
        attribution.select(0.0)
    with pytest.raises(NeuronError, match="share must be in \\[0, 1\\), got 1.0"):
        attribution.select(0.2, 1.0)


@pytest.mark.substrate
def test_planted_lookup_neurons_are_found_and_suppression_removes_the_fact(planted):
    """Planted neuron i of the lookup layer fires on subject i's last token (ground truth)."""
    model, facts = planted
    for index, (subject, obj) in enumerate(facts.pairs()):
        text = facts.prompt(index)
        found = knowledge_neurons(model, text, obj, layers=[0, 1, 2], position=-2)
        selected = found.select(threshold=0.2)
        assert selected.neurons == ((facts.mlp_layer, index),), subject
        answer = found.target_ids[0]
        with selected.suppressed(model):
            suppressed = _prob(model, text, answer)
        with selected.random_control(model, seed=index).suppressed(model):
            control = _prob(model, text, answer)
        assert float(found.probs[0]) > 0.99
        assert suppressed < 0.1
        assert control > 0.99


def test_suppressing_knowledge_neurons_beats_random_neurons_on_factworld():
    """Dai et al.'s validation on the embedded world: over >= 50 facts the model knows, setting
    the selected neurons (attribution >= 0.2 x max on both of two prompts of the fact) to zero
    lowers p(answer) more than setting as many random neurons of the same layers to zero.
    Asserted: the measured mean gap is positive with its 2-standard-error band (seeded choice of
    facts and of random neurons)."""
    from kloc_lens.factworld import load_factworld

    model, world = load_factworld()
    rng = random.Random(0)
    gaps, sizes = [], []
    for index, fact in enumerate(rng.sample(list(world.facts), len(world.facts))):
        prompts = fact.prompts(kl.Perspective.ENTITY)[:2]  # canonical and a paraphrase
        text = prompts[0].text
        answer = kl.target_token_ids(model, prompts[0], fact.object)[0]
        clean = _prob(model, text, answer)
        if clean < 0.5:  # only facts the model knows
            continue
        found = knowledge_neurons(model, prompts, fact.object, steps=20).select(0.2, 0.5)
        if not found.neurons:
            continue
        with found.suppressed(model):
            suppressed = _prob(model, text, answer)
        with found.random_control(model, seed=index).suppressed(model):
            control = _prob(model, text, answer)
        gaps.append((clean - suppressed) - (clean - control))
        sizes.append(len(found))
        if len(gaps) == 50:
            break
    assert len(gaps) == 50
    gap = torch.tensor(gaps, dtype=torch.float64)
    mean, stderr = float(gap.mean()), float(gap.std() / len(gap) ** 0.5)
    assert mean - 2 * stderr > 0, f"mean gap {mean:.3f} +- {stderr:.3f}, sizes {sizes}"


@pytest.mark.substrate
def test_hooks_scale_exactly_there_and_never_outlive_the_block(tiny):
    model = tiny
    tokens = model.to_tokens(TEXTS[0])
    chosen = KnowledgeNeurons(((0, 3), (0, 7), (2, 1)), kl.model.model_identity(model))
    _, cache = model.run_with_cache(tokens)

    def attached():
        return sum(len(point._forward_hooks) for point in model.hook_dict.values())

    before = attached()
    seen = {}

    def keep(activation, hook):
        seen["post"] = activation.detach().clone()

    for scale, everywhere in ((0.0, False), (2.0, False), (0.0, True)):
        with chosen.applied(model, scale, everywhere=everywhere):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_post", keep)])
            assert attached() > before
        clean = cache["blocks.0.mlp.hook_post"]
        expected = clean.clone()
        where = slice(None) if everywhere else -1
        expected[:, where, [3, 7]] = clean[:, where, [3, 7]] * scale
        torch.testing.assert_close(seen["post"], expected, atol=0, rtol=0)
        assert attached() == before
    with pytest.raises(RuntimeError, match="inside"), chosen.suppressed(model):
        raise RuntimeError("inside")
    assert attached() == before
    with pytest.raises(NeuronError, match="were found on model 'other'"):
        KnowledgeNeurons(((0, 3),), "other").suppressed(model).__enter__()
    with pytest.raises(NeuronError, match="outside the model's 3 layers"):
        KnowledgeNeurons(((5, 3),), kl.model.model_identity(model)).suppressed(model).__enter__()
    assert attached() == before


def test_per_row_positions_scale_each_rows_own_token(tiny):
    """In a right-padded batch, ``positions`` (each row's last real token) scales what
    ``position=-1`` scales in each prompt alone."""
    model = tiny
    chosen = KnowledgeNeurons(((0, 3), (1, 5), (2, 1)), kl.model.model_identity(model))
    prompts = [TEXTS[0], TEXTS[0] + " and more words here", TEXTS[1]]
    batch = kl.tokenize_batch(model, prompts)
    assert len(set(batch.last.tolist())) > 1  # rows of different lengths
    with torch.no_grad(), chosen.suppressed(model, positions=batch.last):
        logits = model(batch.tokens)
    rows = torch.arange(len(prompts))
    for row, prompt in enumerate(prompts):
        with torch.no_grad(), chosen.suppressed(model):
            alone = model(model.to_tokens(prompt))[0, -1]
        torch.testing.assert_close(logits[rows[row], batch.last[row]], alone, atol=1e-5, rtol=0)
        with torch.no_grad():
            clean = model(model.to_tokens(prompt))[0, -1]
        assert not torch.allclose(alone, clean, atol=1e-4)  # the suppression does something


@pytest.mark.substrate
def test_save_load_and_dataframe(tiny, tmp_path):
    found = knowledge_neurons(tiny, TEXTS, "French", layers=[1, 2], steps=3)
    loaded = NeuronAttribution.load(found.save(tmp_path / "kn.safetensors"))
    torch.testing.assert_close(loaded.scores, found.scores, atol=0, rtol=0)
    torch.testing.assert_close(loaded.baseline_probs, found.baseline_probs, atol=0, rtol=0)
    for field in ("layers", "prompts", "target", "target_ids", "steps", "model", "position"):
        assert getattr(loaded, field) == getattr(found, field), field
    frame = found.to_dataframe()
    assert len(frame) == 2 * 2 * tiny.cfg.d_mlp
    assert list(frame.columns) == ["prompt", "layer", "neuron", "score"]
    with pytest.raises(NeuronError, match="no neuron attribution file"):
        NeuronAttribution.load(tmp_path / "missing.safetensors")


@pytest.mark.substrate
def test_bad_input_is_named(tiny):
    with pytest.raises(NeuronError, match="steps must be >= 1, got 0"):
        knowledge_neurons(tiny, TEXTS[0], "French", steps=0)
    with pytest.raises(NeuronError, match="position 40 is outside prompt"):
        knowledge_neurons(tiny, TEXTS[0], "French", position=40)
    with pytest.raises(NeuronError, match="target token id 99999 outside the vocabulary"):
        knowledge_neurons(tiny, TEXTS[0], 99999)
    with pytest.raises(kl.SweepError, match="layers \\[3\\] outside 0..2"):
        knowledge_neurons(tiny, TEXTS[0], "French", layers=[3])
    with pytest.raises(NeuronError, match="at least one prompt"):
        knowledge_neurons(tiny, [], "French")

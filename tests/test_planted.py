"""The planted model predicts its facts, and they live exactly where the construction puts them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from kloc_lens.planted import PlantedFacts, build_planted_hf, planted_model

pytestmark = pytest.mark.one_thread

N_SAMPLES = 10
NOISE_SCALE = 3.0


@pytest.fixture(scope="module")
def planted() -> tuple[Any, PlantedFacts]:
    return planted_model(seed=0)


def _subject_span(model: Any, facts: PlantedFacts, index: int) -> list[int]:
    """Token positions of subject ``index`` in its entity prompt."""
    str_tokens = model.to_str_tokens(facts.prompt(index))
    words = facts.subjects[index].split()
    for start in range(len(str_tokens) - len(words) + 1):
        if str_tokens[start : start + len(words)] == words:
            return list(range(start, start + len(words)))
    raise AssertionError(f"subject {facts.subjects[index]!r} not found in {str_tokens}")


def _noise_std(model: Any, facts: PlantedFacts) -> float:
    """Standard deviation of the subject-token embeddings over all subjects (as in ROME)."""
    rows = []
    for index in range(len(facts.subjects)):
        _, cache = model.run_with_cache(
            facts.prompt(index), names_filter=lambda name: name == "hook_embed"
        )
        rows.append(cache["hook_embed"][0, _subject_span(model, facts, index)])
    return torch.cat(rows).std().item()


def _p_object(logits: Tensor, object_id: int) -> Tensor:
    return logits[:, -1].softmax(dim=-1)[:, object_id]


Patch = tuple[str, int]
"""A clean activation to restore: ``(hook_name, position)``."""


class _Trace:
    """Clean and noisy runs of one fact, and patched noisy runs (batched in one forward)."""

    def __init__(self, model: Any, facts: PlantedFacts, index: int, std: float) -> None:
        self.model = model
        self.tokens = model.to_tokens(facts.prompt(index))
        self.subject = _subject_span(model, facts, index)
        self.subject_last = self.subject[-1]
        self.last = self.tokens.shape[1] - 1
        self.object_id = model.to_single_token(facts.objects[index])
        generator = torch.Generator().manual_seed(1000 + index)
        self.noise = (
            NOISE_SCALE
            * std
            * torch.randn(N_SAMPLES, len(self.subject), model.cfg.d_model, generator=generator)
        )
        logits, self.cache = model.run_with_cache(self.tokens)
        self.p_clean = _p_object(logits, self.object_id).item()
        (self.p_noisy,) = self.run([()])

    def _corrupt(self, embed: Tensor, hook: Any) -> Tensor:
        noise = self.noise.repeat(embed.shape[0] // N_SAMPLES, 1, 1).to(embed)
        embed[:, self.subject] = embed[:, self.subject] + noise
        return embed

    def run(self, configs: Sequence[Sequence[Patch]]) -> list[float]:
        """Mean p(object) over the noisy samples, for each configuration of restored patches.

        Configuration ``c`` occupies rows ``c * N_SAMPLES : (c + 1) * N_SAMPLES`` of one batch,
        with the same noise in every configuration.
        """
        targets: dict[str, list[tuple[slice, int]]] = {}
        for c, patches in enumerate(configs):
            rows = slice(c * N_SAMPLES, (c + 1) * N_SAMPLES)
            for name, pos in patches:
                targets.setdefault(name, []).append((rows, pos))
        hooks: list[tuple[str, Callable[..., Tensor]]] = [("hook_embed", self._corrupt)]
        for name, where in targets.items():

            def restore(act: Tensor, hook: Any, name: str = name, where: Any = where) -> Tensor:
                for rows, pos in where:
                    act[rows, pos] = self.cache[name][0, pos]
                return act

            hooks.append((name, restore))
        tokens = self.tokens.repeat(len(configs) * N_SAMPLES, 1)
        logits = self.model.run_with_hooks(tokens, fwd_hooks=hooks)
        p = _p_object(logits, self.object_id).view(len(configs), N_SAMPLES)
        return p.mean(dim=1).tolist()


@pytest.fixture(scope="module")
def traces(planted: tuple[Any, PlantedFacts]) -> list[_Trace]:
    model, facts = planted
    std = _noise_std(model, facts)
    with torch.no_grad():
        return [_Trace(model, facts, i, std) for i in range(len(facts.subjects))]


def test_facts_describe_the_model(planted: tuple[Any, PlantedFacts]) -> None:
    model, facts = planted
    assert len(facts.subjects) == len(facts.objects) >= 4
    assert facts.n_layers == model.cfg.n_layers
    assert facts.mlp_layer < facts.attn_layer < facts.n_layers
    assert 0 <= facts.head < model.cfg.n_heads
    assert "{subject}" in facts.template
    last_words = [subject.split()[-1] for subject in facts.subjects]
    assert len(set(last_words)) == len(last_words)
    assert all(len(subject.split()) == 2 for subject in facts.subjects)
    # At least two subjects share a first word: only the last token can tell them apart.
    first_words = [subject.split()[0] for subject in facts.subjects]
    assert len(set(first_words)) < len(first_words)
    assert not set(facts.spare_objects) & set(facts.objects)
    for name in (
        "hook_embed",
        f"blocks.{facts.mlp_layer}.hook_mlp_out",
        f"blocks.{facts.attn_layer}.hook_attn_out",
        f"blocks.{facts.attn_layer}.attn.hook_z",
        f"blocks.{facts.n_layers - 1}.hook_resid_post",
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_mid",
    ):
        assert name in model.hook_dict, name


def test_tokenizer_prepends_bos_and_splits_words(planted: tuple[Any, PlantedFacts]) -> None:
    model, facts = planted
    prompt = facts.prompt(0)
    tokens = model.to_tokens(prompt)
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    assert model.tokenizer.bos_token == "<bos>"
    assert model.to_str_tokens(prompt) == ["<bos>", *prompt.split()]
    for word in (*facts.objects, *facts.spare_objects, *" ".join(facts.subjects).split()):
        assert model.to_str_tokens(word, prepend_bos=False) == [word]
    assert model.to_str_tokens("Zyzzyva", prepend_bos=False) == ["<unk>"]


def test_every_fact_is_predicted(planted: tuple[Any, PlantedFacts]) -> None:
    model, facts = planted
    with torch.no_grad():
        for index, obj in enumerate(facts.objects):
            logits = model(facts.prompt(index))
            object_id = model.to_single_token(obj)
            assert logits[0, -1].argmax().item() == object_id, facts.prompt(index)
            assert _p_object(logits, object_id).item() > 0.9


def test_bridge_logits_match_hf() -> None:
    hf_model, tokenizer, facts = build_planted_hf(seed=0)
    model, _ = planted_model(seed=0)
    prompts = [facts.prompt(i) for i in range(len(facts.subjects))]
    prompts.append(f"The relation between {facts.subjects[1]} and {facts.objects[1]} is")
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            assert torch.equal(ids, model.to_tokens(prompt))
            expected = hf_model(ids).logits
            torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=0)


def test_noise_on_the_subject_destroys_the_prediction(traces: list[_Trace]) -> None:
    for trace in traces:
        assert trace.p_clean > 0.9
        assert trace.p_noisy < 0.5 * trace.p_clean
        assert trace.p_noisy < 0.1


def test_only_the_planted_components_write(planted: tuple[Any, PlantedFacts]) -> None:
    model, facts = planted
    trace_tokens = model.to_tokens(facts.prompt(0))
    subject_last = _subject_span(model, facts, 0)[-1]
    with torch.no_grad():
        _, cache = model.run_with_cache(trace_tokens)
    for layer in range(facts.n_layers):
        mlp_out = cache[f"blocks.{layer}.hook_mlp_out"][0]
        attn_out = cache[f"blocks.{layer}.hook_attn_out"][0]
        if layer == facts.mlp_layer:
            assert mlp_out[subject_last].norm() > 10.0
            others = [p for p in range(mlp_out.shape[0]) if p != subject_last]
            assert mlp_out[others].abs().max() == 0.0
        else:
            assert mlp_out.abs().max() == 0.0
        if layer == facts.attn_layer:
            assert attn_out[-1].norm() > 10.0
        else:
            assert attn_out.abs().max() == 0.0


def test_restoring_the_planted_mlp_recovers_the_fact(
    planted: tuple[Any, PlantedFacts], traces: list[_Trace]
) -> None:
    _, facts = planted
    with torch.no_grad():
        for trace in traces:
            sites = [
                (layer, pos)
                for layer in range(facts.n_layers)
                for pos in (*trace.subject, trace.last)
            ]
            ps = trace.run([[(f"blocks.{layer}.hook_mlp_out", pos)] for layer, pos in sites])
            for (layer, pos), p in zip(sites, ps, strict=True):
                if (layer, pos) == (facts.mlp_layer, trace.subject_last):
                    assert p > 0.8 * trace.p_clean, (layer, pos)
                else:
                    # Every other MLP output is exactly zero, clean or noisy.
                    assert p < 0.5 * trace.p_clean, (layer, pos)
                    assert abs(p - trace.p_noisy) < 1e-3, (layer, pos)


def test_restoring_the_planted_attention_recovers_the_fact(
    planted: tuple[Any, PlantedFacts], traces: list[_Trace]
) -> None:
    _, facts = planted
    with torch.no_grad():
        for trace in traces:
            sites = [
                (layer, pos)
                for layer in range(facts.n_layers)
                for pos in (trace.subject_last, trace.last)
            ]
            ps = trace.run([[(f"blocks.{layer}.hook_attn_out", pos)] for layer, pos in sites])
            for (layer, pos), p in zip(sites, ps, strict=True):
                if (layer, pos) == (facts.attn_layer, trace.last):
                    assert p > 0.8 * trace.p_clean, (layer, pos)
                else:
                    # Attention at the subject's last position never carries the answer onward.
                    assert p < 0.5 * trace.p_clean, (layer, pos)


def test_residual_trace_has_the_rome_shape(
    planted: tuple[Any, PlantedFacts], traces: list[_Trace]
) -> None:
    # The subject's last position matters until the mover head has read it; the last position
    # matters from then on; the subject's first word never matters.
    _, facts = planted
    with torch.no_grad():
        for trace in traces:
            sites = [
                (layer, pos)
                for layer in range(facts.n_layers)
                for pos in (trace.subject[0], trace.subject_last, trace.last)
            ]
            ps = trace.run([[(f"blocks.{layer}.hook_resid_pre", pos)] for layer, pos in sites])
            for (layer, pos), p in zip(sites, ps, strict=True):
                expected = {
                    trace.subject[0]: False,
                    trace.subject_last: layer <= facts.attn_layer,
                    trace.last: layer > facts.attn_layer,
                }[pos]
                assert (p > 0.8 * trace.p_clean) == expected, (layer, pos, p)
                assert expected or p < 0.5 * trace.p_clean, (layer, pos, p)


def test_zeroing_the_planted_head_destroys_the_fact(planted: tuple[Any, PlantedFacts]) -> None:
    model, facts = planted
    n_heads = model.cfg.n_heads

    def zero_one_head_per_row(z: Tensor, hook: Any) -> Tensor:
        for head in range(n_heads):
            z[head, :, head] = 0.0
        return z

    name = f"blocks.{facts.attn_layer}.attn.hook_z"
    with torch.no_grad():
        for index, obj in enumerate(facts.objects):
            object_id = model.to_single_token(obj)
            tokens = model.to_tokens(facts.prompt(index)).repeat(n_heads, 1)
            logits = model.run_with_hooks(tokens, fwd_hooks=[(name, zero_one_head_per_row)])
            probs = logits[:, -1].softmax(dim=-1)
            for head in range(n_heads):
                if head == facts.head:
                    # Nothing reaches the last position: the next-token distribution is flat.
                    assert probs[head, object_id] < 0.1
                    assert probs[head].max() < 2.0 / model.cfg.d_vocab
                else:
                    assert probs[head].argmax().item() == object_id
                    assert probs[head, object_id] > 0.9


def test_same_seed_same_weights_and_no_global_rng_use() -> None:
    state = torch.random.get_rng_state()
    first, _, facts = build_planted_hf(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    second, _, facts_again = build_planted_hf(seed=0)
    other, _, _ = build_planted_hf(seed=1)
    assert facts == facts_again
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


@pytest.mark.parametrize("seed", [1, 7])
def test_other_seeds_plant_the_same_facts(seed: int) -> None:
    model, facts = planted_model(seed=seed)
    assert facts == build_planted_hf(seed=0)[2]
    std = _noise_std(model, facts)
    with torch.no_grad():
        for index, obj in enumerate(facts.objects):
            logits = model(facts.prompt(index))
            object_id = model.to_single_token(obj)
            assert logits[0, -1].argmax().item() == object_id
            assert _p_object(logits, object_id).item() > 0.9
        trace = _Trace(model, facts, 0, std)
        assert trace.p_noisy < 0.5 * trace.p_clean
        name = f"blocks.{facts.mlp_layer}.hook_mlp_out"
        (p_restored,) = trace.run([[(name, trace.subject_last)]])
        assert p_restored > 0.8 * trace.p_clean

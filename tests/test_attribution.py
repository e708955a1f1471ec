"""Attribution patching (AtP, AtP*): exact where the metric is affine in the patched activation,
gradients equal to finite differences, GradDrop equal to a per-layer stop-gradient loop, the QK fix
on saturated attention, and screen-then-patch against the full exact sweep."""

from __future__ import annotations

import pytest
import torch
from models import as_substrate, word_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

import kloc_lens as kl
from kloc_lens.attribution import AttributionError, AttributionMethod, attribution_patching
from kloc_lens.screen import Component, screen_then_patch

pytestmark = pytest.mark.one_thread
# Tests marked `substrate` also run on a TransformerLens 3.9 HookedTransformer; the others use
# identity MLP activations and float64 models, which a HookedTransformer does not load.

FACT = kl.Fact("Danielle Darrieux", "mother tongue", "French")
TOL = 1e-5


def _gpt2(
    *, n_layer: int, seed: int, init: float, activation: str = "gelu_new", dtype=torch.float32
) -> GPT2LMHeadModel:
    """A random GPT-2 with the tests' word tokenizer; ``init`` is the weights' std (0.02 in HF):
    larger values give peaked attention and effects far above float rounding."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(word_tokenizer()),
        n_positions=64,
        n_embd=32,
        n_layer=n_layer,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        activation_function=activation,
        initializer_range=init,
    )
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config).eval().to(dtype)


def _inputs(model):
    prompt = kl.tokenize(model, FACT.entity_prompt())
    corrupted = kl.TokenReplacement("Lyon Beirut").apply(model, prompt).tokens
    answer = kl.target_token_ids(model, prompt.prompt)[0]
    wrong = kl.target_token_ids(model, prompt.prompt, "English")[0]
    return prompt, corrupted, answer, wrong


# ---- exact where the metric is affine in the patched activation -------------------------------


@pytest.fixture(scope="module")
def affine():
    """A 2-layer GPT-2 with identity MLP activations. With every LayerNorm scale frozen (a
    constant per position) everything downstream of the last layer's MLP and attention outputs is
    affine; freezing the attention inputs (``ln1.hook_normalized``) of the layers after a
    residual state makes that state's downstream affine too. Queries and keys act through the
    attention softmax: affine after it, which is what the QK fix linearises."""
    model = as_substrate(
        _gpt2(n_layer=2, seed=0, init=0.3, activation="linear"), word_tokenizer(), "kloc-affine"
    )
    prompt, corrupted, answer, wrong = _inputs(model)
    _, cache = model.run_with_cache(prompt.tokens[None])

    def readout(logits):
        # every position: the corrupted subject reaches the logits without attention
        return (logits[..., answer] - logits[..., wrong]).mean()

    def frozen(names):
        constants = {name: cache[name].detach().clone() for name in names}

        def freeze(name):
            def hook(activation, hook):
                const = constants[name]
                # sweeps may run only the last positions of a prompt (see kloc_lens._engine)
                return const[:, const.shape[1] - activation.shape[1] :].expand_as(activation)

            return hook

        return [(name, freeze(name)) for name in names]

    n_layers = model.cfg.n_layers
    scales = [f"blocks.{layer}.ln{i}.hook_scale" for layer in range(n_layers) for i in (1, 2)]
    scales.append("ln_final.hook_scale")
    attention_inputs = {
        first: [f"blocks.{layer}.ln1.hook_normalized" for layer in range(first, n_layers)]
        for first in range(n_layers)
    }
    return model, prompt, corrupted, readout, frozen, scales, attention_inputs


LAST = 1
AFFINE_CASES = [
    # (site, sweep, layers, first layer whose attention input is frozen, or None)
    ("resid_post", "layer_pos", [LAST], None),
    ("resid_mid", "layer_pos", [LAST], None),
    ("attn_out", "layer_pos", [LAST], None),
    ("mlp_out", "layer_pos", [LAST], None),
    ("mlp_post", "layer_pos", [LAST], None),
    ("mlp_pre", "layer_pos", [LAST], None),
    ("z", "layer_head", [LAST], None),
    ("z", "layer_pos_head", [LAST], None),
    ("v", "layer_pos", [LAST], None),
    ("v", "layer_pos_head", [LAST], None),
    ("pattern", "layer_pos_head", [LAST], None),
    ("pattern", "layer_head", [LAST], None),
    ("q", "layer_pos", [LAST], None),
    ("q", "layer_head", [LAST], None),
    ("q", "layer_pos_head", [LAST], None),
    ("k", "layer_pos", [LAST], None),
    ("k", "layer_head", [LAST], None),
    ("k", "layer_pos_head", [LAST], None),
    ("resid_pre", "layer_pos", [LAST], LAST),
    ("resid_pre", "layer_pos", None, 0),
    ("embed", "layer_pos", None, 0),
]


@pytest.mark.parametrize("direction", ["restore", "inject"])
@pytest.mark.parametrize(
    ("site", "sweep", "layers", "attention_from"),
    AFFINE_CASES,
    ids=[f"{c[0]}-{c[1]}-{'all' if c[2] is None else c[2][0]}" for c in AFFINE_CASES],
)
def test_exact_where_the_metric_is_affine_in_the_patch(
    affine, site, sweep, layers, attention_from, direction
):
    model, prompt, corrupted, readout, frozen, scales, attention_inputs = affine
    names = scales + (attention_inputs[attention_from] if attention_from is not None else [])
    qk = site in ("q", "k")
    with model.hooks(fwd_hooks=frozen(names)):
        exact = kl.activation_patching(
            model, prompt, corrupted, readout, site=site, sweep=sweep, direction=direction,
            layers=layers, progress=False,
        )  # fmt: skip
        estimate = attribution_patching(
            model, prompt, corrupted, readout, site=site, sweep=sweep, direction=direction,
            layers=layers, method="atp_qk" if qk else "atp",
        )  # fmt: skip
        plain = attribution_patching(
            model, prompt, corrupted, readout, site=site, sweep=sweep, direction=direction,
            layers=layers, method="atp",
        )  # fmt: skip
    assert type(estimate) is type(exact)
    assert estimate.values.shape == exact.values.shape
    assert exact.values.std() > 1e-3  # real effects, far above the tolerance
    torch.testing.assert_close(estimate.values, exact.values, atol=TOL, rtol=0)
    if qk:
        # the softmax is not affine: plain AtP is wrong here, the QK fix is not
        assert (plain.values - exact.values).abs().max() > 1e-3
    else:
        torch.testing.assert_close(plain.values, estimate.values, atol=0, rtol=0)


def test_exact_under_gaussian_noise_rows_and_a_token_batch(affine):
    """Corruptions with several rows (noise samples applied at hook_embed) and batches of
    prompts as token tensors."""
    model, prompt, _, readout, frozen, scales, attention_inputs = affine
    noise = kl.GaussianNoise(scale=2.0, samples=3, seed=1)
    with model.hooks(fwd_hooks=frozen(scales)):
        for direction in ("restore", "inject"):
            exact = kl.activation_patching(
                model, prompt, noise, readout, site="mlp_out", direction=direction,
                progress=False, layers=[LAST],
            )  # fmt: skip
            estimate = attribution_patching(
                model, prompt, noise, readout, site="mlp_out", direction=direction,
                layers=[LAST],
            )  # fmt: skip
            assert exact.values.std() > 1e-3
            torch.testing.assert_close(estimate.values, exact.values, atol=TOL, rtol=0)
            assert estimate.corruption == exact.corruption
    texts = ["The mother tongue of Danielle Darrieux is", "The capital of Germany is a city"]
    corrupt = ["The mother tongue of Lyon Beirut is", "The capital of Paris is a city"]
    clean = torch.cat([model.to_tokens(t) for t in texts])
    bad = torch.cat([model.to_tokens(t) for t in corrupt])
    names = scales + attention_inputs[0]
    with model.hooks(fwd_hooks=frozen_for_batch(model, clean, names)):
        exact = kl.activation_patching(model, clean, bad, readout, site="resid_pre",
                                       progress=False)  # fmt: skip
        estimate = attribution_patching(model, clean, bad, readout, site="resid_pre")
    assert exact.values.std() > 1e-3
    torch.testing.assert_close(estimate.values, exact.values, atol=TOL, rtol=0)


def frozen_for_batch(model, tokens, names):
    _, cache = model.run_with_cache(tokens)

    def freeze(name):
        const = cache[name].detach().clone()

        def hook(activation, hook):
            # a sweep stacks configurations of every row: [config * row, ...]
            tail = const[:, const.shape[1] - activation.shape[1] :]
            return tail.repeat(activation.shape[0] // const.shape[0], 1, 1)

        return hook

    return [(name, freeze(name)) for name in names]


# ---- same labels, same classes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny3():
    model = as_substrate(_gpt2(n_layer=3, seed=1, init=0.1), word_tokenizer(), "kloc-tiny3")
    prompt, corrupted, answer, wrong = _inputs(model)
    return model, prompt, corrupted, kl.LogitDiff(answer, wrong)


@pytest.mark.substrate
@pytest.mark.parametrize(
    ("site", "sweep"), [("resid_pre", "layer_pos"), ("z", "layer_head"), ("k", "layer_pos_head")]
)
@pytest.mark.parametrize("method", ["atp", "atp_qk", "atp*"])
def test_same_result_class_and_labels_as_activation_patching(tiny3, tmp_path, site, sweep, method):
    model, prompt, corrupted, metric = tiny3
    subset = {}
    if sweep != "layer_head":
        subset["positions"] = [0, 5, 6, 7]
    if sweep != "layer_pos":
        subset["heads"] = [1, 3]
    exact = kl.activation_patching(
        model, prompt, corrupted, metric, site=site, sweep=sweep, progress=False, **subset
    )
    estimate = attribution_patching(
        model, prompt, corrupted, metric, site=site, sweep=sweep, method=method, **subset
    )
    assert type(estimate) is type(exact)
    for field in ("layers", "positions", "heads", "str_tokens", "spans", "site", "direction",
                  "metric", "corruption"):  # fmt: skip
        assert getattr(estimate, field) == getattr(exact, field), field
    assert estimate.clean_score == pytest.approx(exact.clean_score, abs=1e-6)
    assert estimate.corrupted_score == pytest.approx(exact.corrupted_score, abs=1e-6)
    frame = estimate.to_dataframe()
    assert list(frame.columns) == list(exact.to_dataframe().columns)
    loaded = kl.load_result(estimate.save(tmp_path / "atp.safetensors"))
    assert type(loaded) is type(estimate)
    torch.testing.assert_close(loaded.values, estimate.values)
    if method == "atp*":
        assert bool((estimate.effect >= 0).all())  # GradDrop's size is unsigned


# ---- gradients against finite differences (float64) -------------------------------------------


@pytest.fixture(scope="module")
def float64():
    model = as_substrate(
        _gpt2(n_layer=3, seed=2, init=0.2, dtype=torch.float64), word_tokenizer(), "kloc-f64"
    )
    prompt, corrupted, answer, _ = _inputs(model)

    def probability(logits):
        # kl.TargetProb computes in float32; this metric keeps float64
        return torch.softmax(logits[:, -1], dim=-1)[:, answer].mean()

    return model, prompt, corrupted, probability


def _along(model, tokens, hook_name, direction_tensor, eps, metric):
    """metric(base + eps * direction at one hook) by central differences."""

    def hook(plus):
        def fn(activation, hook):
            return activation + plus * eps * direction_tensor

        return fn

    with torch.no_grad():
        up = metric(model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook(1.0))]))
        down = metric(model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook(-1.0))]))
    return float((up - down) / (2 * eps))


FD_CASES = [
    ("resid_pre", "layer_pos", 1, 5, None),
    ("resid_post", "layer_pos", 0, 6, None),
    ("attn_out", "layer_pos", 2, 7, None),
    ("mlp_post", "layer_pos", 1, 6, None),
    ("z", "layer_pos_head", 0, 6, 2),
    ("z", "layer_head", 1, None, 3),
    ("v", "layer_pos_head", 1, 5, 0),
    ("q", "layer_pos_head", 2, 7, 1),
    ("k", "layer_pos_head", 1, 6, 3),
    ("pattern", "layer_pos_head", 2, 7, 0),
    ("embed", "layer_pos", 0, 5, None),
]


@pytest.mark.parametrize("direction", ["restore", "inject"])
@pytest.mark.parametrize(
    ("site", "sweep", "layer", "pos", "head"), FD_CASES, ids=[f"{c[0]}-{c[1]}" for c in FD_CASES]
)
def test_gradients_match_finite_differences(float64, site, sweep, layer, pos, head, direction):
    model, prompt, corrupted, metric = float64
    clean = prompt.tokens[None]
    base, source = (corrupted, clean) if direction == "restore" else (clean, corrupted)
    estimate = attribution_patching(
        model, prompt, corrupted, metric, site=site, sweep=sweep, direction=direction
    )
    assert estimate.values.dtype == torch.float64
    s = kl.get_site(site)
    hook_name = s.hook_name(layer)
    _, base_cache = model.run_with_cache(base)
    _, source_cache = model.run_with_cache(source)
    delta = source_cache[hook_name] - base_cache[hook_name]
    mask = torch.zeros_like(delta)
    index = [slice(None)] * delta.dim()
    if pos is not None:
        index[1 + s.pos_dim] = pos
    if head is not None:
        index[1 + s.head_dim] = head
    mask[tuple(index)] = 1.0
    expected = _along(model, base, hook_name, mask * delta, 1e-5, metric)
    at = [estimate.layers.index(layer)]
    if estimate.positions:
        at.append(estimate.positions.index(pos))
    if estimate.heads:
        at.append(estimate.heads.index(head))
    base_score = estimate.corrupted_score if direction == "restore" else estimate.clean_score
    got = float(estimate.values[tuple(at)]) - base_score
    assert abs(expected) > 1e-6  # a real derivative
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize(("site", "layer", "pos", "head"), [("q", 2, 7, 1), ("k", 1, 5, 3)])
def test_qk_fix_is_the_derivative_along_the_exactly_patched_pattern(
    float64, site, layer, pos, head
):
    """The QK fix = d/de metric(pattern + e * (pattern after the exact patch - pattern))."""
    model, prompt, corrupted, metric = float64
    clean = prompt.tokens[None]
    s = kl.get_site(site)
    hook_name = s.hook_name(layer)
    pattern_name = f"blocks.{layer}.attn.hook_pattern"
    _, base_cache = model.run_with_cache(corrupted)
    _, source_cache = model.run_with_cache(clean)
    seen = {}

    def patch(activation, hook):
        out = activation.clone()
        out[:, pos, head] = source_cache[hook_name][:, pos, head]
        return out

    def keep(activation, hook):
        seen["pattern"] = activation.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, patch), (pattern_name, keep)])
    change = seen["pattern"] - base_cache[pattern_name]
    assert change.abs().max() > 1e-4
    expected = _along(model, corrupted, pattern_name, change, 1e-5, metric)
    fixed = attribution_patching(
        model, prompt, corrupted, metric, site=site, sweep="layer_pos_head", method="atp_qk"
    )
    plain = attribution_patching(
        model, prompt, corrupted, metric, site=site, sweep="layer_pos_head", method="atp"
    )
    got = float(fixed.effect[fixed.layers.index(layer), pos, head])
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert float(plain.effect[layer, pos, head]) != pytest.approx(expected, rel=1e-3)


# ---- GradDrop ---------------------------------------------------------------------------------


def _graddrop_loop(model, base, source, metric, site, sweep):
    """Kramar et al.'s AtP+GradDrop, written out: for each layer l a forward pass whose attention
    and MLP outputs of layer l are detached (their gradient dropped), the gradient at the site by
    torch.autograd.grad, the AtP estimates; then sum_l |estimate_l| / (L - 1)."""
    s = kl.get_site(site)
    n_layers = model.cfg.n_layers
    _, source_cache = model.run_with_cache(source)
    total = None
    names = [s.hook_name(layer) for layer in range(n_layers)]

    def keep(acts, name):
        def fn(activation, hook):
            acts[name] = activation
            return activation

        return fn

    def detach(activation, hook):
        return activation.detach()

    for dropped in range(n_layers):
        acts = {}
        hooks = [(name, keep(acts, name)) for name in names]
        hooks += [(f"blocks.{dropped}.hook_attn_out", detach)]
        hooks += [(f"blocks.{dropped}.hook_mlp_out", detach)]
        with torch.enable_grad():
            value = metric(model.run_with_hooks(base, fwd_hooks=hooks))
            grads = torch.autograd.grad(value, [acts[n] for n in names], allow_unused=True)
        estimates = []
        for name, grad in zip(names, grads, strict=True):
            product = (source_cache[name] - acts[name].detach()) * (
                0 if grad is None else grad.detach()
            )
            product = product.sum(0)  # rows
            if sweep == "layer_pos":
                estimates.append(product.movedim(s.pos_dim, 0).flatten(1).sum(1))
            else:
                moved = product.movedim((s.pos_dim, s.head_dim), (0, 1))
                estimates.append(moved.flatten(2).sum(2))
        term = torch.stack(estimates).abs()
        total = term if total is None else total + term
    return total / (n_layers - 1)


@pytest.mark.substrate
@pytest.mark.parametrize("direction", ["restore", "inject"])
@pytest.mark.parametrize(
    ("site", "sweep", "layers"),
    [
        ("resid_pre", "layer_pos", None),
        ("mlp_out", "layer_pos", None),
        ("z", "layer_pos_head", None),
        ("z", "layer_pos_head", [1, 2]),  # the layers before 1 share a plain backward pass
    ],
)
def test_graddrop_equals_the_per_layer_stop_gradient_loop(tiny3, site, sweep, layers, direction):
    model, prompt, corrupted, metric = tiny3
    clean = prompt.tokens[None]
    base, source = (corrupted, clean) if direction == "restore" else (clean, corrupted)
    expected = _graddrop_loop(model, base, source, metric, site, sweep)
    if layers is not None:
        expected = expected[layers]
    # the loop has no QK fix; z and residual sites have none either
    star = attribution_patching(
        model, prompt, corrupted, metric, site=site, sweep=sweep, direction=direction,
        method="atp*", layers=layers,
    )  # fmt: skip
    torch.testing.assert_close(star.effect, expected.float(), atol=1e-6, rtol=1e-5)
    plain = attribution_patching(
        model, prompt, corrupted, metric, site=site, sweep=sweep, direction=direction,
        layers=layers,
    )  # fmt: skip
    assert not torch.allclose(star.effect, plain.effect.abs(), atol=1e-4)
    if site == "mlp_out":
        # the last layer's MLP output: only the term that drops it is zero, so its size is
        # exactly |AtP| * (L - 1) / (L - 1)
        torch.testing.assert_close(star.effect[-1], plain.effect[-1].abs(), atol=1e-6, rtol=1e-5)


# ---- the QK fix on saturated attention --------------------------------------------------------


@pytest.mark.substrate
def test_qk_fix_on_saturated_attention(planted):
    """The planted mover head attends from the last position to the subject's last token with
    probability ~1 (score ~25 against ~8 for <bos>). Injecting the key of a prompt whose subject
    is not known moves that attention to <bos> and destroys the answer; the softmax is flat
    there, so AtP sees almost nothing, while the QK fix recomputes the softmax."""
    model, facts = planted
    fact = kl.Fact(facts.subjects[0], "home", facts.objects[0], entity_template=facts.template)
    prompt = kl.tokenize(model, fact.entity_prompt())
    subject_last = prompt.span("subject").last
    unknown = kl.TokenReplacement("the city")  # two filler words: the lookup does not fire
    answer = kl.target_token_ids(model, prompt.prompt)[0]
    wrong = kl.target_token_ids(model, prompt.prompt, facts.objects[1])[0]
    metric = kl.LogitDiff(answer, wrong)
    _, cache = model.run_with_cache(prompt.tokens[None])
    pattern = cache[f"blocks.{facts.attn_layer}.attn.hook_pattern"][0, facts.head, -1]
    assert float(pattern[subject_last]) > 0.999  # saturated

    common = dict(site="k", sweep="layer_pos_head", direction="inject", layers=[facts.attn_layer])
    exact = kl.activation_patching(model, prompt, unknown, metric, progress=False, **common)
    plain = attribution_patching(model, prompt, unknown, metric, method="atp", **common)
    fixed = attribution_patching(model, prompt, unknown, metric, method="atp_qk", **common)
    star = attribution_patching(model, prompt, unknown, metric, method="atp*", **common)
    at = (0, subject_last, facts.head)
    big = float(exact.effect[at])
    assert big > 1.0  # the patch destroys the answer
    plain_error = abs(float(plain.effect[at]) - big)
    fixed_error = abs(float(fixed.effect[at]) - big)
    assert abs(float(plain.effect[at])) < 0.01 * big  # AtP's false negative
    assert fixed_error < plain_error  # the QK fix is closer to the exact effect
    assert float(fixed.effect[at]) != pytest.approx(float(plain.effect[at]), abs=1e-3)
    # and the key is the top component of the QK-fixed screens, as it is of the exact sweep
    assert int(exact.effect.abs().argmax()) == int(fixed.effect.abs().argmax())
    assert int(exact.effect.abs().argmax()) == int(star.effect.argmax())


# ---- screen then patch ------------------------------------------------------------------------


@pytest.mark.substrate
@pytest.mark.parametrize(
    ("site", "sweep", "top_k"),
    [("mlp_out", "layer_pos", 3), ("z", "layer_pos_head", 5), ("z", "layer_head", 4)],
)
def test_screen_then_patch_equals_the_full_exact_sweep_on_the_top_k(planted, site, sweep, top_k):
    model, facts = planted
    fact = kl.Fact(facts.subjects[0], "home", facts.objects[0], entity_template=facts.template)
    prompt = kl.tokenize(model, fact.entity_prompt())
    metric = kl.TargetProb(kl.target_token_ids(model, prompt.prompt)[0])
    swap = kl.TokenReplacement(facts.subjects[2])
    found = screen_then_patch(model, prompt, swap, metric, site=site, sweep=sweep, top_k=top_k)
    full = kl.activation_patching(model, prompt, swap, metric, site=site, sweep=sweep,
                                  progress=False)  # fmt: skip
    assert found.method is AttributionMethod.ATP_STAR
    assert len(found.components) == top_k
    sizes = [abs(float(e)) for e in found.estimated_effect]
    assert sizes == sorted(sizes, reverse=True)
    for component, value in zip(found.components, found.exact.tolist(), strict=True):
        index = [full.layers.index(component.layer)]
        if component.position is not None:
            index.append(full.positions.index(component.position))
        if component.head is not None:
            index.append(full.heads.index(component.head))
        assert value == pytest.approx(float(full.values[tuple(index)]), abs=1e-6)
    frame = found.to_dataframe()
    assert list(frame["rank"]) == list(range(top_k))
    assert {"layer", "pos", "token", "head", "estimated", "exact", "exact_effect"} <= set(frame)
    if site == "mlp_out":
        lookup = Component(facts.mlp_layer, prompt.span("subject").last, None)
        assert found.components[0] == lookup
    else:
        assert found.components[0].layer == facts.attn_layer
        assert found.components[0].head == facts.head


# ---- bad input and hygiene --------------------------------------------------------------------


@pytest.mark.substrate
def test_bad_input_names_the_argument_and_the_choices(tiny3):
    model, prompt, corrupted, metric = tiny3
    with pytest.raises(AttributionError, match=r"method must be one of 'atp', 'atp_qk', 'atp\*'"):
        attribution_patching(model, prompt, corrupted, metric, method="gradients")
    with pytest.raises(kl.SweepError, match="sweep must be one of 'layer_pos', 'layer_head'"):
        attribution_patching(model, prompt, corrupted, metric, sweep="pos")
    with pytest.raises(kl.SweepError, match="direction must be one of 'restore', 'inject'"):
        attribution_patching(model, prompt, corrupted, metric, direction="both")
    with pytest.raises(kl.SiteError, match="site 'mlp_out' has no head axis"):
        attribution_patching(model, prompt, corrupted, metric, site="mlp_out", sweep="layer_head")
    with pytest.raises(kl.SweepError, match="heads=\\[1\\] is given, but a layer_pos sweep"):
        attribution_patching(model, prompt, corrupted, metric, heads=[1])
    with pytest.raises(kl.SweepError, match="positions=\\[1\\] is given, but a layer_head"):
        attribution_patching(model, prompt, corrupted, metric, site="z", sweep="layer_head",
                             positions=[1])  # fmt: skip
    with pytest.raises(kl.SweepError, match=r"layers \[7\] outside 0..2"):
        attribution_patching(model, prompt, corrupted, metric, layers=[7])
    with pytest.raises(kl.SweepError, match="differ in length"):
        attribution_patching(model, prompt, "The capital of Germany is", metric)

    def top_token(logits):
        return logits[:, -1].argmax(-1).float().mean()

    with pytest.raises(AttributionError, match="'top_token' has no gradient"):
        attribution_patching(model, prompt, corrupted, top_token)
    with pytest.raises(kl.SweepError, match="top_k must be between 1 and the 24 components"):
        screen_then_patch(model, prompt, corrupted, metric, top_k=25)
    one_layer = as_substrate(_gpt2(n_layer=1, seed=0, init=0.02), word_tokenizer(), "kloc-one")
    with pytest.raises(AttributionError, match="at least 2 layers"):
        attribution_patching(one_layer, prompt, corrupted, metric, method="atp*")


@pytest.mark.substrate
def test_no_hook_outlives_a_call_also_when_it_raises(tiny3):
    model, prompt, corrupted, metric = tiny3

    def attached():
        return sum(len(point._forward_hooks) for point in model.hook_dict.values())

    before = attached()
    attribution_patching(model, prompt, corrupted, metric, site="k", method="atp*")
    assert attached() == before

    def failing(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patching(model, prompt, corrupted, failing, site="z", method="atp*")
    assert attached() == before
    assert all(p.grad is None for p in model.parameters())  # no gradients left in the model

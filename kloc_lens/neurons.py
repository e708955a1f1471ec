"""Knowledge neurons (Dai et al. 2022): integrated gradients over MLP neurons, and hooks that
suppress or amplify the neurons they select.

Dai, Dong, Hao, Sui, Chang, Wei (2022, "Knowledge Neurons in Pretrained Transformers") attribute
the probability of a fact's answer to the MLP neurons of a layer by **integrated gradients**: for
the activations ``a`` of ``blocks.{layer}.mlp.hook_post`` at the prediction position (the last
token), neuron ``i`` gets::

    attribution_i = a_i * integral_0^1 dp(target | a_i <- alpha * a_i) / d(alpha a_i) d alpha

where the whole layer's activations at that position are scaled together from the zero baseline
(``alpha = 0``) to their value (``alpha = 1``) and every later computation is redone. The integral
is a Riemann sum of ``steps`` points; kloc_lens takes the midpoints ``alpha = (k - 1/2) / steps``
(Dai et al. take the right ends ``k / steps``: the same cost, an error of order ``1/steps`` instead
of ``1/steps**2``). Every step of every layer of one prompt is one row of a single batched
forward pass, and one backward pass gives all their gradients. Integrated gradients are
*complete*: the attributions of one layer's neurons sum to
``p(target | a) - p(target | zero activations of that layer)``, up to the Riemann error; the zero
baseline's probability is computed alongside (one more row per layer) so the identity can be
checked (:attr:`NeuronAttribution.completeness_gap`).

**Selection** (:meth:`NeuronAttribution.select`). For each prompt, the neurons whose attribution is
at least ``threshold`` times the largest attribution of that prompt (Dai et al.: 0.2); across the
prompts of a fact (paraphrases), those kept for more than a fraction ``share`` of the prompts.

**Validation** (Dai et al.): suppressing the selected neurons (activation set to 0 at the
prediction position) lowers p(answer), amplifying them (doubled) raises it, far more than for as
many random neurons of the same layers (:meth:`KnowledgeNeurons.random_control`). Suppression and
amplification are hooks applied for the duration of a ``with`` block, like edits
(:meth:`KnowledgeNeurons.applied`); they never outlive it, also when it raises.

Example (the planted model, whose lookup neuron ``i`` of layer 1 fires on the last token of
subject ``i``, the second-to-last position of its prompt):
    >>> from kloc_lens.planted import planted_model
    >>> model, planted = planted_model()
    >>> attribution = knowledge_neurons(model, planted.prompt(0), planted.objects[0], position=-2)
    >>> attribution.scores.shape == (1, model.cfg.n_layers, model.cfg.d_mlp)
    True
    >>> neurons = attribution.select(threshold=0.2)
    >>> neurons.neurons
    ((1, 0),)
    >>> answer = model.to_single_token(planted.objects[0])
    >>> with neurons.suppressed(model):
    ...     suppressed = model(planted.prompt(0))[0, -1].softmax(-1)[answer].detach()
    >>> float(attribution.probs[0]) > 0.99, float(suppressed) < 0.1
    (True, True)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from kloc_lens._hooks import keep_activation
from kloc_lens.engine.adapter import BlockDriver, capture_block_inputs
from kloc_lens.errors import KlocLensError, SpanError
from kloc_lens.facts import (
    Fact,
    Prompt,
    TokenizedPrompt,
    target_token_ids,
    tokenize,
    tokenize_batch,
)
from kloc_lens.model import check_model, device_of, model_identity
from kloc_lens.trace import PromptLike, _check_indices
from kloc_lens.types import Indices

__all__ = [
    "KnowledgeNeurons",
    "NeuronAttribution",
    "NeuronError",
    "knowledge_neurons",
    "neuron_hooks",
    "scaled_neurons",
]

NEURON_HOOK = "blocks.{layer}.mlp.hook_post"
"""The hook whose activations are attributed, suppressed and amplified (MLP neurons after the
activation function)."""

FORMAT = "kloc_lens.neurons/1"


class NeuronError(KlocLensError):
    """A knowledge-neuron request that cannot be computed or applied: bad steps or thresholds,
    neurons outside the model, neurons found on another model, ..."""


NeuronScores = Float[Tensor, "prompt layer neuron"]
"""Integrated-gradient attributions, one per prompt, layer and neuron."""


@dataclass(frozen=True, eq=False)
class NeuronAttribution:
    """Integrated-gradient attributions of p(target) to MLP neurons at the prediction position.

    Attributes:
        scores: The attribution of each neuron, per prompt and layer.
        layers: Layer index of each entry along the ``layer`` axis.
        prompts: The prompt texts.
        target: The target string (or the token's text when given as an id).
        target_ids: The target token id scored on each prompt (its first token).
        steps: Riemann steps of the integral.
        probs: p(target) on each prompt.
        baseline_probs: p(target) on each prompt with one layer's neurons set to zero at the
            prediction position (the integral's baseline), per layer.
        model: :func:`~kloc_lens.model.model_identity` of the model.
        position: The token position attributed in every prompt (``-1``: the last, the
            prediction position of Dai et al.).
    """

    scores: NeuronScores
    layers: tuple[int, ...]
    prompts: tuple[str, ...]
    target: str
    target_ids: tuple[int, ...]
    steps: int
    probs: Float[Tensor, " prompt"]
    baseline_probs: Float[Tensor, "prompt layer"]
    model: str
    position: int = -1

    @property
    def mean(self) -> Float[Tensor, "layer neuron"]:
        """The attribution of each neuron averaged over the prompts."""
        return self.scores.mean(0)

    @property
    def completeness_gap(self) -> Float[Tensor, "prompt layer"]:
        """``sum of a layer's attributions - (p - p_baseline)``: zero up to the Riemann error."""
        return self.scores.sum(-1) - (self.probs[:, None] - self.baseline_probs)

    def prompt_neurons(self, threshold: float = 0.2) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per prompt, the ``(layer, neuron)`` pairs of the first step of :meth:`select`: those
        whose attribution is at least ``threshold`` times that prompt's largest (none when the
        largest is not positive). Query localization compares these sets across prompts.

        Raises:
            NeuronError: ``threshold`` outside ``(0, 1]``.
        """
        kept = self._kept(threshold)
        out = []
        for row in kept:
            where = row.reshape(self.scores.shape[1:]).nonzero().tolist()
            out.append(tuple((self.layers[layer], int(neuron)) for layer, neuron in where))
        return tuple(out)

    def _kept(self, threshold: float) -> Tensor:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise NeuronError(f"threshold must be a number in (0, 1], got {threshold!r}")
        if not 0.0 < threshold <= 1.0:
            raise NeuronError(f"threshold must be in (0, 1], got {threshold}")
        flat = self.scores.flatten(1)
        top = flat.max(dim=1, keepdim=True).values
        return (flat >= threshold * top) & (top > 0)

    def select(self, threshold: float = 0.2, share: float = 0.5) -> KnowledgeNeurons:
        """Dai et al.'s selection rule.

        Args:
            threshold: Per prompt, keep the neurons whose attribution is at least ``threshold``
                times that prompt's largest attribution (over every layer attributed).
            share: Keep the neurons kept for more than this fraction of the prompts.

        Returns:
            The selected neurons (possibly none).

        Raises:
            NeuronError: ``threshold`` outside ``(0, 1]`` or ``share`` outside ``[0, 1)``.
        """
        kept = self._kept(threshold)
        if isinstance(share, bool) or not isinstance(share, (int, float)):
            raise NeuronError(f"share must be a number in [0, 1), got {share!r}")
        if not 0.0 <= share < 1.0:
            raise NeuronError(f"share must be in [0, 1), got {share}")
        fraction = kept.float().mean(0).reshape(self.scores.shape[1:])
        where = (fraction > share).nonzero().tolist()
        neurons = tuple((self.layers[row], int(neuron)) for row, neuron in where)
        return KnowledgeNeurons(
            neurons=neurons,
            model=self.model,
            target=self.target,
            threshold=threshold,
            share=share,
            n_prompts=len(self.prompts),
            position=self.position,
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (prompt, layer, neuron): ``prompt``, ``layer``, ``neuron``, ``score``."""
        n_prompts, n_layers, n_neurons = self.scores.shape
        index = torch.cartesian_prod(
            torch.arange(n_prompts), torch.arange(n_layers), torch.arange(n_neurons)
        )
        return pd.DataFrame(
            {
                "prompt": [self.prompts[i] for i in index[:, 0].tolist()],
                "layer": [self.layers[i] for i in index[:, 1].tolist()],
                "neuron": index[:, 2].tolist(),
                "score": self.scores.detach().cpu().flatten().tolist(),
            }
        )

    def save(self, path: str | Path) -> Path:
        """Write to one ``.safetensors`` file (read back with :meth:`load`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = {
            "layers": list(self.layers),
            "prompts": list(self.prompts),
            "target": self.target,
            "target_ids": list(self.target_ids),
            "steps": self.steps,
            "model": self.model,
            "position": self.position,
        }
        tensors = {
            "scores": self.scores.detach().cpu().contiguous(),
            "probs": self.probs.detach().cpu().contiguous(),
            "baseline_probs": self.baseline_probs.detach().cpu().contiguous(),
        }
        meta = {"class": "NeuronAttribution", "format": FORMAT, "labels": json.dumps(labels)}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> NeuronAttribution:
        """Read a file written by :meth:`save`.

        Raises:
            NeuronError: The file is missing or holds no neuron attribution.
        """
        path = Path(path)
        if not path.is_file():
            raise NeuronError(f"no neuron attribution file at {str(path)!r}")
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("class") != "NeuronAttribution" or meta.get("format") != FORMAT:
            raise NeuronError(f"{str(path)!r} holds no {FORMAT} neuron attribution")
        labels = json.loads(meta["labels"])
        tensors = load_file(str(path))
        return cls(
            scores=tensors["scores"],
            layers=tuple(labels["layers"]),
            prompts=tuple(labels["prompts"]),
            target=labels["target"],
            target_ids=tuple(labels["target_ids"]),
            steps=int(labels["steps"]),
            probs=tensors["probs"],
            baseline_probs=tensors["baseline_probs"],
            model=labels["model"],
            position=int(labels["position"]),
        )


@dataclass(frozen=True)
class KnowledgeNeurons:
    """Selected MLP neurons, and hooks that scale them.

    Attributes:
        neurons: ``(layer, neuron)`` pairs, sorted.
        model: :func:`~kloc_lens.model.model_identity` of the model they were found on.
        target: The target they were attributed for.
        threshold: The selection's attribution threshold (relative to the maximum).
        share: The selection's prompt share.
        n_prompts: How many prompts the selection pooled.
        position: The token position they were found at (``-1``: the last); the hooks scale
            them there.
    """

    neurons: tuple[tuple[int, int], ...]
    model: str
    target: str = ""
    threshold: float = 0.0
    share: float = 0.0
    n_prompts: int = 0
    position: int = -1

    def __len__(self) -> int:
        return len(self.neurons)

    def by_layer(self) -> dict[int, tuple[int, ...]]:
        """``layer -> neurons`` of that layer."""
        grouped: dict[int, list[int]] = {}
        for layer, neuron in self.neurons:
            grouped.setdefault(layer, []).append(neuron)
        return {layer: tuple(sorted(found)) for layer, found in sorted(grouped.items())}

    def applied(
        self,
        model: Any,
        scale: float = 0.0,
        *,
        everywhere: bool = False,
        positions: Tensor | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Multiply the neurons' activations by ``scale`` inside a ``with`` block, at
        ``position``, at each row's own ``positions``, or at every position; see
        :func:`scaled_neurons`."""
        return scaled_neurons(model, self, scale, everywhere=everywhere, positions=positions)

    def suppressed(
        self, model: Any, *, everywhere: bool = False, positions: Tensor | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Set the neurons' activations to zero inside a ``with`` block."""
        return self.applied(model, 0.0, everywhere=everywhere, positions=positions)

    def amplified(
        self, model: Any, factor: float = 2.0, *, everywhere: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """Multiply the neurons' activations by ``factor`` (Dai et al.: 2) inside a ``with``
        block."""
        return self.applied(model, factor, everywhere=everywhere)

    def random_control(self, model: Any, seed: int) -> KnowledgeNeurons:
        """As many random neurons of each layer as this selection holds there, none of them
        selected (the control of Dai et al.'s suppression experiment).

        Raises:
            NeuronError: A layer has too few other neurons.
        """
        d_mlp = int(model.cfg.d_mlp)
        generator = torch.Generator().manual_seed(seed)
        chosen: list[tuple[int, int]] = []
        for layer, selected in self.by_layer().items():
            others = torch.tensor([n for n in range(d_mlp) if n not in set(selected)])
            if len(others) < len(selected):
                raise NeuronError(f"layer {layer} has too few unselected neurons for a control")
            pick = others[torch.randperm(len(others), generator=generator)[: len(selected)]]
            chosen += [(layer, int(n)) for n in pick]
        return KnowledgeNeurons(
            neurons=tuple(sorted(chosen)),
            model=self.model,
            target=self.target,
            threshold=self.threshold,
            share=self.share,
            n_prompts=self.n_prompts,
            position=self.position,
        )


def neuron_hooks(
    model: Any,
    neurons: KnowledgeNeurons,
    scale: float,
    *,
    everywhere: bool = False,
    positions: Tensor | None = None,
) -> list[tuple[str, Any]]:
    """The forward hooks that multiply ``neurons``' activations by ``scale``.

    Args:
        model: The hooked model.
        neurons: The neurons (found on this model).
        scale: ``0`` suppresses, ``2`` doubles.
        everywhere: Scale them at every position, not only at ``neurons.position`` (the
            position they were found at, the same index in every row).
        positions: One position per row of the batch (a right-padded batch's last real
            tokens, ``PromptBatch.last``) instead of ``neurons.position``.

    Raises:
        NeuronError: Neurons found on another model, or outside its layers or MLP width.
    """
    identity = model_identity(model)
    if neurons.model != identity:
        raise NeuronError(f"the neurons were found on model {neurons.model!r}, not {identity!r}")
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    for layer, neuron in neurons.neurons:
        if not (0 <= layer < n_layers and 0 <= neuron < d_mlp):
            raise NeuronError(
                f"neuron ({layer}, {neuron}) is outside the model's {n_layers} layers x "
                f"{d_mlp} neurons"
            )
    position = neurons.position
    hooks: list[tuple[str, Any]] = []
    for layer, indices in neurons.by_layer().items():
        index = torch.tensor(indices, dtype=torch.long)

        def scale_hook(activation: Tensor, hook: Any, index: Tensor = index) -> Tensor:
            where = index.to(activation.device)
            out = activation.clone()
            if everywhere:
                out[..., where] = activation[..., where] * scale
            elif positions is not None:
                rows = torch.arange(activation.shape[0], device=activation.device)[:, None]
                at = positions.to(activation.device)[:, None]
                out[rows, at, where[None, :]] = activation[rows, at, where[None, :]] * scale
            else:
                out[:, position, where] = activation[:, position, where] * scale
            return out

        hooks.append((NEURON_HOOK.format(layer=layer), scale_hook))
    return hooks


@contextlib.contextmanager
def scaled_neurons(
    model: Any,
    neurons: KnowledgeNeurons,
    scale: float,
    *,
    everywhere: bool = False,
    positions: Tensor | None = None,
) -> Iterator[None]:
    """Multiply neurons' activations by ``scale`` inside a ``with`` block; the hooks are removed
    when it ends, also on an exception.

    Raises:
        NeuronError: Neurons found on another model, or outside it.
    """
    hooks = neuron_hooks(model, neurons, scale, everywhere=everywhere, positions=positions)
    with model.hooks(fwd_hooks=hooks):
        yield


def _as_prompts(prompts: PromptLike | Sequence[PromptLike]) -> list[PromptLike]:
    if isinstance(prompts, (str, Prompt, TokenizedPrompt, Fact)):
        return [prompts]
    items = list(prompts)
    if not items:
        raise NeuronError("knowledge_neurons needs at least one prompt")
    return items


def _tokenized(model: Any, prompt: PromptLike) -> TokenizedPrompt:
    if isinstance(prompt, TokenizedPrompt):
        return prompt
    if isinstance(prompt, Fact):
        return tokenize(model, prompt.entity_prompt())
    return tokenize(model, prompt)


def _target_id(model: Any, prompt: TokenizedPrompt, target: str | int) -> int:
    if isinstance(target, int):
        if not 0 <= target < int(model.cfg.d_vocab):
            raise NeuronError(f"target token id {target} outside the vocabulary")
        return target
    if not target.strip():
        raise SpanError(f"empty target for prompt {prompt.text!r}")
    return target_token_ids(model, prompt.prompt, target)[0]


def knowledge_neurons(
    model: Any,
    prompts: PromptLike | Sequence[PromptLike],
    target: str | int,
    *,
    layers: Indices | None = None,
    steps: int = 20,
    position: int = -1,
) -> NeuronAttribution:
    """Integrated gradients of p(target) over the MLP neurons of each layer (Dai et al. 2022).

    Args:
        model: A hooked model in eval mode.
        prompts: One prompt or several (paraphrases of one fact): strings, :class:`Prompt`,
            :class:`TokenizedPrompt`, or :class:`Fact` (its entity prompt).
        target: The answer: a string (scored by its first token as a continuation of each
            prompt) or a token id.
        layers: The layers whose neurons are attributed (default all).
        steps: Riemann steps of the integral from the zero baseline (Dai et al.: 20).
        position: The token position attributed in every prompt; ``-1`` (the last: the
            prediction position, as Dai et al.) counts from the end.

    Returns:
        The attributions ``[prompt, layer, neuron]`` with p(target) and each layer's baseline
        probability.

    Raises:
        NeuronError: ``steps`` < 1, no prompts, a position outside a prompt, or a target id
            outside the vocabulary.
        SweepError: Layers out of range.
        SpanError: An empty target.
        ModelError: The model is in train mode or lacks ``mlp.hook_post``.

    Example:
        >>> from kloc_lens.planted import planted_model
        >>> model, planted = planted_model()
        >>> found = knowledge_neurons(model, [planted.prompt(1), planted.prompt(1)],
        ...     planted.objects[1], layers=[1, 3], position=-2)
        >>> found.layers, tuple(found.scores.shape)
        ((1, 3), (2, 2, 512))
        >>> float(found.probs[0] - found.baseline_probs[0, 0]) > 0.9  # the lookup matters
        True
        >>> int(found.scores[0, 0].argmax())  # layer 1's neuron 1 fires on subject 1
        1
    """
    if steps < 1:
        raise NeuronError(f"steps must be >= 1, got {steps}")
    items = [_tokenized(model, p) for p in _as_prompts(prompts)]
    layer_ids = _check_indices(layers, int(model.cfg.n_layers), "layers")
    hooks = [NEURON_HOOK.format(layer=layer) for layer in layer_ids]
    check_model(model, hooks)
    target_ids = tuple(_target_id(model, item, target) for item in items)
    target_text = target if isinstance(target, str) else model.tokenizer.decode([target])

    places = []
    for item in items:
        at = position + len(item) if position < 0 else position
        if not 0 <= at < len(item):
            raise NeuronError(f"position {position} is outside prompt {item.text!r}")
        places.append(at)
    # Prompts of one length share batched passes of at most _ROWS rows (one prompt's rows at
    # least): without padding, each layer's rows can start at that layer (see _integrate).
    per_prompt = len(hooks) * (steps + 1)
    group = max(1, _ROWS // per_prompt)
    chunks: list[list[int]] = []
    for index in sorted(range(len(items)), key=lambda i: len(items[i])):
        last = chunks[-1] if chunks else None
        if last and len(last) < group and len(items[last[0]]) == len(items[index]):
            last.append(index)
        else:
            chunks.append([index])
    found: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    for chunk in chunks:
        score, prob, baseline = _integrate(
            model,
            [items[i] for i in chunk],
            [places[i] for i in chunk],
            [target_ids[i] for i in chunk],
            hooks,
            layer_ids,
            steps,
        )
        for row, index in enumerate(chunk):
            found[index] = (score[row], prob[row], baseline[row])
    ordered = [found[i] for i in range(len(items))]
    return NeuronAttribution(
        scores=torch.stack([score for score, _, _ in ordered]),
        layers=layer_ids,
        prompts=tuple(item.text for item in items),
        target=target_text,
        target_ids=target_ids,
        steps=steps,
        probs=torch.stack([prob for _, prob, _ in ordered]),
        baseline_probs=torch.stack([baseline for _, _, baseline in ordered]),
        model=model_identity(model),
        position=position,
    )


_ROWS = 256
"""Rows of one batched integrated-gradients pass (whole prompts are never split)."""


def _integrate(
    model: Any,
    items: Sequence[TokenizedPrompt],
    places: Sequence[int],
    target_ids: Sequence[int],
    hooks: list[str],
    layer_ids: Sequence[int],
    steps: int,
) -> tuple[NeuronScores, Float[Tensor, " prompt"], Float[Tensor, "prompt layer"]]:
    """Attributions of every hooked layer for a few prompts, their p(target) and each layer's
    baseline p.

    One batch holds, for each prompt and layer, ``steps`` midpoint rows and the zero baseline's
    row; in the rows of (prompt, layer) that layer's activations at the prompt's attributed
    position are ``alpha`` times their clean value, a leaf whose gradient the one backward pass
    returns. Below that layer those rows equal the clean run, so where the engine drives the
    model's blocks (prompts of one length) each layer's rows join the batch at their own layer,
    from the clean residual stream: the blocks below are neither run nor differentiated for them
    (about half the work of running every row through every block). Elsewhere every row runs the
    whole model."""
    device = device_of(model)
    batch = tokenize_batch(model, list(items))
    tokens = batch.tokens.to(device)
    n_prompts, n_layers = len(items), len(hooks)
    read = batch.last.to(device)  # p(target) is read at each prompt's prediction position
    at = torch.tensor(list(places), device=device)
    target = torch.tensor(list(target_ids), device=device)
    prompt_rows = torch.arange(n_prompts, device=device)
    clean: dict[str, Tensor] = {}
    resid: dict[int, Tensor] = {}
    if len({len(item) for item in items}) != 1:
        raise NeuronError("one batch of integrated gradients takes prompts of one length")
    ascending = list(layer_ids) == sorted(set(layer_ids))
    driver = BlockDriver.for_model(model)[0] if ascending else None
    keep = [(h, partial(_keep_at, clean, h, prompt_rows, at)) for h in hooks]
    if driver is not None:
        keep += [
            (f"blocks.{layer}.hook_resid_pre", partial(keep_activation, resid, layer))
            for layer in layer_ids
        ]
    with torch.no_grad(), capture_block_inputs(model) as block_inputs:
        logits = model.run_with_hooks(tokens, fwd_hooks=keep)
    if driver is not None and driver.prepare(block_inputs) is not None:
        driver = None
    dtype = torch.promote_types(logits.dtype, torch.float32)
    probs = torch.softmax(logits[prompt_rows, read].to(dtype), -1)[prompt_rows, target]

    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    alphas = torch.cat([alphas, torch.zeros(1, dtype=torch.float64)])  # last row: the baseline
    per_layer = steps + 1
    # row (l, p, k) = l * n_prompts * per_layer + p * per_layer + k: a layer's rows together
    rows = torch.arange(n_layers * n_prompts * per_layer, device=device)
    row_layer = rows // (n_prompts * per_layer)
    row_prompt = (rows // per_layer) % n_prompts
    leaves: dict[str, Tensor] = {}
    scaled = [
        (
            h,
            partial(
                _scaled,
                leaves,
                h,
                clean[h],
                alphas,
                rows[row_layer == g],
                at[row_prompt[row_layer == g]],
            ),
        )
        for g, h in enumerate(hooks)
    ]
    with torch.enable_grad():
        if driver is None:
            logits = model.run_with_hooks(tokens[row_prompt], fwd_hooks=scaled)
        else:
            logits = _from_each_layer(
                model, driver, resid, layer_ids, row_prompt, row_layer, scaled
            )
        last = logits[rows, read[row_prompt]].to(dtype)
        p = torch.softmax(last, -1)[rows, target[row_prompt]]
        grads = torch.autograd.grad(p.sum(), [leaves[h] for h in hooks])
    p = p.detach().reshape(n_layers, n_prompts, per_layer).transpose(0, 1)
    score = torch.stack(
        [clean[h] * g[:, :steps].mean(1) for h, g in zip(hooks, grads, strict=True)], dim=1
    )  # [prompt, layer, neuron]
    return score.detach().to(dtype), probs.detach(), p[:, :, -1]


def _keep_at(
    store: dict[str, Tensor], name: str, rows: Tensor, at: Tensor, activation: Tensor, hook: Any
) -> None:
    store[name] = activation[rows, at].detach()  # [prompt, neuron]


def _scaled(
    leaves: dict[str, Tensor],
    name: str,
    clean: Tensor,
    alphas: Tensor,
    mine: Tensor,
    at: Tensor,
    activation: Tensor,
    hook: Any,
) -> Tensor:
    """Put ``alpha * clean`` (a new leaf ``[prompt, step, neuron]``) at each of ``mine``'s rows'
    positions; ``mine`` and ``at`` index the rows of the activation the hook sees."""
    alpha = alphas.to(device=activation.device, dtype=activation.dtype)
    leaf = (alpha[None, :, None] * clean[:, None, :]).detach().requires_grad_(True)
    leaves[name] = leaf
    out = activation.clone()
    out[mine, at] = leaf.reshape(-1, leaf.shape[-1])
    return out


def _from_each_layer(
    model: Any,
    driver: BlockDriver,
    resid: dict[int, Tensor],
    layer_ids: Sequence[int],
    row_prompt: Tensor,
    row_layer: Tensor,
    scaled: list[tuple[str, Any]],
) -> Tensor:
    """Logits of every row, each layer's rows joining the batch at their layer from the clean
    residual stream (the rows are ordered by layer, so the batch grows at its end)."""
    rows = {layer: resid[layer][row_prompt[row_layer == g]] for g, layer in enumerate(layer_ids)}
    with model.hooks(fwd_hooks=scaled):
        return driver.run_from(layer_ids[0], rows[layer_ids[0]], joining=rows)

"""r-ROME's question on factworld: ROME edits with the shared key (k* for the fit and the update,
the default) against ROME's published form (update normalised by the bare prompt's key k0).

Prints, per key form and fit, the entity efficacy (the edited prompt answers the new object),
the update ratio |dW|/|W| and the factor (u . k*) / (u . k0) the committed edit applies to the
fitted change at k*. Usage: ``python scripts/measure_key_form.py [N_FACTS]`` (default 32).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import replace

import torch

from kloc_lens.edit import ContextSpec, EditRequest
from kloc_lens.edit.guard import update_ratio
from kloc_lens.factworld import EDIT_CONTEXTS, NONE_ANSWER, load_factworld, rome_editor


def main(n_facts: int) -> None:
    torch.set_num_threads(1)
    model, world = load_factworld()
    facts = random.Random(0).sample([f for f in world.facts if f.new_object], n_facts)
    requests = [EditRequest(fact, none_target=NONE_ANSWER) for fact in facts]
    base = replace(rome_editor(model, world), contexts=ContextSpec(count=EDIT_CONTEXTS))
    print(f"factworld, layer {base.layer}, {n_facts} facts, {EDIT_CONTEXTS} contexts per length")
    for form, exact in (("shared", True), ("shared", False), ("reference", False)):
        start = time.perf_counter()
        edits = replace(base, key_form=form, exact_fit=exact).compute_each(model, requests)
        hits, ratios, factors = 0, [], []
        for request, edit in zip(requests, edits, strict=True):
            with edit.applied(model), torch.no_grad():
                top = model(request.fact.entity_prompt().text)[0, -1].argmax()
            hits += model.to_string(top).strip() == request.target.strip()
            ratios.append(update_ratio(model, edit))
            anchor = edit.key if edit.anchor is None else edit.anchor
            factors.append(float((edit.direction @ edit.key) / (edit.direction @ anchor)))
        r, f = torch.tensor(ratios), torch.tensor(factors)
        print(
            f"{form:9s} exact_fit={exact!s:5s}  efficacy {hits}/{n_facts}  "
            f"|dW|/|W| median {r.median():.2f} max {r.max():.2f}  "
            f"(u.k*)/(u.k0) {f.min():.2f}..{f.max():.2f}  {time.perf_counter() - start:.0f} s"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32)

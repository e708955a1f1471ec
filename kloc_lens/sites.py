"""Sites: the hook points a sweep can patch, and how to add your own.

A :class:`Site` names a family of hook points (one per layer, or a single one) and says which
axes of its activation are the token position and the attention head. Every sweep in
:mod:`kloc_lens.trace` takes a site by name or object, so a hook point you add to a model is swept,
stored and plotted exactly like a built-in one.

Built-in sites (TransformerLens hook names):

==============  =====================================  ==================
name            hook                                   axes after batch
==============  =====================================  ==================
``resid_pre``   ``blocks.{layer}.hook_resid_pre``      pos, d_model
``resid_mid``   ``blocks.{layer}.hook_resid_mid``      pos, d_model
``resid_post``  ``blocks.{layer}.hook_resid_post``     pos, d_model
``attn_out``    ``blocks.{layer}.hook_attn_out``       pos, d_model
``mlp_out``     ``blocks.{layer}.hook_mlp_out``        pos, d_model
``z``           ``blocks.{layer}.attn.hook_z``         pos, head, d_head
``q``/``k``/``v`` ``blocks.{layer}.attn.hook_q`` ...   pos, head, d_head
``pattern``     ``blocks.{layer}.attn.hook_pattern``   head, query pos, key pos
``mlp_post``    ``blocks.{layer}.mlp.hook_post``       pos, d_mlp (neurons)
``mlp_pre``     ``blocks.{layer}.mlp.hook_pre``        pos, d_mlp
``embed``       ``hook_embed``                         pos, d_model
==============  =====================================  ==================

A custom hook point is a TransformerLens ``HookPoint`` that some module of the model calls. You
can add one by wrapping a module yourself (then re-index the model's hooks with
:func:`refresh_hook_registry`), or let :func:`add_hook_point` put one on the output of an existing
submodule of every layer; then :func:`register_site` names it for sweeps.

Example:
    >>> site = register_site("resid_scaled", "blocks.{layer}.hook_resid_scaled", overwrite=True)
    >>> site.hook_name(2)
    'blocks.2.hook_resid_scaled'
    >>> get_site("mlp_out").hook_name(0)
    'blocks.0.hook_mlp_out'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kloc_lens.errors import ModelError, SiteError

__all__ = [
    "Site",
    "add_hook_point",
    "get_site",
    "list_sites",
    "refresh_hook_registry",
    "register_site",
    "unregister_site",
]


@dataclass(frozen=True)
class Site:
    """A patchable family of hook points.

    Attributes:
        name: Short name used in results and figures.
        hook: Hook name, with ``{layer}`` where the layer index goes when ``per_layer``.
        pos_dim: Index of the token-position axis in the activation, counting after the batch
            axis (``0`` for ``[batch, pos, ...]``). For attention patterns it is the query axis.
        head_dim: Index of the head axis after the batch axis, or ``None`` for sites without
            heads.
        per_layer: Whether there is one hook point per layer (``blocks.{layer}...``) or one.
        description: One line for reports.
    """

    name: str
    hook: str
    pos_dim: int = 0
    head_dim: int | None = None
    per_layer: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.per_layer and "{layer}" not in self.hook:
            raise SiteError(
                f"site {self.name!r}: per-layer hook {self.hook!r} needs a '{{layer}}' field"
            )
        if not self.per_layer and "{layer}" in self.hook:
            raise SiteError(
                f"site {self.name!r}: single hook {self.hook!r} has a '{{layer}}' field"
            )
        if self.head_dim is not None and self.head_dim == self.pos_dim:
            raise SiteError(f"site {self.name!r}: pos_dim and head_dim are both {self.pos_dim}")

    @property
    def has_heads(self) -> bool:
        """Whether the activation has a head axis."""
        return self.head_dim is not None

    def hook_name(self, layer: int) -> str:
        """The hook name at ``layer`` (ignored for single hook points)."""
        return self.hook.format(layer=layer) if self.per_layer else self.hook

    def n_layers(self, model: Any) -> int:
        """How many layers this site has on ``model``."""
        return int(model.cfg.n_layers) if self.per_layer else 1


def _builtin() -> dict[str, Site]:
    sites = [
        Site("resid_pre", "blocks.{layer}.hook_resid_pre", description="residual before block"),
        Site("resid_mid", "blocks.{layer}.hook_resid_mid", description="residual after attention"),
        Site("resid_post", "blocks.{layer}.hook_resid_post", description="residual after block"),
        Site("attn_out", "blocks.{layer}.hook_attn_out", description="attention output"),
        Site("mlp_out", "blocks.{layer}.hook_mlp_out", description="MLP output"),
        Site("z", "blocks.{layer}.attn.hook_z", head_dim=1, description="head outputs before W_O"),
        Site("q", "blocks.{layer}.attn.hook_q", head_dim=1, description="head queries"),
        Site("k", "blocks.{layer}.attn.hook_k", head_dim=1, description="head keys"),
        Site("v", "blocks.{layer}.attn.hook_v", head_dim=1, description="head values"),
        Site(
            "pattern",
            "blocks.{layer}.attn.hook_pattern",
            pos_dim=1,
            head_dim=0,
            description="attention pattern rows (per query position)",
        ),
        Site("mlp_post", "blocks.{layer}.mlp.hook_post", description="MLP neurons after act_fn"),
        Site("mlp_pre", "blocks.{layer}.mlp.hook_pre", description="MLP neurons before act_fn"),
        Site("embed", "hook_embed", per_layer=False, description="token embeddings"),
    ]
    return {site.name: site for site in sites}


_BUILTIN: dict[str, Site] = _builtin()
_REGISTRY: dict[str, Site] = dict(_BUILTIN)


def register_site(
    name: str,
    hook: str,
    *,
    pos_dim: int = 0,
    head_dim: int | None = None,
    per_layer: bool | None = None,
    description: str = "",
    overwrite: bool = False,
) -> Site:
    """Make a hook point of your own sweepable by name.

    Args:
        name: The site's name.
        hook: Its hook name, with ``{layer}`` for per-layer hook points.
        pos_dim: Index of the position axis after the batch axis.
        head_dim: Index of the head axis after the batch axis, if any.
        per_layer: Defaults to whether ``hook`` contains ``{layer}``.
        description: One line for reports.
        overwrite: Replace an existing custom site of the same name.

    Returns:
        The registered :class:`Site` (sweeps also accept it directly, registered or not).

    Raises:
        SiteError: ``name`` is a built-in site, or already registered and ``overwrite`` is false.
    """
    if name in _BUILTIN:
        raise SiteError(f"site name {name!r} is built in; choose another name")
    if name in _REGISTRY and not overwrite:
        raise SiteError(f"site {name!r} is already registered; pass overwrite=True to replace it")
    site = Site(
        name,
        hook,
        pos_dim=pos_dim,
        head_dim=head_dim,
        per_layer=("{layer}" in hook) if per_layer is None else per_layer,
        description=description,
    )
    _REGISTRY[name] = site
    return site


def unregister_site(name: str) -> None:
    """Remove a custom site (built-in sites stay)."""
    if name in _BUILTIN:
        raise SiteError(f"site {name!r} is built in and cannot be removed")
    if name not in _REGISTRY:
        raise SiteError(f"no custom site named {name!r}")
    del _REGISTRY[name]


def get_site(site: str | Site) -> Site:
    """Look a site up by name (a :class:`Site` passes through).

    Raises:
        SiteError: No site has that name; the message lists the known ones.
    """
    if isinstance(site, Site):
        return site
    try:
        return _REGISTRY[site]
    except KeyError:
        raise SiteError(
            f"unknown site {site!r}; known sites: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_sites() -> list[str]:
    """Names of all sites, built-in and registered."""
    return sorted(_REGISTRY)


def refresh_hook_registry(model: Any) -> None:
    """Re-index a model's hook points after adding a ``HookPoint`` module to it.

    A TransformerLens 4 bridge rescans its modules; a ``HookedTransformer`` re-runs ``setup()``.
    """
    if hasattr(model, "_scan_existing_hooks"):
        model._scan_existing_hooks(model, "")
    elif hasattr(model, "setup"):
        model.setup()
    else:
        raise ModelError(f"{type(model).__name__} has no hook registry to refresh")


def add_hook_point(model: Any, module: str, attr: str = "hook_tap") -> str:
    """Add a ``HookPoint`` that sees (and may replace) the output of a submodule.

    The hook point becomes the attribute ``attr`` of the submodule, so its name is
    ``f"{module}.{attr}"``; a ``{layer}`` field in ``module`` adds one per layer. The submodule's
    output must be a tensor.

    Args:
        model: The hooked model (changed in place: the hook point stays for the model's life).
        module: Dotted path of the submodule, e.g. ``"blocks.{layer}.mlp"``.
        attr: Attribute name of the new hook point; must start with ``hook_``.

    Returns:
        The hook name template, e.g. ``"blocks.{layer}.mlp.hook_tap"``, ready for
        :func:`register_site`.

    Raises:
        SiteError: No such submodule, or ``attr`` is taken or not a ``hook_`` name.

    Example:
        >>> from kloc_lens.planted import planted_model
        >>> model, _ = planted_model()
        >>> add_hook_point(model, "blocks.{layer}.mlp", "hook_tap")
        'blocks.{layer}.mlp.hook_tap'
        >>> "blocks.0.mlp.hook_tap" in model.hook_dict
        True
    """
    from transformer_lens.hook_points import HookPoint

    if not attr.startswith("hook_"):
        raise SiteError(f"hook point attribute {attr!r} must start with 'hook_'")
    layers = range(int(model.cfg.n_layers)) if "{layer}" in module else [None]
    for layer in layers:
        path = module.format(layer=layer) if layer is not None else module
        try:
            target = model.get_submodule(path)
        except AttributeError:
            raise SiteError(f"model has no submodule {path!r}") from None
        if hasattr(target, attr):
            raise SiteError(f"submodule {path!r} already has an attribute {attr!r}")
        point = HookPoint()
        target.add_module(attr, point)

        def call_point(mod: Any, inputs: Any, output: Any, point: Any = point) -> Any:
            return point(output)

        target.register_forward_hook(call_point)
    refresh_hook_registry(model)
    return f"{module}.{attr}"

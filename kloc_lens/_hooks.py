"""Hooks that must fire: a forward pass whose patch, restore or edit hook never ran is an error.

A hook attached to a hook point that the model never calls (a hook name this architecture does
not use, ``attn.hook_result`` without ``set_use_attn_result``, ``hook_pattern`` under a fused
attention kernel) would leave a sweep's numbers or an edit silently unchanged. :class:`Fired`
wraps each hook with a flag set when it runs; :meth:`Fired.check` after the forward pass raises
:class:`~kloc_lens.errors.HookNotFiredError` naming every hook that did not run.

>>> fired = Fired()
>>> hooks = fired.track([("blocks.0.hook_mlp_out", lambda act, hook: act)])
>>> _ = hooks[0][1](1.0, None)   # the model calls the hook
>>> fired.check("the test pass")
>>> fired = Fired()
>>> hooks = fired.track([("blocks.0.attn.hook_result", lambda act, hook: act)])
>>> fired.check("the test pass")
Traceback (most recent call last):
...
kloc_lens.errors.HookNotFiredError: hook 'blocks.0.attn.hook_result' did not run during the test pass: ...
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch import Tensor

from kloc_lens.errors import HookNotFiredError

__all__ = ["Fired", "HookFn", "not_fired_message"]

HookFn = Callable[..., Any]
"""A TransformerLens hook function: ``(activation, hook) -> activation or None``."""


def not_fired_message(names: Sequence[str], during: str) -> str:
    """The message of a :class:`~kloc_lens.errors.HookNotFiredError` for ``names``."""
    listed = ", ".join(repr(name) for name in names[:5])
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    noun = "hook" if len(names) == 1 else "hooks"
    return (
        f"{noun} {listed}{more} did not run during {during}: the model has the hook point but "
        "never called it, so the patch or edit there would silently do nothing (a hook name this "
        "architecture does not use, or a hook point that needs a switch such as "
        "model.set_use_attn_result(True))"
    )


def keep_activation(store: dict[Any, Tensor], key: Any, activation: Tensor, hook: Any) -> None:
    """A hook body (bind ``store`` and ``key`` with ``functools.partial``) that keeps a
    detached copy of the activation under ``key``."""
    store[key] = activation.detach()


def _tracked(flags: list[bool], index: int, fn: HookFn, activation: Any, hook: Any) -> Any:
    flags[index] = True
    return fn(activation, hook)


class Fired:
    """Flags of the hooks one forward pass must run."""

    __slots__ = ("_flags", "_names")

    def __init__(self) -> None:
        self._names: list[str] = []
        self._flags: list[bool] = []

    def track(self, hooks: Sequence[tuple[str, HookFn]]) -> list[tuple[str, HookFn]]:
        """The same hooks, each setting its flag when it runs."""
        return [(name, self.wrap(name, fn)) for name, fn in hooks]

    def wrap(self, name: str, fn: HookFn) -> HookFn:
        """``fn``, setting a flag of ``name`` when it runs."""
        flags = self._flags
        index = len(flags)
        self._names.append(name)
        flags.append(False)
        # a partial of a module-level function, not a closure: a closure would be built anew
        # (and, under the tests' runtime type checks, wrapped anew) for every hook of every pass
        return partial(_tracked, flags, index, fn)

    def missing(self) -> list[str]:
        """Names of the tracked hooks that have not run (each name once)."""
        names = [name for name, done in zip(self._names, self._flags, strict=True) if not done]
        return list(dict.fromkeys(names))

    def check(self, during: str) -> None:
        """Raise if a tracked hook has not run.

        Raises:
            HookNotFiredError: Naming each hook that did not run ``during`` the given pass.
        """
        if all(self._flags):
            return
        raise HookNotFiredError(not_fired_message(self.missing(), during))

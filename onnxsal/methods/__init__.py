"""The method registry: ``@method("gradcam")`` on a function makes it available everywhere.

The CLI's ``-m`` choices, ``onnxsal.methods()`` and the README table come from
here, so a new method is one file and no edits elsewhere.
A method is a function ``fn(ctx, **options) -> (T, h, w)`` raw maps, one per
target, at whatever resolution is natural to it (the layer's for CAMs, the
input's for the others); shared post-processing does the rest.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import numpy as np

from ..errors import MethodError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    family: str          # "cam", "perturbation" or "gradient"
    needs_layer: bool
    summary: str
    gradient_free: bool = False    # forward passes only: runs where the gradient graph cannot be built

    @cached_property
    def defaults(self) -> dict:
        sig = inspect.signature(self.fn)
        return {k: p.default for k, p in sig.parameters.items()
                if p.default is not inspect.Parameter.empty and k != "ctx"}

    @cached_property
    def hints(self) -> dict:
        """The options' declared types: what ``check_options`` holds a value to (read once per
        method, not per image)."""
        return typing.get_type_hints(self.fn)


_REGISTRY: dict[str, MethodSpec] = {}


def method(name: str, *, family: str, needs_layer: bool = False, gradient_free: bool = False
           ) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        first = (fn.__doc__ or "").strip().split("\n\n")[0]
        _REGISTRY[name] = MethodSpec(name, fn, family, needs_layer, " ".join(first.split()), gradient_free)
        return fn
    return register


def gradient_free() -> list[str]:
    """Names of the methods that run forward passes only, so they explain a model whose gradient
    graph cannot be built (an op without a rule on the path)."""
    _load()
    return sorted(n for n, spec in _REGISTRY.items() if spec.gradient_free)


def methods() -> list[str]:
    """Names of every registered method."""
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> MethodSpec:
    _load()
    if not isinstance(name, str):
        raise MethodError(f"a method is named by a string (one of {', '.join(sorted(_REGISTRY))}), "
                          f"not {type(name).__name__} {name!r}")
    def plain(text: str) -> str:   # "Grad-CAM", "grad_cam" and "gradcam" name the same method
        return text.lower().replace("-", "").replace("_", "")

    by_plain = {plain(k): k for k in _REGISTRY}
    if plain(name) in by_plain:
        return _REGISTRY[by_plain[plain(name)]]
    raise MethodError(f"unknown method {name!r}; choose from {', '.join(sorted(_REGISTRY))}")


def check_options(spec: MethodSpec, options: dict) -> dict:
    allowed = spec.defaults
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise MethodError(f"{spec.name} has no option {', '.join(unknown)}; its options: {', '.join(sorted(allowed)) or 'none'}")
    hints = spec.hints
    checked = {}
    for key, value in options.items():          # a switch given "maybe" must not silently mean True
        default = allowed[key]
        if isinstance(default, bool) and not isinstance(value, (bool, np.bool_)):
            raise MethodError(f"{spec.name}'s option {key} is true or false, not {value!r}")
        kind = _numeric(hints.get(key))
        if kind is not None:
            value = number_option(f"{spec.name}'s option {key}", value, *kind)
            if (key == "seed" or key.endswith("_seed")) and value is not None and value < 0:
                raise MethodError(f"{spec.name}'s option {key} is a whole number >= 0, not {value}")
        elif hints.get(key) is str and not isinstance(value, str):     # a name, read by `in` and `==`
            raise MethodError(f"{spec.name}'s option {key} takes a name, not {type(value).__name__} {value!r}")
        elif isinstance(value, (float, np.floating)) and not np.isfinite(value):
            raise MethodError(f"{spec.name}'s option {key} must be finite, not {value!r}")
        checked[key] = value
    return {**allowed, **checked}


def _numeric(hint) -> Optional[tuple[type, bool]]:
    """(int or float, whether None is allowed) for an option declared as one of them or Optional of
    one; None for any other declaration (strings, unions with arrays), which the method checks."""
    args = typing.get_args(hint)
    kinds = [a for a in args if a is not type(None)] if args else [hint]
    if len(kinds) == 1 and kinds[0] in (int, float):
        return kinds[0], type(None) in args
    return None


def number_option(what: str, value, kind: type, optional: bool, error: type = MethodError):
    """``value`` as the declared number: a count must be whole, and none may be NaN or infinite
    (a NaN noise level or window would give NaN maps, not an error). ``error``: the type raised."""
    if value is None and optional:
        return None
    whole = "a whole number" if kind is int else "a number"
    if isinstance(value, np.ndarray) and value.ndim == 0:     # np.array(5), as a NumPy reduction gives one
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{what} takes {whole}, not {value!r}")
    if not np.isfinite(value):
        raise error(f"{what} must be finite, not {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise error(f"{what} takes {whole}, not {value!r}")
        return int(value)
    return float(value)


def _load() -> None:
    from . import cam, fullgrad, gradients, layer, perturbation  # noqa: F401  (importing registers them)

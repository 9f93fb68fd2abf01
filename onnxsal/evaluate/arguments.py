"""The arguments `sanity_check` and `evaluate` share, read the same way: one method or image may
stand alone, and options come per method."""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

from ..errors import MethodError
from ..explainer import input_rows
from ..methods import get as get_method


def method_names(methods: Union[str, Sequence[str]]) -> list[str]:
    """Registered names, one per method; a single name is one method, not one per letter."""
    given = [methods] if isinstance(methods, str) else list(methods) if isinstance(methods, (list, tuple)) else None
    if given is None:
        raise MethodError(f"methods are a name or a list of names, not {type(methods).__name__}")
    if not given:
        raise MethodError("give at least one method")
    return [get_method(m).name for m in given]


def image_list(images: Any) -> list:
    """The inputs to run, at least one: a single path, image or array row stands for itself."""
    rows = input_rows(images)
    if not rows:
        raise MethodError("give at least one image")
    return rows


def method_options(options: Union[Mapping[str, Mapping], None], methods: Sequence[str]) -> dict[str, dict]:
    """{method: {option: value}} for the methods run; an entry for a method not run would be
    silently ignored, so it is refused."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
        raise MethodError("options map each method's name to a dict of its options, e.g. {'occlusion': {'window': 8}}")
    named = {get_method(k).name: dict(v) for k, v in options.items()}
    unused = [k for k in named if k not in methods]
    if unused:
        raise MethodError(f"options given for {', '.join(unused)}, which is not among the methods run "
                          f"({', '.join(methods)})")
    return named

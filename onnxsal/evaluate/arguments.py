"""The arguments `sanity_check` and `evaluate` share, read the same way: one method or image may
stand alone, and options come per method."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

from ..errors import MethodError, ModelError
from ..explainer import Explainer, input_rows
from ..methods import get as get_method


def explainer(ex: Any, what: str = "ex") -> Explainer:
    """The Explainer to run: the model is opened once, with its settings, by ``Explainer(...)``."""
    if not isinstance(ex, Explainer):
        raise ModelError(f"{what} is an onnxsal.Explainer (Explainer('model.onnx')), not {type(ex).__name__}")
    return ex


def progress_report(progress: Optional[Callable]) -> Optional[Callable]:
    if progress is not None and not callable(progress):
        raise MethodError(f"progress is a function called with (done, total, what), not {type(progress).__name__}")
    return progress


def names_of(given: Union[str, Sequence[str]], what: str) -> list[str]:
    """A name or a list or tuple of names; one name is not one per letter."""
    listed = [given] if isinstance(given, str) else list(given) if isinstance(given, (list, tuple)) else None
    if listed is None or not all(isinstance(n, str) for n in listed):
        raise MethodError(f"{what} are a name or a list of names, not {given!r}")
    return listed


def method_names(methods: Union[str, Sequence[str]]) -> list[str]:
    """Registered names, one per method; a single name is one method, not one per letter."""
    if not isinstance(methods, (str, list, tuple)):
        raise MethodError(f"methods are a name or a list of names, not {type(methods).__name__}")
    given = [methods] if isinstance(methods, str) else list(methods)
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

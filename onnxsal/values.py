"""Numbers and switches as users write them: the CLI's text ('0.5,0.4,0.3', '1 3 224 224') and
Python's values (a number, a list, a 1-D array) read alike, each refused in one line that names the
setting. One reader serves ``explain``'s --mean/--std, ``Explainer(mean=..., scale=..., bgr=...)``,
``Preprocess`` and the converters, each raising its own error class."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np

Numbers = Union[str, float, Sequence[float], np.ndarray, None]


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))


def numbers(values: Numbers, what: str, error: type[Exception], kind: type = float) -> Optional[list]:
    """`values` as a list of `kind`; None stays None. A count must be whole: 32.5 is refused, not
    truncated to 32. NaN and infinity pass: whether they are allowed is the caller's rule."""
    if values is None:
        return None
    if isinstance(values, str):
        parts: list = re.split(r"\s*[,x]\s*|\s+", values.strip())
        try:
            parts = [float(v) for v in parts]     # an empty part ("1,3,x,32") is no number either
        except ValueError:
            raise error(f"{what} takes numbers separated by commas, not {values!r}") from None
    elif _is_number(values):
        parts = [values]
    elif isinstance(values, (Sequence, np.ndarray)) and all(_is_number(v) for v in values):
        parts = list(values)
    else:
        raise error(f"{what} takes numbers, not {values!r}")
    if kind is int:
        if not all(float(v).is_integer() for v in parts):
            raise error(f"{what} takes whole numbers, not {values!r}")
        return [int(v) for v in parts]
    return [float(v) for v in parts]


def number(value: Union[str, float, None], what: str, error: type[Exception]) -> Optional[float]:
    """One number (or None): a Python number or its text ('2', '1/255' is not one)."""
    if value is None:
        return None
    if _is_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise error(f"{what} takes one number, not {value!r}")


def switch(value: object, what: str, error: type[Exception]) -> Optional[bool]:
    """True, False or None. A string is refused rather than read by its truth: 'no' is a
    non-empty string, so it would switch the setting on."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    raise error(f"{what} is True or False, not {value!r}")

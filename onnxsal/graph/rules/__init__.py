"""VJP rules, one module per op family; importing this package registers them all.

The conv/pool/norm/resize modules are optional only in the sense that a
missing module is skipped; any other import error inside an existing module
surfaces, so a broken rule file cannot silently disable its ops.
"""

from __future__ import annotations

import importlib

from . import activations, elementwise, linear, shape  # noqa: F401

_OPTIONAL = ("conv", "pool", "norm", "resize", "quant", "sample", "spectral")

for _name in _OPTIONAL:
    _full = f"{__name__}.{_name}"
    try:
        importlib.import_module(_full)
    except ModuleNotFoundError as _exc:
        if _exc.name != _full:
            raise

"""A layer's activation with its gradient, from PyTorch: the reference side of the CAM checks."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def kept(module):
    """``store["a"]``: ``module``'s output in the forward pass run inside the block, its gradient
    retained for a backward pass after it."""
    store = {}

    def keep(_, __, out):
        out.retain_grad()
        store["a"] = out

    handle = module.register_forward_hook(keep)
    try:
        yield store
    finally:
        handle.remove()

"""The reference side of the checks, in PyTorch: a layer's activation with its gradient, and
BatchNorm statistics that are not the identity."""

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


def varied_batch_norm(net) -> None:
    """Running means in [-0.5, 0.5] and variances in [0.5, 2] for every BatchNorm2d of ``net`` (drawn
    from torch's global generator): left at their defaults, they make each BatchNorm the identity."""
    import torch
    from torch import nn

    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)

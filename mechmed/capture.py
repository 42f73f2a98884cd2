"""Activation capture with plain PyTorch forward hooks, scoped to a ``with`` block.

``capture(bundle, inputs, sites)`` runs one forward pass and returns each Site's activation
([batch, pos, d_model]). Hooks are registered in :func:`hooks` and removed in ``finally``, also
when the forward raises. Module outputs (a Tensor in Gemma 3, a tuple in Qwen2.5-VL attention)
are unpacked in :func:`output_tensor`, the one place that knows about tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from mechmed.sites import Site


def output_tensor(output):
    """The activation tensor of a module's output (first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def hooks(model, family, fns: dict[Site, Callable]) -> Iterator[None]:
    """Register ``fn(site, activation)`` as a forward hook on each Site's module for the block.

    A hook function may return a replacement activation (an intervention) or None.
    """
    handles = []

    def make(site: Site, fn: Callable):
        def hook(module, args, output):
            act = output_tensor(output)
            new = fn(site, act)
            if new is None:
                return None
            if isinstance(output, (tuple, list)):
                return type(output)([new, *output[1:]])
            return new

        return hook

    try:
        for site, fn in fns.items():
            module = family.get_module(model, family.module_path(site))
            handles.append(module.register_forward_hook(make(site, fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def capture(bundle, inputs, sites: Iterable[Site], *, detach: bool = True):
    """One forward pass; returns ({Site: [batch, pos, d_model] activation}, model output)."""
    import torch

    sites = list(sites)
    for s in sites:
        s.check(bundle.n_layers)
    store: dict[Site, torch.Tensor] = {}

    def keep(site, act):
        store[site] = act.detach() if detach else act

    with hooks(bundle.model, bundle.family, {s: keep for s in sites}), torch.set_grad_enabled(not detach):
        out = bundle.model(**inputs, use_cache=False, logits_to_keep=1)
    return store, out

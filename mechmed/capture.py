"""Activation capture and interventions: one API over three backends.

``capture(bundle, inputs, sites)`` runs ONE forward pass and returns each Site's activation;
``intervene(bundle, inputs, edits)`` runs one forward pass with activations replaced. Both take
``backend=``:

- ``"hooks"`` (default, fastest): plain PyTorch forward hooks on the modules the family map names,
  registered in :func:`hooks` and removed in ``finally``, also when the forward raises.
- ``"nnsight"``: an ``nnsight.NNsight`` wrapper; each Site is ``envoy.output`` of the same module.
- ``"transformer_lens"``: a TransformerLens 3.x ``TransformerBridge`` booted on the loaded model;
  each Site is the bridge's hook ``site.hook_name`` (``blocks.{L}.hook_resid_post`` ...).

Both wrappers change the model they wrap (nnsight installs a controller as every module's
``forward``; the bridge replaces modules by bridge components and forces eager attention), so
each is built once per model on a *shadow*: a copy of the module tree that shares every
parameter and buffer with the bundle's model (no extra weight memory; weight updates are
seen). The bundle's model itself is never modified. Shadows are cached per model (weakly) and
rebuilt when the model's module count, device or dtype changes; :func:`clear_backend_cache`
drops them.

All three backends run the same call, ``model(**inputs, use_cache=False, logits_to_keep=1)``, and
apply the same capture/edit code to the same tensor; they differ only in how they reach it. The
bridge forces eager attention, so its numbers differ from the sdpa default by float rounding
(at most 4e-6 in float32 on the tiny models; the parity tests allow 1e-5). Padding positions hold
unspecified values that differ between attention kernels: compare real tokens only.

What each kind is, per family, is written in :mod:`mechmed.families`. The bridge's hooks agree
with it: for Gemma 3 its ``hook_attn_out`` / ``hook_mlp_out`` are aliases of
``ln1_post.hook_out`` / ``ln2_post.hook_out`` (after ``post_attention_layernorm`` /
``post_feedforward_layernorm``, the tensors added to the residual stream), ``hook_resid_post``
is the block's output; the parity tests check this numerically.

``positions`` selects what is returned (and, for :func:`intervene`, where edits apply):

- ``"all"``: ``[batch, pos, d_model]``;
- ``"last"``: ``[batch, 1, d_model]``, the answer position (the last token: prompts are left-padded);
- a bool mask ``[batch, pos]`` (e.g. :func:`image_token_mask`, :func:`text_token_mask`): a flat
  ``[n_selected, d_model]`` per site, rows in ``mask.nonzero()`` order (batch-major).

Module outputs (a Tensor in Gemma 3, a tuple in Qwen2.5-VL attention) are unpacked in
:func:`output_tensor` and repacked in :func:`replace_output`, the one place that knows about tuples.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from mechmed.errors import MechmedError
from mechmed.sites import Site

if TYPE_CHECKING:
    from jaxtyping import Bool, Float
    from torch import Tensor

log = logging.getLogger(__name__)

BACKENDS = ("hooks", "nnsight", "transformer_lens")
POSITIONS = ("all", "last")
Positions = Union[str, "Bool[Tensor, 'batch pos']"]

# Order in which a decoder layer produces its sites (nnsight must read them in execution order).
_KIND_ORDER = {"attn_out": 0, "mlp_out": 1, "resid_post": 2}
_ALL, _LAST = "all", "last"


class Capture(NamedTuple):
    """What :func:`capture` returns (unpacks as ``acts, output``)."""

    acts: dict
    """Site -> activation, shaped as ``positions`` says."""
    output: Any
    """The model's output (``logits`` are ``[batch, 1, vocab]``: ``logits_to_keep=1``)."""


class Intervention(NamedTuple):
    """What :func:`intervene` returns."""

    output: Any
    """The model's output with the edits applied (``logits`` ``[batch, 1, vocab]``)."""
    acts: dict
    """Activations of ``capture_sites`` (after any edit at that site); empty if none were asked."""


@dataclass(frozen=True)
class Edit:
    """An activation edit: ``fn`` gets the activation at ``positions`` and returns its replacement
    (same shape). ``positions=None`` uses the ``positions`` given to :func:`intervene`."""

    fn: Callable
    positions: Any = None
    name: str = "edit"

    def __repr__(self) -> str:
        return f"Edit({self.name}, positions={self.positions if isinstance(self.positions, str) else 'mask'})"


def replace_with(value: Float[Tensor, "... d_model"], positions: Positions | None = None) -> Edit:
    """An edit that replaces the activation by ``value`` (broadcast to the selected shape)."""
    import torch

    if not torch.is_tensor(value):
        raise MechmedError(f"replace_with: give a tensor, not {type(value).__name__}")

    def fn(act):
        try:
            return value.to(act.device, act.dtype).expand_as(act).contiguous()
        except RuntimeError:
            raise MechmedError(f"replace_with: a {tuple(value.shape)} tensor cannot replace an activation of shape "
                               f"{tuple(act.shape)}; give a tensor of that shape (or broadcastable to it)") from None

    return Edit(fn, positions, "replace_with")


def add_direction(vec: Float[Tensor, " d_model"], scale: float = 1.0, positions: Positions | None = None) -> Edit:
    """An edit that adds ``scale * vec`` to the activation at every selected position."""
    import torch

    if not torch.is_tensor(vec) or vec.ndim != 1:
        raise MechmedError(f"add_direction: give a 1-D [d_model] direction, not shape {tuple(getattr(vec, 'shape', ()))}")

    def fn(act):
        if act.shape[-1] != vec.shape[0]:
            raise MechmedError(f"add_direction: direction has {vec.shape[0]} entries but d_model is {act.shape[-1]}")
        return act + scale * vec.to(act.device, act.dtype)

    return Edit(fn, positions, f"add_direction(scale={scale})")


# --------------------------------------------------------------------------- module outputs


def output_tensor(output):
    """The activation tensor of a module's output (first element of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_output(output, new):
    """``output`` with its activation tensor replaced by ``new`` (tuples keep their other elements)."""
    if isinstance(output, (tuple, list)):
        return type(output)([new, *output[1:]])
    return new


@contextmanager
def hooks(model, family, fns: dict[Site, Callable]) -> Iterator[None]:
    """Register ``fn(site, activation)`` as a forward hook on each Site's module for the block.

    A hook function may return a replacement activation (an intervention) or None.
    """
    handles = []

    def make(site: Site, fn: Callable):
        def hook(module, args, output):
            new = fn(site, output_tensor(output))
            return None if new is None else replace_output(output, new)

        return hook

    try:
        for site, fn in fns.items():
            module = family.get_module(model, family.module_path(site))
            handles.append(module.register_forward_hook(make(site, fn)))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- token masks


def _image_token_id(model) -> int | None:
    config = model.config
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def image_token_mask(bundle, inputs) -> Bool[Tensor, "batch pos"]:
    """True at the image soft tokens (all False for a text-only model or prompts without images)."""
    ids = inputs["input_ids"]
    token = _image_token_id(bundle.model) if bundle.family.multimodal else None
    if token is None:
        return ids.new_zeros(ids.shape, dtype=bool)
    return ids == token


def text_token_mask(bundle, inputs) -> Bool[Tensor, "batch pos"]:
    """True at every real (non-padding) token that is not an image soft token; this includes the
    chat template's special tokens (``<bos>``, turn markers, ``<start_of_image>``)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = ids.new_ones(ids.shape, dtype=bool) if mask is None else mask.bool()
    return real & ~image_token_mask(bundle, inputs)


# --------------------------------------------------------------------------- positions and edits


def _resolve_positions(positions, inputs, what: str = "positions"):
    import torch

    if isinstance(positions, str):
        if positions == _ALL:
            return _ALL
        if positions == _LAST:
            mask = inputs.get("attention_mask")
            if mask is not None and not bool(mask[:, -1].all()):
                raise MechmedError(f"{what}='last': some prompts end in padding (a right-padded batch); "
                                   "pad on the left, as mechmed.readout.build_inputs does")
            return _LAST
    elif torch.is_tensor(positions):
        shape = tuple(inputs["input_ids"].shape)
        if positions.dtype != torch.bool or tuple(positions.shape) != shape:
            raise MechmedError(f"{what}: a mask must be a bool tensor of shape [batch, pos] = {list(shape)}, "
                               f"not {positions.dtype} {list(positions.shape)}")
        return positions
    raise MechmedError(f"{what}={positions!r}: use 'all', 'last' or a bool [batch, pos] mask "
                       "(e.g. image_token_mask / text_token_mask)")


def _select(act, pos):
    if pos is _ALL:
        return act
    if pos is _LAST:
        return act[:, -1:]
    return act[pos.to(act.device)]


def _keep(act, pos, detach: bool):
    out = _select(act, pos)
    if detach:
        out = out.detach()
        if pos is _LAST:
            out = out.clone()  # a view would keep the whole [batch, pos, d] activation alive
    return out


def _apply_edit(site: Site, act, edit: Edit, pos):
    import torch

    region = _select(act, pos)
    new = edit.fn(region)
    if not torch.is_tensor(new) or new.shape != region.shape:
        got = tuple(new.shape) if torch.is_tensor(new) else type(new).__name__
        raise MechmedError(f"edit at site {site}: returned {got} for an activation of shape {tuple(region.shape)}; "
                           "return a tensor of the same shape")
    new = new.to(act.dtype)
    if pos is _ALL:
        return new
    if pos is _LAST:
        return torch.cat([act[:, :-1], new], dim=1)
    out = act.clone()
    out[pos.to(act.device)] = new
    return out


def _as_edit(site: Site, edit) -> Edit:
    import torch

    if isinstance(edit, Edit):
        return edit
    if torch.is_tensor(edit):
        return replace_with(edit)
    if callable(edit):
        return Edit(edit)
    raise MechmedError(f"edit for site {site}: give a function of the activation, a tensor or an Edit "
                       f"(replace_with / add_direction), not {type(edit).__name__}")


def _as_site(site) -> Site:
    return site if isinstance(site, Site) else Site.parse(site)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise MechmedError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return backend


def _plan(bundle, inputs, capture_sites, edits, positions, detach):
    """Per-site functions ``act -> replacement or None`` shared by all backends, and the dict they fill."""
    pos = _resolve_positions(positions, inputs)
    wanted = [_as_site(s) for s in capture_sites]
    edits = {_as_site(s): e for s, e in (edits or {}).items()}
    n_layers = bundle.n_layers
    for s in (*wanted, *edits):
        s.check(n_layers)
    resolved = {}
    for site, e in edits.items():
        e = _as_edit(site, e)
        resolved[site] = (e, pos if e.positions is None else _resolve_positions(e.positions, inputs, f"{e.name} positions"))
    keep = set(wanted)
    store: dict[Site, Any] = {}

    def make(site):
        edit, epos = resolved.get(site, (None, None))

        def op(act):
            new = None if edit is None else _apply_edit(site, act, edit, epos)
            if site in keep:
                store[site] = _keep(act if new is None else new, pos, detach)
            return new

        return op

    ops = {site: make(site) for site in dict.fromkeys([*edits, *wanted])}
    return ops, store, wanted


# --------------------------------------------------------------------------- backends

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(model) -> tuple:
    p = next(model.parameters())
    return sum(1 for _ in model.modules()), p.device, p.dtype


def _shadow(model):
    """A copy of the module tree sharing every parameter and buffer with ``model``."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def clear_backend_cache(model=None) -> None:
    """Drop the cached nnsight wrappers / TransformerLens bridges (of ``model``, or of every model)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)


def _cached(bundle, backend: str, build: Callable):
    model = bundle.model
    fp = _fingerprint(model)
    entry = _CACHE.setdefault(model, {})
    hit = entry.get(backend)
    if hit is None or hit[0] != fp:
        log.debug("building the %s wrapper for %s", backend, type(model).__name__)
        hit = entry[backend] = (fp, *build(bundle))
    wrapper, hf = hit[1], hit[2]
    if hf.training != model.training:
        hf.train(model.training)
    return wrapper


def _forward(model, inputs):
    return model(**inputs, use_cache=False, logits_to_keep=1)


def _hook_fns(ops: dict) -> dict:
    """Hook functions for :func:`hooks`. The hooks backend calls the model directly from
    :func:`capture` / :func:`intervene`, with no helper frame in between. Under CPython 3.11 the
    speed of a Python-bound forward (a tiny model) depends on the stack depth it is called at (where
    the interpreter's frame-stack chunks break): measured 1.0-1.4x for 0-15 extra frames on the
    demo model, periodic beyond. mechmed adds no frame of its own; real-width models do not notice."""
    return {s: (lambda site, act, op=op: op(act)) for s, op in ops.items()}


def _build_nnsight(bundle):
    try:
        from nnsight import NNsight
    except ImportError as e:
        raise MechmedError(f"backend 'nnsight': cannot import nnsight ({e}); pip install nnsight, "
                           "or use backend='hooks'") from e
    shadow = _shadow(bundle.model)
    return NNsight(shadow), shadow


def nnsight_model(bundle):
    """The (cached) ``nnsight.NNsight`` wrapper of a shadow of the bundle's model (see module doc)."""
    return _cached(bundle, "nnsight", _build_nnsight)


def _run_nnsight(bundle, inputs, ops):
    wrapper = nnsight_model(bundle)
    steps = [(bundle.family.module_path(s), ops[s]) for s in sorted(ops, key=lambda s: (s.layer, _KIND_ORDER[s.kind]))]
    box: dict[str, Any] = {}
    # nnsight runs this block's body interleaved with the forward: sites are read in execution order,
    # and results leave the block through ``box`` (names bound inside the body do not escape it).
    with wrapper.trace(**inputs, use_cache=False, logits_to_keep=1):
        for path, op in steps:
            envoy = wrapper.get(path)
            raw = envoy.output
            new = op(output_tensor(raw))
            if new is not None:
                envoy.output = replace_output(raw, new)
        box["output"] = wrapper.output
    return box["output"]


def _build_bridge(bundle):
    model, family = bundle.model, bundle.family
    why = f"backend 'transformer_lens' cannot wrap {family.name}"
    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoProcessor, AutoTokenizer
    except ImportError as e:
        raise MechmedError(f"{why}: {e}; use backend='hooks' or 'nnsight'") from e
    shadow = _shadow(model)
    p = next(model.parameters())
    quiet = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="mechmed-tl-") as tmp:
        # The bridge reloads the tokenizer (and, for a multimodal model, the processor) by name; a
        # saved copy makes that work offline for any model. Its processor reload falls back to
        # pip-installing torchvision when it fails, so that reload is tried here first.
        try:
            bundle.processor.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(tmp)
            if family.multimodal:
                AutoProcessor.from_pretrained(tmp)
        except Exception as e:  # noqa: BLE001 - any failure here means the bridge cannot boot
            raise MechmedError(f"{why}: its processor does not reload with AutoProcessor "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                               "use backend='hooks' or 'nnsight'") from e
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
                warnings.simplefilter("ignore")
                bridge = TransformerBridge.boot_transformers(
                    tmp, hf_model=shadow, device=str(p.device), dtype=p.dtype,
                    hf_config_overrides={"architectures": [family.name]})
        except Exception as e:  # noqa: BLE001 - TransformerLens raises many types; the user needs one line
            first = (str(e).splitlines()[0] if str(e) else type(e).__name__).rstrip(". ")
            raise MechmedError(f"{why}: {first}; use backend='hooks' or 'nnsight'") from e
    if family.vision_tower:
        # TransformerLens 3.x re-implements the SigLIP encoder's attention, and its result differs from
        # transformers' by O(1) on image tokens; mechmed's Sites are all in the decoder, so the shadow
        # runs the model's own (unwrapped) vision tower, and image tokens enter the decoder unchanged.
        parent, _, child = family.vision_tower.rpartition(".")
        setattr(shadow.get_submodule(parent) if parent else shadow, child, model.get_submodule(family.vision_tower))
    names = bridge.hook_dict
    missing = [family.hook_name(Site(0, kind)) for kind in _KIND_ORDER if family.hook_name(Site(0, kind)) not in names]
    if missing:
        raise MechmedError(f"{why}: the bridge has no hooks {missing}; use backend='hooks' or 'nnsight'")
    return bridge, shadow


def transformer_lens_bridge(bundle):
    """The (cached) TransformerLens ``TransformerBridge`` booted on a shadow of the bundle's model."""
    return _cached(bundle, "transformer_lens", _build_bridge)


def _run_transformer_lens(bundle, inputs, ops):
    bridge = transformer_lens_bridge(bundle)

    def make(op):
        def hook(tensor, hook):
            new = op(output_tensor(tensor))
            return None if new is None else replace_output(tensor, new)

        return hook

    fwd = [(bundle.family.hook_name(s), make(op)) for s, op in ops.items()]
    with bridge.hooks(fwd_hooks=fwd):
        # The bridged HF model itself, with the same arguments as the other backends: bridge.forward
        # would derive position_ids from the attention mask, which moves left-padded rows' positions.
        return _forward(bridge.original_model, inputs)


_RUNNERS = {"nnsight": _run_nnsight, "transformer_lens": _run_transformer_lens}


# --------------------------------------------------------------------------- public API


def _collect(store: dict, wanted: list, backend: str) -> dict:
    missing = [s for s in wanted if s not in store]
    if missing:
        raise MechmedError(f"site {missing[0]}: its module did not run in the forward (backend {backend!r}); "
                           "check the model family's layer path")
    return {s: store[s] for s in wanted}


def capture(bundle, inputs, sites: Iterable[Site], backend: str = "hooks", *, positions: Positions = "all",
            detach: bool = True) -> Capture:
    """One forward pass; returns ``(acts, output)`` with ``acts[site]`` shaped by ``positions``.

    ``positions="all"``: ``Float[Tensor, "batch pos d_model"]``; ``"last"``: ``[batch, 1, d_model]``
    (the answer position); a bool ``[batch, pos]`` mask: ``[n_selected, d_model]`` (rows in
    ``mask.nonzero()`` order). ``detach=False`` keeps the graph (for gradients through activations).
    """
    import torch

    _check_backend(backend)
    ops, store, wanted = _plan(bundle, inputs, sites, None, positions, detach)
    with torch.set_grad_enabled(not detach):
        if backend == "hooks":  # the model is called from here, not a helper: see _hook_fns
            with hooks(bundle.model, bundle.family, _hook_fns(ops)):
                out = bundle.model(**inputs, use_cache=False, logits_to_keep=1)
        else:
            out = _RUNNERS[backend](bundle, inputs, ops)
    return Capture(_collect(store, wanted, backend), out)


def intervene(bundle, inputs, edits: Mapping[Site, Callable | Tensor | Edit], backend: str = "hooks", *,
              positions: Positions = "all", capture_sites: Iterable[Site] = (), detach: bool = True) -> Intervention:
    """One forward pass with activations edited; returns :class:`Intervention` ``(output, acts)``.

    Each edit is a function (gets the activation at ``positions``, returns its replacement, same
    shape), a tensor (replaces it, broadcast) or an :class:`Edit` (:func:`replace_with`,
    :func:`add_direction`; its own ``positions`` override the call's). ``capture_sites`` are
    captured in the same pass, at ``positions``, after any edit at that site.
    """
    import torch

    _check_backend(backend)
    ops, store, wanted = _plan(bundle, inputs, capture_sites, edits, positions, detach)
    with torch.set_grad_enabled(not detach):
        if backend == "hooks":
            with hooks(bundle.model, bundle.family, _hook_fns(ops)):
                out = bundle.model(**inputs, use_cache=False, logits_to_keep=1)
        else:
            out = _RUNNERS[backend](bundle, inputs, ops)
    return Intervention(out, _collect(store, wanted, backend))

"""Capture and interventions: the three backends agree, hooks never outlive a call, edits do what they say.

Tolerances (float32, tiny models, real tokens only; padding positions hold kernel-dependent garbage):
- hooks vs nnsight: identical code path on the same kernels, checked to 1e-6 (observed 0).
- hooks vs TransformerLens bridge: the bridge forces eager attention (the model runs sdpa), so
  activations differ by float rounding, observed <= 4e-6; checked to atol 1e-5, rtol 1e-5.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import FAMILIES, QUESTIONS, make_image
from mechmed.capture import (
    BACKENDS,
    add_direction,
    capture,
    clear_backend_cache,
    image_token_mask,
    intervene,
    nnsight_model,
    replace_with,
    text_token_mask,
    transformer_lens_bridge,
)
from mechmed.errors import MechmedError
from mechmed.readout import build_inputs, yes_no_logits
from mechmed.sites import SITE_KINDS, Site

TOL = {"hooks": dict(atol=0.0, rtol=0.0), "nnsight": dict(atol=1e-6, rtol=0.0),
       "transformer_lens": dict(atol=1e-5, rtol=1e-5)}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _inputs(b, questions=(QUESTIONS[0], QUESTIONS[2]), seed=0):
    images = [make_image(seed + i) for i in range(len(questions))] if b.multimodal else None
    return build_inputs(b.processor, questions, images)


def _supported(b, backend) -> bool:
    """TransformerLens's Qwen2.5-VL adapter needs torchvision; without it the backend must refuse."""
    return not (backend == "transformer_lens" and b.family.name.startswith("Qwen") and not HAS_TORCHVISION)


def _margin(b, out):
    s = yes_no_logits(out.logits[:, -1], b.answers)
    return s[:, 0] - s[:, 1]


def _all_sites(b):
    return b.family.sites(b.model.config, SITE_KINDS)


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
@pytest.mark.parametrize("name", FAMILIES)
def test_backends_give_the_same_activations(tiny_bundles, name, backend):
    b = tiny_bundles[name]
    inputs = _inputs(b)
    sites = _all_sites(b)
    if not _supported(b, backend):
        with pytest.raises(MechmedError, match="transformer_lens.*torchvision.*backend='hooks'"):
            capture(b, inputs, sites, backend)
        return
    tol = TOL[backend]
    real = inputs["attention_mask"].bool()
    assert not real.all(), "the batch should be left-padded"
    ref, ref_out = capture(b, inputs, sites)
    acts, out = capture(b, inputs, sites, backend)
    assert set(acts) == set(sites)
    for s in sites:
        assert acts[s].shape == ref[s].shape == (*real.shape, b.d_model)
        torch.testing.assert_close(acts[s][real], ref[s][real], **tol, msg=f"{backend} {s}")
    torch.testing.assert_close(out.logits, ref_out.logits, **tol)
    # the answer position and masked positions, through the same backend
    masks = {"last": "last", "image": image_token_mask(b, inputs), "text": text_token_mask(b, inputs)}
    if b.multimodal:
        assert int(masks["image"].sum()) > 0
    for label, pos in masks.items():
        got, _ = capture(b, inputs, sites, backend, positions=pos)
        for s in sites:
            want = ref[s][:, -1:] if label == "last" else ref[s][pos]
            torch.testing.assert_close(got[s], want, **tol, msg=f"{backend} {label} {s}")


@pytest.mark.parametrize("name", FAMILIES)
def test_position_selection_shapes(tiny_bundles, name):
    b = tiny_bundles[name]
    inputs = _inputs(b)
    site = Site(1)
    full = capture(b, inputs, [site]).acts[site]
    last = capture(b, inputs, [site], positions="last").acts[site]
    assert last.shape == (2, 1, b.d_model)
    torch.testing.assert_close(last, full[:, -1:], atol=0, rtol=0)
    img, txt = image_token_mask(b, inputs), text_token_mask(b, inputs)
    real = inputs["attention_mask"].bool()
    assert not (img & txt).any() and ((img | txt) == real).all()  # pad / image / text partition the tokens
    if b.multimodal:
        per_image = b.model.config.mm_tokens_per_image if hasattr(b.model.config, "mm_tokens_per_image") else None
        if per_image:
            assert int(img.sum()) == 2 * per_image
    flat = capture(b, inputs, [site], positions=txt).acts[site]
    assert flat.shape == (int(txt.sum()), b.d_model)
    torch.testing.assert_close(flat, full[txt], atol=0, rtol=0)


def test_bad_options_raise_one_line_errors(tiny_bundles):
    b = tiny_bundles["Gemma3ForCausalLM"]
    inputs = _inputs(b)
    with pytest.raises(MechmedError, match="backend 'torchlens'"):
        capture(b, inputs, [Site(0)], "torchlens")
    with pytest.raises(MechmedError, match="positions='first'"):
        capture(b, inputs, [Site(0)], positions="first")
    with pytest.raises(MechmedError, match=r"bool tensor of shape \[batch, pos\]"):
        capture(b, inputs, [Site(0)], positions=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(MechmedError, match="layer 7: out of range"):
        capture(b, inputs, [Site(7)])
    with pytest.raises(MechmedError, match="layer 7: out of range"):
        intervene(b, inputs, {Site(7, "mlp_out"): lambda a: a})
    right = b.tokenizer(["is there edema", "is the heart normal here"], return_tensors="pt", padding=True,
                        padding_side="right")
    with pytest.raises(MechmedError, match="right-padded"):
        capture(b, right, [Site(0)], positions="last")
    for backend in BACKENDS:  # raised inside the forward, whichever backend runs it
        with pytest.raises(MechmedError, match="edit at site resid_post:1.*same shape"):
            intervene(b, inputs, {Site(1): lambda a: a[:, :1]}, backend)
    with pytest.raises(MechmedError, match="edit for site resid_post:1"):
        intervene(b, inputs, {Site(1): "zero"})
    with pytest.raises(MechmedError, match="add_direction: direction has 3 entries"):
        intervene(b, inputs, {Site(1): add_direction(torch.ones(3))})
    with pytest.raises(MechmedError, match="replace_with"):
        intervene(b, inputs, {Site(1): replace_with(torch.ones(5, 7))})


def _torch_hooks(model):
    return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_hook_outlives_a_failed_forward(tiny_bundles, backend):
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    inputs = _inputs(b)
    sites = _all_sites(b)
    before_model = _torch_hooks(b.model)
    ref = capture(b, inputs, sites, backend).acts  # builds (and caches) the backend's wrapper
    wrapper = {"nnsight": lambda: nnsight_model(b)._module, "transformer_lens": lambda: transformer_lens_bridge(b),
               "hooks": lambda: b.model}[backend]()
    before_wrapper = _torch_hooks(wrapper)

    def boom(act):
        raise RuntimeError("boom inside the forward")

    with pytest.raises(RuntimeError, match="boom inside the forward"):
        intervene(b, inputs, {Site(1, "mlp_out"): boom}, backend, capture_sites=sites)
    assert _torch_hooks(b.model) == before_model
    assert _torch_hooks(wrapper) == before_wrapper
    if backend == "transformer_lens":
        assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in wrapper.hook_dict.values())
    after = capture(b, inputs, sites, backend).acts  # the wrapper still works, unchanged
    for s in sites:
        torch.testing.assert_close(after[s], ref[s], atol=0, rtol=0)


def test_wrappers_leave_the_bundle_model_untouched(tiny_bundles):
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    inputs = _inputs(b)
    types = {n: type(m) for n, m in b.model.named_modules()}
    attn = b.model.config.text_config._attn_implementation
    for backend in BACKENDS:
        capture(b, inputs, [Site(0)], backend)
    assert {n: type(m) for n, m in b.model.named_modules()} == types
    assert b.model.config.text_config._attn_implementation == attn
    assert not any("forward" in m.__dict__ for m in b.model.modules())  # no nnsight controller on it
    # the wrappers are cached per model and share its weights
    assert nnsight_model(b) is nnsight_model(b)
    shadow = nnsight_model(b)._module
    assert {id(p) for p in shadow.parameters()} == {id(p) for p in b.model.parameters()}
    bridge = transformer_lens_bridge(b)
    shared = {id(p) for p in b.model.parameters()}
    extra = {n: p for n, p in bridge.original_model.named_parameters() if id(p) not in shared}
    assert set(extra) <= {"lm_head._original_component.bias"}  # the bridge gives the unembedding a zero bias
    assert all(not p.any() for p in extra.values())


def test_cache_is_rebuilt_after_clear(tiny_bundles):
    b = tiny_bundles["Gemma3ForCausalLM"]
    first = nnsight_model(b)
    clear_backend_cache(b.model)
    assert nnsight_model(b) is not first


@pytest.mark.parametrize("name", FAMILIES)
def test_adding_a_direction_moves_the_margin_identically_on_every_backend(tiny_bundles, name):
    b = tiny_bundles[name]
    inputs = _inputs(b)
    direction = torch.randn(b.d_model, generator=torch.Generator().manual_seed(0))
    base = _margin(b, capture(b, inputs, []).output)
    moved = {}
    for backend in BACKENDS:
        if not _supported(b, backend):
            continue
        edit = {Site(1): add_direction(direction, 4.0, positions="last")}
        moved[backend] = _margin(b, intervene(b, inputs, edit, backend).output)
    assert (moved["hooks"] - base).abs().max() > 1e-3
    for backend, m in moved.items():
        torch.testing.assert_close(m, moved["hooks"], **TOL[backend], msg=backend)
    # positions='all' on the call applies where the edit does not say otherwise
    everywhere = _margin(b, intervene(b, inputs, {Site(1): lambda a: a + 4.0 * direction}).output)
    assert not torch.allclose(everywhere, moved["hooks"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_replacing_an_activation_by_itself_is_a_no_op(tiny_bundles, name, backend):
    b = tiny_bundles[name]
    if not _supported(b, backend):
        pytest.skip("backend refuses this family (tested above)")
    inputs = _inputs(b)
    base, base_out = capture(b, inputs, _all_sites(b), backend)
    for kind in SITE_KINDS:
        site = Site(1, kind)
        for edit in (lambda a: a.clone(), replace_with(base[site])):
            res = intervene(b, inputs, {site: edit}, backend, capture_sites=[Site(2)])
            torch.testing.assert_close(res.output.logits, base_out.logits, atol=1e-6, rtol=0)
            torch.testing.assert_close(res.acts[Site(2)], base[Site(2)], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_splicing_the_last_position_matches_a_manual_patch(tiny_bundles, name):
    b = tiny_bundles[name]
    a_inputs = _inputs(b, QUESTIONS[:2], seed=0)
    b_inputs = _inputs(b, QUESTIONS[2:], seed=5)
    layer = 1
    # manual: A's layer output from output_hidden_states, written into B's last position by a raw torch hook
    with torch.no_grad():
        hs = b.model(**a_inputs, output_hidden_states=True, use_cache=False).hidden_states
    donor = hs[layer + 1][:, -1:].clone()
    module = b.model.get_submodule(b.family.layer_path(layer))

    def patch(mod, args, output):
        out = output.clone()
        out[:, -1:] = donor
        return out

    handle = module.register_forward_hook(patch)
    try:
        with torch.no_grad():
            manual = b.model(**b_inputs, use_cache=False, logits_to_keep=1).logits
    finally:
        handle.remove()
    spliced_from = capture(b, a_inputs, [Site(layer)], positions="last").acts[Site(layer)]
    torch.testing.assert_close(spliced_from, donor, atol=1e-6, rtol=0)
    for backend in BACKENDS:
        if not _supported(b, backend):
            continue
        res = intervene(b, b_inputs, {Site(layer): replace_with(spliced_from)}, backend, positions="last",
                        capture_sites=[Site(layer)])
        torch.testing.assert_close(res.output.logits, manual, **TOL[backend], msg=backend)
        torch.testing.assert_close(res.acts[Site(layer)], donor, **TOL[backend])
    assert not torch.allclose(manual, capture(b, b_inputs, []).output.logits)


def test_edits_at_a_mask_touch_only_those_tokens(tiny_bundles):
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    inputs = _inputs(b)
    img = image_token_mask(b, inputs)
    site = Site(0, "attn_out")
    base = capture(b, inputs, [site]).acts[site]
    res = intervene(b, inputs, {site: lambda a: a * 0}, positions=img, capture_sites=[site])
    assert res.acts[site].shape == (int(img.sum()), b.d_model) and not res.acts[site].any()
    full = intervene(b, inputs, {site: add_direction(torch.ones(b.d_model), positions=img)}, capture_sites=[site])
    torch.testing.assert_close(full.acts[site][~img], base[~img], atol=0, rtol=0)
    torch.testing.assert_close(full.acts[site][img], base[img] + 1, atol=1e-6, rtol=0)


def test_gradients_flow_when_not_detached(tiny_bundles):
    b = tiny_bundles["Gemma3ForCausalLM"]
    inputs = _inputs(b)
    acts, out = capture(b, inputs, [Site(1)], detach=False)
    assert acts[Site(1)].requires_grad
    (grad,) = torch.autograd.grad(_margin(b, out).sum(), acts[Site(1)])
    assert grad[:, -1].abs().sum() > 0


@pytest.mark.slow
def test_backends_agree_on_the_trained_demo_model_with_images(demo_model_dir):
    """On a *trained* model the image tokens carry real signal: every backend must feed the decoder the
    same image embeddings (TransformerLens's own SigLIP wrapper does not; mechmed runs transformers')."""
    from mechmed.models import load_model

    b = load_model(str(demo_model_dir))
    inputs = build_inputs(b.processor, ["Is there a pleural effusion?", "Is the heart enlarged?"],
                          [make_image(0), make_image(1)])
    sites = [s for s in _all_sites(b) if s.kind == "resid_post"]
    ref = capture(b, inputs, sites, backend="hooks")[0]
    assert image_token_mask(b, inputs).any()
    real = inputs["attention_mask"].bool()  # padding positions hold kernel-dependent values
    for backend in ("nnsight", "transformer_lens"):
        got = capture(b, inputs, sites, backend=backend)[0]
        for s in sites:
            torch.testing.assert_close(got[s][real], ref[s][real], **TOL[backend], msg=f"{backend} {s}")
    clear_backend_cache(b.model)

"""Architecture maps: config-only checks, then activations against output_hidden_states."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, QUESTIONS, make_image
from mechmed.capture import capture, hooks
from mechmed.errors import MechmedError
from mechmed.families import ArchitectureMap, get_family, register_family, registered_families
from mechmed.readout import build_inputs
from mechmed.sites import SITE_KINDS, Site, parse_layers


def test_site_parsing_and_hook_names():
    assert Site.parse("17") == Site(17, "resid_post")
    assert Site.parse("mlp_out:3") == Site(3, "mlp_out")
    assert Site.parse("blocks.5.hook_attn_out") == Site(5, "attn_out")
    assert Site(17).hook_name == "blocks.17.hook_resid_post"
    for bad in ("x", "resid:1", "-1", "blocks.a.hook_resid_post"):
        with pytest.raises(MechmedError):
            Site.parse(bad)
    with pytest.raises(MechmedError, match="out of range"):
        Site(6).check(6)
    assert parse_layers("15-19") == [15, 16, 17, 18, 19]
    assert parse_layers("3, 1,2") == [1, 2, 3]
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    with pytest.raises(MechmedError, match="layer 6"):
        parse_layers("5-7", 6)
    with pytest.raises(MechmedError):
        parse_layers("9-3")


def test_registry_knows_the_three_families_and_rejects_duplicates():
    assert set(FAMILIES) <= set(registered_families())
    fam = get_family("Gemma3ForConditionalGeneration")
    assert fam.module_path(Site(17)) == "model.language_model.layers.17"
    assert fam.module_path(Site(2, "mlp_out")) == "model.language_model.layers.2.post_feedforward_layernorm"
    assert get_family("Gemma3ForCausalLM").module_path(Site(0, "attn_out")) == "model.layers.0.post_attention_layernorm"
    assert get_family("Qwen2_5_VLForConditionalGeneration").module_path(Site(1, "mlp_out")) == \
        "model.language_model.layers.1.mlp"
    with pytest.raises(ValueError, match="already registered"):
        register_family(ArchitectureMap(name=fam.name, layers="x", final_norm="y",
                                        site_modules=dict.fromkeys(SITE_KINDS, "")))
    with pytest.raises(MechmedError, match="not supported"):
        get_family("LlamaForCausalLM")


def test_layer_count_from_nested_config_without_weights():
    from transformers import Gemma3Config, Gemma3TextConfig

    cfg = Gemma3Config(text_config=Gemma3TextConfig(num_hidden_layers=34, hidden_size=2560).to_dict())
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    fam = get_family(cfg)
    assert fam.n_layers(cfg) == 34 and fam.d_model(cfg) == 2560


@pytest.mark.parametrize("name", FAMILIES)
def test_every_mapped_path_resolves(tiny_models, name):
    model, _ = tiny_models[name]
    fam = get_family(model)
    assert fam.name == name
    paths = [fam.layers, fam.final_norm, fam.lm_head, fam.embed_tokens]
    paths += [p for p in (fam.vision_tower, fam.projector) if p]
    paths += [fam.module_path(s) for s in fam.sites(model.config, SITE_KINDS)]
    for path in paths:
        model.get_submodule(path)
    assert len(fam.layer_modules(model)) == fam.n_layers(model.config)
    if fam.vision_tower:
        # the decoder-layer path must not match the vision tower's layers
        assert not fam.layers.startswith(fam.vision_tower)


def _inputs(bundle):
    images = [make_image(i) for i in range(2)] if bundle.multimodal else None
    return build_inputs(bundle.processor, QUESTIONS[:2], images)


@pytest.mark.parametrize("name", FAMILIES)
def test_resid_post_equals_hidden_states(tiny_bundles, name):
    b = tiny_bundles[name]
    inputs = _inputs(b)
    sites = b.family.sites(b.model.config, SITE_KINDS)
    acts, _ = capture(b, inputs, sites)
    with torch.no_grad():
        hs = b.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
    n = b.n_layers
    assert len(hs) == n + 1
    for layer in range(n - 1):  # the last hidden state is after the final norm
        torch.testing.assert_close(acts[Site(layer)], hs[layer + 1], atol=1e-6, rtol=0)
    # The block adds attn_out then mlp_out to its input: resid_post(L) = resid_post(L-1) + attn + mlp.
    for layer in range(n):
        prev = hs[0] if layer == 0 else acts[Site(layer - 1)]
        total = prev + acts[Site(layer, "attn_out")] + acts[Site(layer, "mlp_out")]
        torch.testing.assert_close(total, acts[Site(layer)], atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_even_on_error(tiny_bundles):
    b = tiny_bundles["Gemma3ForCausalLM"]
    module = b.model.get_submodule(b.family.module_path(Site(0)))
    before = dict(module._forward_hooks)  # transformers keeps its own output-capturing hook

    def boom(site, act):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError), hooks(b.model, b.family, {Site(0): boom}):
        b.model(**_inputs(b))
    assert dict(module._forward_hooks) == before

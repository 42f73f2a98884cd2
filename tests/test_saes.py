"""SAE loading (sae-lens directories, raw Gemma Scope files, pretrained specs), checks against a
model, --saes specs, and training with sae-lens's trainer on a tiny model's activations."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from mechmed.errors import MechmedError
from mechmed.sites import Site

D = 64  # the tiny models' width


def _topk_sae(d_in=D, d_sae=32, k=4, layer=1, seed=0):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=Site(layer).hook_name) if layer is not None else SAEMetadata()
    return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta)).eval()


def _raw_params(d_in=D, d_sae=16, upper=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = {"w_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "w_dec": torch.randn(d_sae, d_in, generator=g),
         "b_enc": torch.randn(d_sae, generator=g) * 0.1, "b_dec": torch.randn(d_in, generator=g),
         "threshold": torch.rand(d_sae, generator=g) * 0.5}
    if upper:
        p = {("W" + k[1:] if k.startswith("w_") else k): v for k, v in p.items()}
    return p


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ----------------------------------------------------------------------------- hook names


@pytest.mark.parametrize("name,site", [
    ("blocks.17.hook_resid_post", Site(17)),
    ("blocks.3.hook_mlp_out", Site(3, "mlp_out")),
    ("model.layers.17", Site(17)),
    ("model.language_model.layers.5", Site(5)),
    ("model.layers.17.output", Site(17)),
    ("model.language_model.layers.2.mlp", Site(2, "mlp_out")),
    ("model.layers.4.post_attention_layernorm", Site(4, "attn_out")),
    ("blocks.17.attn.hook_z", None),
    ("model.vision_tower.encoder.layers.1.self_attn.q_proj", None),
    ("model.vision_tower.encoder.layers.1", None),
    ("", None),
    (None, None),
])
def test_hook_site(name, site):
    from mechmed.saes import hook_site

    assert hook_site(name) == site


# ----------------------------------------------------------------------------- loading


def test_raw_gemma_scope_file_loads_as_jumprelu(tmp_path):
    from sae_lens import JumpReLUSAE
    from safetensors.torch import save_file

    from mechmed.saes import load_sae, sae_hook_name

    p = _raw_params()
    d = tmp_path / "resid_post" / "layer_2_width_16k_l0_small"
    d.mkdir(parents=True)
    save_file(p, str(d / "params.safetensors"))
    for spec in (d / "params.safetensors", d):
        sae = load_sae(spec)
        assert isinstance(sae, JumpReLUSAE)
        assert sae_hook_name(sae) == "blocks.2.hook_resid_post"
        assert (sae.cfg.d_in, sae.cfg.d_sae) == (D, 16)
    x = torch.randn(5, D)
    pre = x @ p["w_enc"] + p["b_enc"]
    f = torch.relu(pre) * (pre > p["threshold"])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f)
        torch.testing.assert_close(sae.decode(sae.encode(x)), f @ p["w_dec"] + p["b_dec"])


def test_raw_gemma_scope_uppercase_keys_and_config_hook(tmp_path):
    from safetensors.torch import save_file

    from mechmed.saes import load_sae, sae_hook_name

    save_file(_raw_params(upper=True), str(tmp_path / "params.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"hf_hook_point_in": "model.language_model.layers.1.output"}))
    sae = load_sae(tmp_path / "params.safetensors")
    assert sae_hook_name(sae) == "blocks.1.hook_resid_post"


def test_raw_file_missing_keys(tmp_path):
    from safetensors.torch import save_file

    from mechmed.saes import load_sae

    p = _raw_params()
    del p["threshold"]
    save_file(p, str(tmp_path / "params.safetensors"))
    with pytest.raises(MechmedError, match="missing threshold"):
        load_sae(tmp_path / "params.safetensors")


def test_sae_lens_directory_round_trip(tmp_path):
    from mechmed.saes import load_sae

    sae = _topk_sae()
    sae.save_model(str(tmp_path / "sae"))
    back = load_sae(tmp_path / "sae")
    x = torch.randn(7, D)
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x))
    assert back.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


def test_load_errors(tmp_path):
    from mechmed.saes import load_sae

    with pytest.raises(MechmedError, match="no such file"):
        load_sae(tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MechmedError, match="neither cfg.json"):
        load_sae(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(MechmedError, match="expected a params.safetensors"):
        load_sae(tmp_path / "x.txt")


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    from mechmed.saes import load_sae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MechmedError, match="HF_HUB_OFFLINE"):
        load_sae(("gemma-scope-2-4b-it-res", "layer_17_width_16k_l0_big"))
    with pytest.raises(MechmedError, match="HF_HUB_OFFLINE"):
        load_sae("gemma-scope-2-4b-it-res/layer_17_width_16k_l0_big")  # RELEASE/ID of a known release
    with pytest.raises(MechmedError, match="has no SAE"):
        load_sae("gemma-scope-2-4b-it-res:layer_18_width_16k_l0_big")


def test_release_template_lists_layers_without_download():
    from mechmed.saes import sae_sources

    src = sae_sources("gemma-scope-2-4b-it-res:layer_{L}_width_16k_l0_big", 34)
    assert sorted(src) == [9, 17, 22, 29]
    assert src[17] == ("gemma-scope-2-4b-it-res", "layer_17_width_16k_l0_big")
    assert len(sae_sources("gemma-scope-2-4b-it-res-all:layer_{L}_width_16k_l0_big", 34)) == 34


# ----------------------------------------------------------------------------- checks


def test_check_sae_width_hook_layer(vlm, caplog):
    from mechmed.saes import check_sae

    check_sae(_topk_sae(layer=1), vlm, Site(1))
    with pytest.raises(MechmedError, match=r"layer 1.*d_in=32.*width 64"):
        check_sae(_topk_sae(d_in=32, layer=1), vlm, Site(1))
    with pytest.raises(MechmedError, match=r"reads blocks\.1\.hook_resid_post \(layer 1.*layer 2"):
        check_sae(_topk_sae(layer=1), vlm, Site(2))
    with pytest.raises(MechmedError, match="out of range"):
        check_sae(_topk_sae(layer=7), vlm, Site(7))
    with caplog.at_level(logging.WARNING, logger="mechmed.saes"):
        check_sae(_topk_sae(layer=None), vlm, Site(0))
    assert "no decoder-layer hook name" in caplog.text


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    for L in (0, 2):
        _topk_sae(layer=L, seed=L).save_model(str(root / f"layer_{L}"))
    return root


def test_resolve_directory_of_layers(vlm, sae_dir):
    from mechmed.saes import resolve_saes

    saes = resolve_saes(str(sae_dir), vlm)
    assert sorted(saes) == [0, 2]
    assert sorted(resolve_saes(str(sae_dir), vlm, "2")) == [2]
    with pytest.raises(MechmedError, match=r"no SAE for layer 1 \(it has layers 0,2\)"):
        resolve_saes(str(sae_dir), vlm, "0-1")
    with pytest.raises(MechmedError, match="out of range"):
        resolve_saes(str(sae_dir), vlm, "5")
    # a path template and a single SAE directory
    assert sorted(resolve_saes(str(sae_dir / "layer_{L}"), vlm)) == [0, 2]
    assert sorted(resolve_saes(str(sae_dir / "layer_2"), vlm)) == [2]


def test_resolve_rejects_mismatched_saes(vlm, tmp_path):
    from mechmed.saes import resolve_saes

    _topk_sae(layer=1).save_model(str(tmp_path / "wrong_layer" / "layer_0"))
    with pytest.raises(MechmedError, match="layer 0"):
        resolve_saes(str(tmp_path / "wrong_layer"), vlm)
    _topk_sae(d_in=48, layer=0).save_model(str(tmp_path / "narrow" / "layer_0"))
    with pytest.raises(MechmedError, match="d_in=48"):
        resolve_saes(str(tmp_path / "narrow"), vlm)
    with pytest.raises(MechmedError, match="not demo, not a directory"):
        resolve_saes("no-such-thing", vlm)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_acts(vlm):
    from conftest import QUESTIONS, make_image
    from mechmed.data.texts import GENERAL, MEDICAL
    from mechmed.readout import build_inputs
    from mechmed.saes import collect_activations, text_inputs

    batches = [text_inputs(vlm.processor, list(MEDICAL[:32])), text_inputs(vlm.processor, list(GENERAL[:32])),
               build_inputs(vlm.processor, QUESTIONS, [make_image(i) for i in range(len(QUESTIONS))])]
    return collect_activations(vlm, batches, [0, 1, 2])


def test_collect_activations_skips_padding_and_bos(vlm, tiny_acts):
    from mechmed.saes import text_inputs, token_mask

    inputs = text_inputs(vlm.processor, ["is there a nodule ?", "no"])
    mask = token_mask(inputs, vlm.tokenizer)
    assert int(mask.sum()) == int(inputs["attention_mask"].sum()) - 2  # two BOS tokens dropped
    assert not bool((inputs["input_ids"][mask] == vlm.tokenizer.bos_token_id).any())
    assert {L: x.shape[1] for L, x in tiny_acts.items()} == {0: D, 1: D, 2: D}
    assert len({x.shape[0] for x in tiny_acts.values()}) == 1


def test_train_topk_saes_with_sae_lens_trainer(tiny_acts, vlm, tmp_path):
    from sae_lens import TopKSAE

    from mechmed.saes import SAETrainConfig, check_sae, load_sae, save_sae_set, train_saes

    cfg = SAETrainConfig(kind="topk", d_sae=128, k=8, steps=120, batch_size=256, n_image_prompts=1)
    t0 = time.perf_counter()
    out = train_saes(tiny_acts, cfg, seed=0)
    assert time.perf_counter() - t0 < 30
    assert sorted(out.saes) == [0, 1, 2]
    for L, sae in out.saes.items():
        assert isinstance(sae, TopKSAE)
        check_sae(sae, vlm, Site(L))
        st = out.stats["layers"][L]
        assert st["l0_heldout"] <= 8
        assert st["r2_heldout"] > 0.5, st
    save_sae_set(out.saes, tmp_path, {"recipe": cfg.to_dict()})
    back = load_sae(tmp_path / "layer_1")
    x = tiny_acts[1][:50]
    with torch.no_grad():
        torch.testing.assert_close(back(x), out.saes[1](x))
    # the same seed gives the same SAE
    again = train_saes({1: tiny_acts[1]}, cfg, seed=0)
    assert sorted(again.saes) == [1]


def test_training_layers_in_two_processes_gives_the_same_saes(tiny_acts):
    """Layers split between processes see the same batches and initial weights: bit-identical SAEs
    and statistics to one process."""
    import torch

    from mechmed.saes import SAETrainConfig, train_saes

    cfg = SAETrainConfig(d_sae=64, k=8, steps=40, batch_size=128)
    one = train_saes(tiny_acts, cfg, seed=3)
    two = train_saes(tiny_acts, cfg, seed=3, workers=2)
    assert (one.stats["workers"], two.stats["workers"]) == (1, 2)
    assert sorted(two.saes) == sorted(one.saes) == [0, 1, 2]
    for layer, sae in one.saes.items():
        theirs = two.saes[layer].state_dict()
        for name, w in sae.state_dict().items():
            assert torch.equal(w, theirs[name]), (layer, name)
        assert two.stats["layers"][layer] == one.stats["layers"][layer]


@pytest.mark.parametrize("kind", ["batchtopk", "jumprelu"])
def test_train_kinds_saved_as_jumprelu(tiny_acts, kind):
    from sae_lens import JumpReLUSAE

    from mechmed.saes import SAETrainConfig, train_saes

    out = train_saes({0: tiny_acts[0]}, SAETrainConfig(kind=kind, d_sae=64, k=8, steps=60, batch_size=256))
    assert isinstance(out.saes[0], JumpReLUSAE)  # BatchTopK's inference form is a JumpReLU SAE
    assert out.saes[0].cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    if kind == "batchtopk":
        assert 2 < out.stats["layers"][0]["l0_heldout"] < 16


def test_train_config_validation():
    from mechmed.saes import SAETrainConfig

    with pytest.raises(MechmedError, match="kind"):
        SAETrainConfig(kind="relu")
    with pytest.raises(MechmedError, match="k=600"):
        SAETrainConfig(k=600, d_sae=512)
    cfg = SAETrainConfig(d_sae=256)
    assert SAETrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.digest() != SAETrainConfig().digest()


# ----------------------------------------------------------------------------- the embedded default


@pytest.mark.slow
def test_demo_saes_reach_the_bar(demo_model_dir):
    """The demo SAEs of the default recipe (trained by train_saes on first use, and cached: the set the
    digest test below pins bit for bit) reach the bars: R² ≥ 0.9 at every layer on every text set,
    mean L0 well below d_sae/10."""
    from mechmed.demo.saes import ensure_demo_saes
    from mechmed.fidelity import evaluate_saes, prompt_set
    from mechmed.models import load_model
    from mechmed.saes import MANIFEST, SAETrainConfig, resolve_saes

    cfg = SAETrainConfig()
    path = ensure_demo_saes()
    assert SAETrainConfig.from_dict(json.loads((path / MANIFEST).read_text())["recipe"]).digest() == cfg.digest()
    b = load_model(str(demo_model_dir), local_files_only=True)
    saes = resolve_saes(str(path), b)
    assert sorted(saes) == list(range(b.n_layers)) and b.n_layers >= 6
    for name in ("medical", "general", "images"):
        rows = evaluate_saes(b, saes, prompt_set(name), batch_size=32, ce=False).rows
        for r in rows:
            assert r["r2"] >= 0.9 and r["r2_pooled"] >= 0.9, (name, r["layer"], r["r2"])
            assert r["l0"] <= cfg.d_sae / 16, (name, r["layer"], r["l0"])


@pytest.mark.slow
def test_the_demo_sae_set_reproduces_the_recorded_digest(demo_model_dir):
    """The seed-0 demo SAEs (default recipe, the cache ``mechmed demo`` reads), trained in deterministic
    CPU mode: bit for bit the set docs/demo.md records."""
    from conftest import recorded_digest
    from mechmed.demo.saes import ensure_demo_saes
    from mechmed.saes import MANIFEST

    manifest = json.loads((ensure_demo_saes() / MANIFEST).read_text())
    assert manifest["determinism"]["mode"] == "deterministic"
    assert manifest["weights_sha256"] == recorded_digest("SAE set")


@pytest.mark.slow
def test_ensure_demo_saes_caches_atomically(demo_model_dir):
    from mechmed.demo.saes import ensure_demo_saes
    from mechmed.saes import MANIFEST, resolve_saes

    recipe = dict(d_sae=64, k=4, steps=15, n_image_prompts=16, n_corpus_reports=8, oov_rates=(0.5,))
    first = ensure_demo_saes(**recipe)
    assert first.parent == demo_model_dir.parent and first.name.startswith(demo_model_dir.name + "-saes-")
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["recipe"]["steps"] == 15 and manifest["model_dir"] == str(demo_model_dir)
    # no temp dirs left (the build lock's file, .NAME.lock, stays: filelock keeps it on POSIX)
    assert not [p for p in first.parent.iterdir() if p.name.startswith(f".{first.name}.") and p.is_dir()]
    t0 = time.perf_counter()
    assert ensure_demo_saes(**recipe) == first
    assert time.perf_counter() - t0 < 10  # read from the cache, not retrained
    from mechmed.models import load_model

    saes = resolve_saes(str(first), load_model(str(demo_model_dir), local_files_only=True))
    assert sorted(saes) == list(range(len(saes))) and saes[0].cfg.d_sae == 64

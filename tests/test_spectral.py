"""Spectral mixture of LoRA experts on tiny real models: initialisation, routing, compensation,
save/load, training, option errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import _build
from mechmed.config import TrainConfig
from mechmed.errors import MechmedError
from mechmed.spectral import (
    SpectralMoELinear,
    apply_spectral_adapter,
    balance_loss,
    expert_utilisation,
    init_margin_deviation,
    rule_scale,
)
from mechmed.train import apply_adapter, train

FAMILIES_2 = ("Gemma3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
PROMPTS = ["Is there a pleural effusion?", "Is the heart normal?", "Does this image show cardiomegaly?"]


def _linear(m=40, n=48, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g) / n ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(m, generator=g))
    return lin.requires_grad_(False)


def _layer(init="spectral", n_experts=4, top_k=2, rank=8, scale=3.0, damping=1.0, **kw):
    return SpectralMoELinear(_linear(**kw), n_experts=n_experts, top_k=top_k, rank=rank, scale=scale, init=init,
                             damping=damping, generator=torch.Generator().manual_seed(1))


def _cfg(**kw):
    spectral = kw.pop("spectral", {"n_experts": 4})
    return TrainConfig(**{"layers": [1], "method": "spectral_moe", "rank": 8, "spectral": spectral, **kw})


@pytest.mark.parametrize("init", ["spectral", "principal", "minor"])
def test_segments_are_disjoint_svd_pieces_and_the_residual_reconstructs_w0(init):
    N, r, s, rho = 4, 8, 3.0, 2.0
    layer = _layer(init, n_experts=N, rank=r, scale=s, damping=rho)
    W0 = layer.base_layer.weight.double()
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    d, r_e = min(W0.shape), r // N
    first = {"spectral": None, "principal": 0, "minor": d - r}[init]
    want = [(i * (d // N), i * (d // N) + r_e) if first is None else (first + i * r_e, first + (i + 1) * r_e)
            for i in range(N)]
    assert layer.segments == want
    covered = [set(range(a, b)) for a, b in layer.segments]
    assert all(not (covered[i] & covered[j]) for i in range(N) for j in range(i + 1, N))
    for i, (a, b) in enumerate(layer.segments):
        B, A = (t.double() for t in layer.expert(i))
        # s·B_i A_i is the segment's part of W0, damped by ρ
        torch.testing.assert_close(s * B @ A, U[:, a:b] @ torch.diag(S[a:b]) @ Vh[a:b] / rho, atol=1e-6, rtol=0)
        for j in range(i + 1, N):  # different experts span orthogonal input directions
            assert (A @ layer.expert(j)[1].double().T).abs().max() < 1e-6


@pytest.mark.parametrize("init", ["random", "zero_b"])
def test_random_inits_and_zero_b(init):
    layer = _layer(init)
    assert layer.segments is None
    assert layer.lora_A.abs().max() <= 1 / 48 ** 0.5
    if init == "zero_b":
        assert torch.count_nonzero(layer.lora_B) == 0
    else:
        assert layer.lora_B.abs().max() > 0


def test_router_weights_sum_to_one_over_exactly_k_experts():
    for k in (1, 2, 3):
        layer = _layer(n_experts=5, top_k=k, rank=10)
        x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(k))
        gates, probs, top = layer.gates(x)
        assert gates.shape == (3, 7, 5)
        assert torch.equal((gates > 0).sum(-1), torch.full((3, 7), k))
        torch.testing.assert_close(gates.sum(-1), torch.ones(3, 7), atol=1e-6, rtol=0)
        # the selected experts are the k most probable, weighted in proportion to their probability
        kth = probs.topk(k, -1).values[..., -1:]
        assert torch.all((gates > 0) == (probs >= kth))
        sel = torch.where(gates > 0, probs, 0)
        torch.testing.assert_close(gates, sel / sel.sum(-1, keepdim=True))


@pytest.mark.parametrize("n_experts", [4, 8, 16, 32])
def test_router_softmax_equals_torch_softmax_with_its_gradient(n_experts):
    from mechmed.spectral import _softmax_last

    x = torch.randn(3, 7, n_experts, generator=torch.Generator().manual_seed(n_experts), requires_grad=True)
    g = torch.randn(3, 7, n_experts, generator=torch.Generator().manual_seed(1))
    got = _softmax_last(x)
    (grad,) = torch.autograd.grad((got * g).sum(), x)
    want = torch.exp(x) / torch.exp(x).sum(-1, keepdim=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # d/dx of Σ g·softmax(x) = p ⊙ (g − Σ g·p)
    p = want.detach()
    torch.testing.assert_close(grad, p * (g - (g * p).sum(-1, keepdim=True)), atol=1e-6, rtol=0)


def _by_hand(layer, x, compensation="routed"):
    """The layer's output written out expert by expert (float64): W0 x + b + s Σ_{topk} g_i B_i A_i x minus
    each routed expert's initial product at its gate (``routed``) or (s/N) Σ_i B⁰_i A⁰_i x (``mean``)."""
    x = x.double()
    W0, b = layer.base_layer.weight.double(), layer.base_layer.bias
    y = x @ W0.T + (0 if b is None else b.double())
    probs = torch.softmax(x @ layer.router.weight.double().T, -1)
    top_p, top_i = probs.topk(layer.top_k, -1)
    g = top_p / top_p.sum(-1, keepdim=True)
    r_e, s, N = layer.expert_rank, layer.scale, layer.n_experts
    for i in range(N):
        sl = slice(i * r_e, (i + 1) * r_e)
        BA = layer.lora_B[:, sl].double() @ layer.lora_A[sl].double()
        BA0 = layer.init_B[:, sl].double() @ layer.init_A[sl].double()
        gi = (g * (top_i == i)).sum(-1, keepdim=True)
        y = y + s * gi * (x @ BA.T)
        y = y - (s * gi * (x @ BA0.T) if compensation == "routed" else s / N * (x @ BA0.T))
    return y


@pytest.mark.parametrize("init", ["spectral", "principal", "minor", "random", "zero_b"])
@pytest.mark.parametrize("damping", [0.3, 1.0, 10.0])
def test_layer_is_w0_at_init_under_the_real_router(init, damping):
    """At initialisation the top-k router's output is W0 x + b for every init and damping (tolerance
    1e-5; |y| up to ~5 on this 64-wide layer), and so is the uniform routing mode; after the experts
    move, the output is the formula written out expert by expert (1e-5)."""
    layer = SpectralMoELinear(_linear(64, 64, bias=True), n_experts=8, top_k=2, rank=16, scale=3.0, init=init,
                              damping=damping, generator=torch.Generator().manual_seed(1)).eval()
    x = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = layer.base_layer(x)
        assert (layer(x) - base).abs().max() <= 1e-5
        layer.routing = "uniform"
        assert (layer(x) - base).abs().max() <= 1e-5
        layer.routing = "topk"
        g = torch.Generator().manual_seed(7)
        for p in (layer.lora_A, layer.lora_B, layer.router.weight):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        moved = layer(x)
        torch.testing.assert_close(moved.double(), _by_hand(layer, x), atol=1e-5, rtol=0)
        assert (moved - base).abs().max() > 1e-2  # trained experts change the layer
        layer.disabled = True
        assert torch.equal(layer(x), base)


def test_goat_parity():
    """mechmed's spectral experts against GOAT's construction, rebuilt here from its published code
    (Fan et al. 2025, "Make LoRA Great Again", github.com/Facico/GOAT-PEFT, goat/peta/src/goat/layer.py,
    ``GOATLayer.update_layer`` with ``init_type="goat"``):

        scaling s = √(3·η·n / (r/N))             (per-expert rank r/N)
        V, S, Uh = svd(W0); Vlen = d // N; Mlen = r // N
        expert i: directions [i·Vlen, i·Vlen + Mlen);  S_r /= s·ρ  (ρ = 10)
        A = diag(√S_r) Uh_r;  B = V_r diag(√S_r)      (expert i: rows / columns of its segment)
        W0 ← W0 − s·B A                               (every expert removed from the frozen weight)
        forward: W0' x + s Σ_{topk} g_i B_i A_i x

    The factors and the scale are GOAT's (d = 48 with N = 5 experts, N not dividing d). The forward
    deliberately differs: mechmed subtracts each routed expert's initial product at its gate instead of
    every initial product at weight 1, so that the initial model is W0 exactly; the difference is
    s Σ_i (1 − g_i) B⁰_i A⁰_i x, which does not depend on the trainable factors, so their gradients are
    GOAT's (checked below)."""
    m, n, N, r, eta, rho = 40, 48, 5, 10, 1.0, 10.0
    lin = _linear(m, n, bias=False)
    W0 = lin.weight.detach().clone()
    s = math.sqrt(3 * eta * n / (r // N))
    # GOAT (float32, as its code)
    V, S, Uh = torch.linalg.svd(W0.float(), full_matrices=False)
    Vlen, Mlen = V.shape[-1] // N, r // N
    Vr = torch.cat([V[:, i * Vlen:i * Vlen + Mlen] for i in range(N)], dim=1)
    Sr = torch.cat([S[i * Vlen:i * Vlen + Mlen] for i in range(N)]) / (s * rho)
    Uhr = torch.cat([Uh[i * Vlen:i * Vlen + Mlen] for i in range(N)], dim=0)
    goat_A, goat_B = torch.diag(Sr.sqrt()) @ Uhr, Vr @ torch.diag(Sr.sqrt())
    goat_W = W0 - s * goat_B @ goat_A

    layer = SpectralMoELinear(lin, n_experts=N, top_k=2, rank=r, scale=rule_scale(n, r // N, eta), init="spectral",
                              damping=rho, generator=torch.Generator().manual_seed(1))
    assert layer.scale == pytest.approx(s, rel=1e-12)
    assert layer.segments == [(i * Vlen, i * Vlen + Mlen) for i in range(N)]
    # the factors are GOAT's up to the sign of each singular pair. Compared on GOAT's construction in
    # float64, which mechmed runs before rounding to float32, so they agree to float32's rounding (two
    # ulps, 2.4e-7 relative); GOAT's float32 SVD adds its own error, which depends on the LAPACK path
    V64, S64, Uh64 = torch.linalg.svd(W0.double(), full_matrices=False)
    Sr64 = torch.cat([S64[i * Vlen:i * Vlen + Mlen] for i in range(N)]) / (s * rho)
    A64 = Sr64.sqrt()[:, None] * torch.cat([Uh64[i * Vlen:i * Vlen + Mlen] for i in range(N)], dim=0)
    B64 = torch.cat([V64[:, i * Vlen:i * Vlen + Mlen] for i in range(N)], dim=1) * Sr64.sqrt()
    sign = torch.sign((layer.lora_A.detach().double() * A64).sum(-1))
    torch.testing.assert_close(layer.lora_A.double(), sign[:, None] * A64, atol=0, rtol=2.4e-7)
    torch.testing.assert_close(layer.lora_B.double(), B64 * sign, atol=0, rtol=2.4e-7)
    sign = torch.sign((layer.lora_A.detach() * goat_A).sum(-1))  # to GOAT's float32 signs, used below

    x = torch.randn(6, n, generator=torch.Generator().manual_seed(2))

    def goat_forward(A, B):
        probs = torch.softmax(x @ layer.router.weight.T, -1)
        w, sel = probs.topk(2, -1)
        w = w / w.sum(-1, keepdim=True)
        out = x @ goat_W.T
        for i in range(N):
            gi = (w * (sel == i)).sum(-1, keepdim=True)
            sl = slice(i * Mlen, (i + 1) * Mlen)
            out = out + s * gi * (x @ (B[:, sl] @ A[sl]).T)
        return out, probs.topk(2, -1)

    # at initialisation GOAT's layer is not W0 (the unrouted share of every expert is missing); mechmed's is
    goat_init, _ = goat_forward(goat_A, goat_B)
    with torch.no_grad():
        assert (layer(x) - x @ W0.T).abs().max() <= 1e-5
    assert (goat_init - x @ W0.T).abs().max() > 1e-2

    # with moved experts: mechmed − GOAT = s Σ_i (1 − g_i) B⁰_i A⁰_i x, and the factor gradients agree
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    A = (layer.lora_A.detach() * sign[:, None]).requires_grad_(True)  # GOAT's signs
    B = (layer.lora_B.detach() * sign).requires_grad_(True)
    goat_out, (top_p, top_i) = goat_forward(A, B)
    gates = torch.zeros(6, N).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
    BA0 = [goat_B[:, i * Mlen:(i + 1) * Mlen] @ goat_A[i * Mlen:(i + 1) * Mlen] for i in range(N)]
    gap = s * sum((1 - gates[:, i:i + 1]) * (x @ BA0[i].T) for i in range(N))
    ours = layer(x)
    torch.testing.assert_close(ours, goat_out + gap, atol=1e-4, rtol=0)
    w = torch.randn(6, m, generator=torch.Generator().manual_seed(5))
    (ours * w).sum().backward()
    (goat_out * w).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad * sign[:, None], A.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad * sign, B.grad, atol=1e-4, rtol=1e-4)


def _frozen_bundle(name):
    from mechmed.models import bundle

    b = bundle(*_build(name))
    for p in b.model.parameters():
        p.requires_grad_(False)
    return b


def _logits(model, b, prompts=PROMPTS):
    from mechmed.readout import build_inputs

    with torch.no_grad():
        return model(**build_inputs(b.processor, prompts), logits_to_keep=1, use_cache=False).logits[:, -1]


@pytest.mark.parametrize("name", FAMILIES_2)
def test_adapted_model_is_the_base_model_at_init(name):
    b = _frozen_bundle(name)
    base = _logits(b.model, b)
    model, names = apply_adapter(b, _cfg(layers=[0, 2]))
    torch.testing.assert_close(_logits(model, b), base, atol=1e-5, rtol=0)
    with model.routing("uniform"):
        torch.testing.assert_close(_logits(model, b), base, atol=1e-5, rtol=0)
    with model.disable_adapter():
        assert torch.equal(_logits(model, b), base)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["spectral", "principal", "minor", "random"])
def test_demo_model_answers_unchanged_at_init(init, demo_model_dir, demo_data_dir):
    """On the embedded default with the real router (layers 1-3, damping 1 and 10): no margin moves by
    more than 1e-4 logits and no answer changes before training, over 120 held-out pairs."""
    from mechmed.data import load_pairs
    from mechmed.models import load_model

    pairs = load_pairs(demo_data_dir / "pairs.jsonl")[:120]
    for damping in (1.0, 10.0):
        b = load_model(str(demo_model_dir))
        model, _ = apply_spectral_adapter(b, TrainConfig.from_dict(
            {"layers": [1, 2, 3], "method": "spectral_moe", "rank": 8,
             "spectral": {"init": init, "damping": damping}}))
        dev = init_margin_deviation(model, b, pairs)
        assert dev["n_margins"] == 240 and dev["base_mean_abs_margin"] > 1.0
        assert dev["max_abs"] <= 1e-4 and dev["sign_changes"] == 0, dev


@pytest.mark.parametrize("name", FAMILIES_2)
def test_apply_adapter_adapts_exactly_layers_times_targets(name):
    b = _frozen_bundle(name)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    model, names = apply_adapter(b, _cfg(layers=[0, 2], target_modules=targets))
    assert len(names) == 2 * len(targets) == len(model.adapter_layers())
    assert sorted(names) == sorted(model.adapter_layers())
    assert all(n.startswith(b.family.layers + ".0.") or n.startswith(b.family.layers + ".2.") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 2)[-2:] in (["lora_A"], ["lora_B"], ["router", "weight"])
                             or n.endswith((".lora_A", ".lora_B", ".router.weight")) for n in trainable)
    assert len(trainable) == 3 * len(names)
    with pytest.raises(MechmedError, match="target_modules"):
        apply_adapter(_frozen_bundle(name), _cfg(target_modules=["q_proj", "nonexistent_proj"]))


@pytest.mark.parametrize("name", FAMILIES_2)
def test_save_and_attach_adapter_round_trip_exactly(name, tmp_path):
    from safetensors.torch import load_file

    from mechmed.models import attach_adapter

    b = _frozen_bundle(name)
    model, names = apply_adapter(b, _cfg(layers=[1, 2], seed=4))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # as if trained: experts and routers moved away from their initial values
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    before = _logits(model, b)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"lora_A", "lora_B", "weight", "init_A", "init_B"}
    assert not any(k.endswith("base_layer.weight") for k in saved)  # no copy of W0
    conf = json.loads((tmp_path / "adapter" / "spectral_config.json").read_text())
    assert conf["adapter_type"] == "mechmed_spectral_moe" and sorted(conf["modules"]) == sorted(names)
    assert conf["format_version"] == 2 and not (tmp_path / "adapter" / "adapter_config.json").exists()
    assert "attach_adapter" in (tmp_path / "adapter" / "README.md").read_text()

    loaded = attach_adapter(_frozen_bundle(name), tmp_path / "adapter")
    assert sorted(loaded.model.adapter_layers()) == sorted(names)
    assert torch.equal(_logits(loaded.model, loaded), before)
    for n, layer in loaded.model.adapter_layers().items():
        assert torch.equal(layer.init_A, model.adapter_layers()[n].init_A)
        assert torch.equal(layer.init_B, model.adapter_layers()[n].init_B)


def test_format_1_adapter_loads_with_its_mean_compensation(tmp_path):
    """An adapter written before the routed compensation (``adapter_config.json``, format 1) computes
    W0 x + b − (s/N) Σ B⁰A⁰ x + s Σ_topk g B A x, as it was trained."""
    from mechmed.models import attach_adapter

    b = _frozen_bundle("Gemma3ForCausalLM")
    model, names = apply_adapter(b, _cfg(layers=[1]))
    model.save_pretrained(tmp_path / "a")
    conf = json.loads((tmp_path / "a" / "spectral_config.json").read_text())
    (tmp_path / "a" / "spectral_config.json").unlink()
    for meta in conf["modules"].values():  # format 1 recorded no compensation
        del meta["compensation"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**conf, "format_version": 1}))
    loaded = attach_adapter(_frozen_bundle("Gemma3ForCausalLM"), tmp_path / "a")
    layer = loaded.model.adapter_layers()[names[0]]
    assert layer.compensation == "mean"
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _by_hand(layer, x, "mean"), atol=1e-5, rtol=0)
        assert (layer(x) - layer.base_layer(x)).abs().max() > 1e-3
        before = layer(x)
    # saved again (format 2), it keeps the compensation it was trained with
    loaded.model.save_pretrained(tmp_path / "b")
    again = attach_adapter(_frozen_bundle("Gemma3ForCausalLM"), tmp_path / "b").model.adapter_layers()[names[0]]
    assert again.compensation == "mean"
    with torch.no_grad():
        assert torch.equal(again(x), before)


def test_wrong_loader_gives_one_line_errors(tmp_path):
    """peft refuses a spectral directory by its missing adapter_config.json; mechmed's spectral loader
    names peft's loader for a peft directory; an empty directory names both files."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from mechmed.models import attach_adapter
    from mechmed.spectral import load_spectral_adapter

    b = _frozen_bundle("Gemma3ForCausalLM")
    model, _ = apply_adapter(b, _cfg(layers=[1]))
    model.save_pretrained(tmp_path / "spectral")
    with pytest.raises(ValueError, match="adapter_config.json") as e:
        PeftModel.from_pretrained(_frozen_bundle("Gemma3ForCausalLM").model, str(tmp_path / "spectral"))
    assert "\n" not in str(e.value)
    peft_model = get_peft_model(_frozen_bundle("Gemma3ForCausalLM").model,
                                LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]))
    peft_model.save_pretrained(tmp_path / "peft")
    with pytest.raises(MechmedError, match="peft adapter: load it with mechmed.models.attach_adapter") as e:
        load_spectral_adapter(_frozen_bundle("Gemma3ForCausalLM").model, tmp_path / "peft")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MechmedError, match="neither adapter_config.json .peft. nor spectral_config.json"):
        attach_adapter(_frozen_bundle("Gemma3ForCausalLM"), tmp_path / "empty")


def test_balance_loss_matches_the_formula():
    N, k = 4, 2
    layer = _layer(n_experts=N, top_k=k).train()
    x = torch.randn(5, 9, 48, generator=torch.Generator().manual_seed(6))
    layer(x)
    got = balance_loss(layer)
    probs = torch.softmax(x @ layer.router.weight.T, -1).reshape(-1, N)
    top = probs.topk(k, -1).indices
    f = torch.stack([(top == i).any(-1).float().mean() / k for i in range(N)])
    torch.testing.assert_close(got, N * (f * probs.mean(0)).sum())
    assert got.requires_grad
    assert balance_loss(layer).item() == 0.0  # each value is used once
    # perfectly balanced routing gives 1
    layer.router.weight.data.zero_()
    layer(x)
    assert balance_loss(layer).item() == pytest.approx(1.0, abs=1e-6)


def test_bad_options_name_the_option():
    cases = [({"rank": 12, "spectral": {"n_experts": 8}}, "rank"),
             ({"spectral": {"n_experts": 4, "top_k": 5}}, "spectral.top_k"),
             ({"spectral": {"n_experts": 4, "init": "svd"}}, "spectral.init"),
             ({"spectral": {"n_experts": 4, "scaling": "fast"}}, "spectral.scaling"),
             ({"spectral": {"n_experts": 4, "damping": 0.0}}, "spectral.damping")]
    for kw, option in cases:
        with pytest.raises(MechmedError, match=f"config option {option}"):
            _cfg(**kw)
    # options changed after the config was built are checked again when the adapter is applied
    b = _frozen_bundle("Gemma3ForCausalLM")
    for attr, value, option in (("init", "svd", "spectral.init"), ("top_k", 9, "spectral.top_k"),
                                ("n_experts", 3, "rank")):
        cfg = _cfg()
        setattr(cfg.spectral, attr, value)
        with pytest.raises(MechmedError, match=f"config option {option}"):
            apply_spectral_adapter(b, cfg)
    # segments must fit: 64-wide layers split into 4 segments of at most 16 directions
    with pytest.raises(MechmedError, match="config option rank"):
        apply_spectral_adapter(b, _cfg(rank=80))
    cfg = TrainConfig.from_dict({"layers": [1], "method": "spectral_moe", "rank": 8,
                                 "spectral": {"n_experts": 4, "scaling": 2}})
    model, _ = apply_spectral_adapter(b, cfg)
    assert {m.scale for m in model.adapter_layers().values()} == {2.0}


def test_scaling_rule():
    b = _frozen_bundle("Gemma3ForCausalLM")
    model, _ = apply_spectral_adapter(b, _cfg(spectral={"n_experts": 4, "lr_ratio": 0.5}))
    for layer in model.adapter_layers().values():
        assert layer.scale == pytest.approx((3 * layer.in_features * 0.5 / (8 / 4)) ** 0.5)  # r/N = 2 per expert


def _train_cfg(ws, **kw):
    root, ckpt = ws
    base = dict(model=str(ckpt), layers=[1, 2], method="spectral_moe", rank=8, spectral={"n_experts": 4},
                lr=5e-3, batch_size=2, grad_accum=2, max_steps=3, eval_every=3, checkpoint_every=3, guard_pairs=8,
                train_data=str(root / "train_pairs.jsonl"), eval_data=str(root / "pairs.jsonl"))
    base.update(kw)
    return TrainConfig(**base)


def test_train_spectral_moe_writes_the_adapter_and_logs_the_balance_loss(tiny_workspace, tmp_path):
    from mechmed.consistency import load_image
    from mechmed.data import load_pairs
    from mechmed.figures import expert_heatmap as utilisation_figure
    from mechmed.models import attach_adapter, load_model
    from mechmed.readout import margins

    res = train(_train_cfg(tiny_workspace), tmp_path / "run")
    out = res.out
    assert res.metrics["n_adapted_modules"] == 2 * 7
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all("balance" in r and r["balance"] >= 1.0 - 1e-6 for r in log)
    dev = res.metrics["init_margin_deviation"]
    assert dev["n_margins"] == 16 and dev["max_abs"] < 1e-4 and dev["sign_changes"] == 0
    assert (out / "adapter" / "spectral_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    stats = json.loads((out / "expert_utilisation.json").read_text())
    assert set(stats["layers"]) == {"1", "2"} and len(stats["modules"]) == 14
    for row in stats["modules"].values():
        assert len(row) == 4 and sum(row) == pytest.approx(1.0)
    assert (out / "expert_utilisation.html").is_file()
    fig = utilisation_figure(stats)
    assert len(fig.data[0].z) == 2 and len(fig.data[0].z[0]) == 4

    # the written adapter reproduces the trained model's margins
    root, ckpt = tiny_workspace
    pairs = load_pairs(root / "pairs.jsonl")
    after = [json.loads(x) for x in (out / "after" / "pairs.jsonl").read_text().splitlines()]
    loaded = attach_adapter(load_model(str(ckpt)), out / "adapter")
    m = margins(loaded, [p.paraphrase for p in pairs], [load_image(p.image) for p in pairs]).numpy()
    assert m == pytest.approx([r["margin_paraphrase"] for r in after], abs=1e-5)
    assert expert_utilisation(loaded.model, loaded, pairs[:2])["tokens"] > 0
    deviation = init_margin_deviation(loaded.model, loaded, pairs[:2])
    assert deviation["n_margins"] == 4

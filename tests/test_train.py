"""Targeted training on a tiny real model: loss formulas, adapter placement, outputs, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAMILIES
from mechmed.config import TrainConfig
from mechmed.errors import MechmedError
from mechmed.train import apply_adapter, pair_loss, train


def _cfg(**kw):
    return TrainConfig(**{"layers": [1], **kw})


def test_losses_match_hand_formulas():
    g = torch.Generator().manual_seed(0)
    sq, sp = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    yq = torch.tensor([True, False, True, True, False])
    neg = torch.tensor([False, False, True, False, True])
    yp = yq ^ neg
    pq = torch.softmax(sq, -1).numpy()
    pp = torch.softmax(sp, -1).numpy()
    pp_aligned = np.where(neg.numpy()[:, None], pp[:, ::-1], pp)
    ce = 0.5 * (-np.log(pq[np.arange(5), (~yq).long().numpy()]).mean()
                - np.log(pp[np.arange(5), (~yp).long().numpy()]).mean())
    kl = lambda a, b: (a * np.log(a / b)).sum(-1)  # noqa: E731
    m = 0.5 * (pq + pp_aligned)
    expected = {
        "teacher_kl": kl(pq, pp_aligned).mean(),
        "sym_kl": (kl(pq, pp_aligned) + kl(pp_aligned, pq)).mean(),
        "js": (0.5 * kl(pq, m) + 0.5 * kl(pp_aligned, m)).mean(),
        "margin_mse": (((sq[:, 0] - sq[:, 1]) - torch.where(neg, -1.0, 1.0) * (sp[:, 0] - sp[:, 1])) ** 2).mean().item(),
    }
    from scipy.spatial.distance import jensenshannon

    js_scipy = np.mean([jensenshannon(a, b) ** 2 for a, b in zip(pq, pp_aligned)])
    assert expected["js"] == pytest.approx(js_scipy, rel=1e-6)
    for name, value in expected.items():
        parts = pair_loss(sq, sp, yq, yp, neg, _cfg(consistency=name, consistency_weight=0.5))
        assert parts.ce.item() == pytest.approx(ce, rel=1e-5)
        assert parts.consistency.item() == pytest.approx(value, rel=1e-5)
        assert parts.total.item() == pytest.approx(ce + 0.5 * value, rel=1e-5)


def test_teacher_kl_moves_only_the_paraphrase():
    """The stop-gradient KL pulls the paraphrase's answer toward the original question's: its gradient
    reaches the paraphrase's scores only, and by scipy's KL the paraphrase moves toward the question."""
    from scipy.special import rel_entr

    g = torch.Generator().manual_seed(1)
    sq = torch.randn(4, 2, generator=g, requires_grad=True)
    sp = torch.randn(4, 2, generator=g, requires_grad=True)
    yq = torch.tensor([True, False, True, False])
    neg = torch.tensor([False, True, False, False])
    parts = pair_loss(sq, sp, yq, yq ^ neg, neg, _cfg(consistency="teacher_kl", ce_weight=0.0))
    parts.total.backward()
    assert torch.count_nonzero(sq.grad) == 0 and torch.count_nonzero(sp.grad) > 0
    pq = torch.softmax(sq.detach(), -1).numpy()
    aligned = lambda s: np.where(neg.numpy()[:, None], s[:, ::-1], s)  # noqa: E731
    before = rel_entr(pq, aligned(torch.softmax(sp.detach(), -1).numpy())).sum(-1)
    after = rel_entr(pq, aligned(torch.softmax(sp.detach() - 0.5 * sp.grad, -1).numpy())).sum(-1)
    assert parts.consistency.item() == pytest.approx(before.mean(), rel=1e-5)
    assert np.all(after < before)


def test_lr_schedules():
    from mechmed.train import lr_factor

    assert [lr_factor("constant", s, 4) for s in range(4)] == [1.0] * 4
    assert [lr_factor("linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cosine = [float(np.cos(np.pi * s / 8) ** 2) for s in range(4)]  # ½(1 + cos πt) = cos²(πt/2)
    assert [lr_factor("cosine", s, 4) for s in range(4)] == pytest.approx(cosine, abs=1e-12)
    with pytest.raises(MechmedError, match="lr_schedule"):
        _cfg(lr_schedule="step")


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_lands_on_exactly_the_selected_decoder_layers(name):
    from conftest import _build
    from mechmed.models import bundle

    b = bundle(*_build(name))
    model, names = apply_adapter(b, _cfg(layers=[0, 2], rank=4))
    assert len(names) == 2 * 7
    assert all(".layers.0." in n or ".layers.2." in n for n in names)
    assert not any("vision" in n or "visual" in n for n in names)
    with pytest.raises(MechmedError, match="out of range"):
        apply_adapter(bundle(*_build(name)), _cfg(layers=[5]))


def _train_cfg(ws, **kw):
    root, ckpt = ws
    base = dict(model=str(ckpt), layers=[1, 2], rank=4, alpha=8.0, dropout=0.1, lr=5e-3, batch_size=2,
                grad_accum=2, epochs=2.0, eval_every=2, checkpoint_every=2, guard_pairs=8,
                train_data=str(root / "train_pairs.jsonl"), eval_data=str(root / "pairs.jsonl"))
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_a_complete_run_and_the_adapter_reloads(tiny_workspace, tmp_path):
    from peft import PeftModel

    from mechmed.models import load_model
    from mechmed.readout import margins

    cfg = _train_cfg(tiny_workspace)
    res = train(cfg, tmp_path / "run")
    out = tmp_path / "run"
    for f in ("metrics.json", "train_log.jsonl", "config.yaml", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors", "before/metrics.json", "after/metrics.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["n_adapted_modules"] == 14
    assert m["seed"] == cfg.seed and m["versions"]["torch"] == torch.__version__
    assert m["comparison"]["flip_rate"]["test"]["p_value"] is not None
    assert "versions" in (out / "config.yaml").read_text()
    base = json.loads((out / "adapter" / "base_model.json").read_text())
    assert base == m["model_provenance"] and base["model"] == cfg.model.name and base["prompt_format"]["kind"] == "chat"
    # a run's config.yaml reproduces the run's config (its recorded versions are not options)
    assert TrainConfig.load(out / "config.yaml").to_dict() == cfg.to_dict()
    assert not list(out.glob("*.tmp"))
    # plain peft loading gives the margins the run evaluated
    base = load_model(str(tiny_workspace[1]))
    peft_model = PeftModel.from_pretrained(base.model, str(out / "adapter")).eval()
    b2 = base.__class__(peft_model, base.processor, base.family, base.answers)
    rows = [json.loads(x) for x in (out / "after" / "pairs.jsonl").read_text().splitlines()]
    from mechmed.data import load_pairs

    pairs = load_pairs(tiny_workspace[0] / "pairs.jsonl")
    from mechmed.consistency import load_image

    got = margins(b2, [p.paraphrase for p in pairs], [load_image(p.image) for p in pairs])
    np.testing.assert_allclose(got.numpy(), [r["margin_paraphrase"] for r in rows], atol=1e-5)
    assert len(res.log) == 6 and all(np.isfinite(h["loss"]) for h in res.log)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_resume_after_interruption_is_identical(tiny_workspace, tmp_path, schedule):
    from safetensors.torch import load_file

    cfg = _train_cfg(tiny_workspace, eval_every=0, lr_schedule=schedule)
    full = train(cfg, tmp_path / "full", evaluate_before_after=False)
    part = train(cfg, tmp_path / "part", evaluate_before_after=False, stop_after=3)  # checkpoint at step 2
    assert part.metrics == {"interrupted_at": 3}
    resumed = train(cfg, tmp_path / "part", evaluate_before_after=False, resume=True)
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.log] == [h["loss"] for h in resumed.log]
    if schedule == "linear":  # a decaying schedule depends on the step count: another count is refused
        train(cfg, tmp_path / "cut", evaluate_before_after=False, stop_after=2)
        longer = _train_cfg(tiny_workspace, eval_every=0, lr_schedule=schedule, epochs=cfg.epochs + 1)
        with pytest.raises(MechmedError, match="lr_schedule linear depends on it"):
            train(longer, tmp_path / "cut", evaluate_before_after=False, resume=True)


def test_finished_run_is_not_overwritten(tiny_workspace, tmp_path):
    cfg = _train_cfg(tiny_workspace, max_steps=1)
    train(cfg, tmp_path / "r", evaluate_before_after=False)
    with pytest.raises(MechmedError, match="finished run"):
        train(cfg, tmp_path / "r", evaluate_before_after=False)


def test_activation_consistency_by_hand():
    """‖h_p − h_q‖² / ‖h_q‖² (or the mean squared difference) over layers and non-negated pairs; the
    gradient reaches the paraphrase's residuals only (the original's is stop-gradient)."""
    from mechmed.train import activation_consistency

    g = torch.Generator().manual_seed(0)
    hq = {1: torch.randn(4, 6, generator=g, requires_grad=True), 3: torch.randn(4, 6, generator=g, requires_grad=True)}
    hp = {k: torch.randn(4, 6, generator=g, requires_grad=True) for k in hq}
    neg = torch.tensor([False, True, False, False])
    keep = ~neg.numpy()
    q = {k: v.detach().numpy()[keep] for k, v in hq.items()}
    p = {k: v.detach().numpy()[keep] for k, v in hp.items()}
    normed = np.mean([((p[k] - q[k]) ** 2).sum(1) / (q[k] ** 2).sum(1) for k in hq])
    plain = np.mean([((p[k] - q[k]) ** 2).mean(1) for k in hq])
    assert activation_consistency(hq, hp, neg).item() == pytest.approx(normed, rel=1e-5)
    term = activation_consistency(hq, hp, neg, normalise=False)
    assert term.item() == pytest.approx(plain, rel=1e-5)
    term.backward()
    assert all(v.grad is None for v in hq.values())
    assert all(torch.count_nonzero(v.grad[1]) == 0 and torch.count_nonzero(v.grad[0]) > 0 for v in hp.values())
    # every pair negated: a zero term that still backpropagates
    assert activation_consistency(hq, {k: v.detach().requires_grad_() for k, v in hp.items()},
                                  torch.ones(4, dtype=torch.bool)).item() == 0.0
    sq = torch.randn(4, 2, generator=g)
    parts = pair_loss(sq, sq, torch.tensor([True, False, True, True]), torch.tensor([True, True, True, True]), neg,
                      _cfg(consistency="activation", consistency_weight=0.5), resid=(hq, hp))
    assert parts.consistency.item() == pytest.approx(normed, rel=1e-5)
    with pytest.raises(MechmedError, match="needs the residuals"):
        pair_loss(sq, sq, neg, neg, neg, _cfg(consistency="activation"))


def test_activation_layers_are_checked():
    with pytest.raises(MechmedError, match="activation_layers"):
        _cfg(layers=[2, 3], consistency="activation", activation_layers=[1, 3])
    assert _cfg(layers=[2, 3], consistency="activation").act_layers == [2, 3]
    assert _cfg(layers=[2, 3], consistency="teacher_kl", activation_layers=[1]).act_layers == [1]  # unused: no check
    with pytest.raises(MechmedError, match="activation_layers"):
        _cfg(activation_layers=[])


def test_activation_consistency_trains_on_the_residuals_output_hidden_states_gives(tiny_workspace, tmp_path):
    """The first step's logged term is ACT of its batch under the untrained adapter (LoRA B = 0: the
    base model), by hand from output_hidden_states; the run finishes and evaluates."""
    from mechmed.data import load_pairs
    from mechmed.data.images import load_image
    from mechmed.models import load_model
    from mechmed.readout import build_inputs
    from mechmed.train import _order

    cfg = _train_cfg(tiny_workspace, layers=[0, 1], consistency="activation", activation_layers=[0, 1],
                     consistency_weight=1.0, batch_size=4, grad_accum=1, max_steps=2, eval_every=2, dropout=0.0)
    res = train(cfg, tmp_path / "act", evaluate_before=False)
    assert json.loads((tmp_path / "act" / "metrics.json").read_text())["after"]["n_pairs"] > 0
    bundle = load_model(cfg.model)
    pairs = load_pairs(cfg.train_data)
    batch = [pairs[i] for i in _order(len(pairs), cfg.seed, 0)[:4]]
    inputs = build_inputs(bundle.processor, [p.question for p in batch] + [p.paraphrase for p in batch],
                          [load_image(p.image) for p in batch] * 2)
    with torch.no_grad():
        hs = bundle.model(**inputs, output_hidden_states=True).hidden_states
    keep = np.array([not p.negated for p in batch])
    terms = []
    for layer in (0, 1):  # not the last layer: its hidden_states entry is after the final norm
        h = hs[layer + 1][:, -1].numpy()
        hq, hp = h[:4][keep], h[4:][keep]
        terms.append(((hp - hq) ** 2).sum(1) / (hq ** 2).sum(1))
    assert res.log[0]["consistency"] == pytest.approx(float(np.mean(terms)), rel=1e-4)


@pytest.mark.slow
def test_two_process_data_parallel_training_equals_one_process(demo_eval_subset, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): each process trains on its
    half of every batch of B pairs and DDP averages the gradients, so 2 processes at batch B/2 take
    the steps of 1 process at batch B. Adapters agree to 1e-5 and the evaluations are the same
    (float reductions in another order are the only difference)."""
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    from mechmed.config import demo_defaults

    base = {**demo_defaults(), "model": "demo", "layers": [1, 2], "max_steps": 3, "eval_every": 3,
            "checkpoint_every": 3, "extra_eval": {}, "eval_data": str(demo_eval_subset)}
    for name, batch in (("two", 8), ("one", 16)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**base, "batch_size": batch}))
    env = {**os.environ, "MECHMED_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mechmed.cli"]
    two = subprocess.run([*launch, "train", "--config", str(tmp_path / "two.yaml"), "--out", str(tmp_path / "two"),
                          "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained lora") == 1  # the main process reports
    one = subprocess.run([sys.executable, "-m", "mechmed.cli", "train", "--config", str(tmp_path / "one.yaml"),
                          "--out", str(tmp_path / "one"), "--device", "cpu"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m1["steps"] == m2["steps"] == 3
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert any(float(a[k].abs().max()) > 1e-3 for k in a if "lora_B" in k)  # it did train
    assert m2["after"]["n_flips"] == m1["after"]["n_flips"]
    assert m2["after"]["margin_diff"] == pytest.approx(m1["after"]["margin_diff"], abs=1e-4)
    # accelerate's own precision flag is refused when the config says otherwise, before any weights load
    bad = subprocess.run([*launch[:-2], "--mixed_precision", "fp16", "-m", "mechmed.cli", "train", "--config",
                          str(tmp_path / "one.yaml"), "--out", str(tmp_path / "fp16"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "--mixed_precision fp16" in bad.stderr and not (tmp_path / "fp16").exists()
    # FSDP on the CPU would be data parallel under another name: refused, with what to launch instead
    fsdp = subprocess.run([*(a for a in launch[:-2] if a != "--multi_gpu"), "--use_fsdp", "-m", "mechmed.cli", "train", "--config",
                           str(tmp_path / "one.yaml"), "--out", str(tmp_path / "fsdp"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert fsdp.returncode != 0 and "shards only on GPUs" in fsdp.stderr and not (tmp_path / "fsdp").exists()


def test_launch_precision_is_checked(monkeypatch):
    from mechmed.train import check_launch

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(MechmedError, match="bf16: false"):
        check_launch(_cfg(), "cuda")
    check_launch(_cfg(bf16=True), "cuda")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_launch(_cfg(bf16=True), "cuda")  # the config decides
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(MechmedError, match="fp8"):
        check_launch(_cfg(bf16=True), "cuda")


def test_the_activation_term_alone_reaches_the_adapter(tiny_workspace):
    """With ce_weight 0 the activation term is the whole loss: its gradient reaches the LoRA weights of
    the adapted layer at or before the compared one, and none of an adapted layer after it."""
    from mechmed.data import load_pairs
    from mechmed.models import load_model
    from mechmed.train import _batch_scores, _Images

    cfg = _cfg(model=str(tiny_workspace[1]), layers=[0, 2], consistency="activation", activation_layers=[0],
               ce_weight=0.0, rank=4, dropout=0.0)
    bundle = load_model(cfg.model)
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    model, _ = apply_adapter(bundle, cfg)
    batch = load_pairs(tiny_workspace[0] / "train_pairs.jsonl")[:4]
    sq, sp, resid = _batch_scores(model, bundle, batch, _Images(), cfg.act_layers)
    neg = torch.tensor([p.negated for p in batch])
    parts = pair_loss(sq, sp, neg, neg, neg, cfg, resid)
    assert parts.ce.item() > 0 and parts.total.item() == pytest.approx(parts.consistency.item())
    parts.total.backward()
    # LoRA B starts at zero, so at the first step the gradient lands on B (A's passes through B = 0)
    b_grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert any(".layers.0." in n for n in b_grads) and any(".layers.2." in n for n in b_grads)
    assert any(g is not None and g.abs().sum() > 0 for n, g in b_grads.items() if ".layers.0." in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in b_grads.items() if ".layers.2." in n)


def test_sharded_runs_refuse_what_they_cannot_do(monkeypatch):
    """Under `accelerate launch --use_fsdp`: no resumable checkpoints, so --resume is refused, as are
    spectral experts; on the CPU accelerate would silently train data parallel, so FSDP is refused there.
    Without the flag all of these are allowed."""
    from mechmed.train import check_launch

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_launch(_cfg(), "cuda")
    with pytest.raises(MechmedError, match="--resume under FSDP"):
        check_launch(_cfg(), "cuda", resume=True)
    with pytest.raises(MechmedError, match="spectral_moe under FSDP"):
        check_launch(_cfg(method="spectral_moe"), "cuda:1")
    with pytest.raises(MechmedError, match="--use_fsdp with --device cpu.*--multi_gpu"):
        check_launch(_cfg(), "cpu")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "1")  # accelerate reads 1, yes, true alike
    with pytest.raises(MechmedError, match="--use_fsdp with --device cpu"):
        check_launch(_cfg(), "cpu:0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    for device in ("cpu", "cuda"):
        check_launch(_cfg(method="spectral_moe"), device, resume=True)

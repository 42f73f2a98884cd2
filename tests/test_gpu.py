"""The grid on a GPU: the same table, statistics and report as on the CPU, and a MedGemma-4B-shaped
model (random weights, no download) through ``mechmed ablate --device cuda``.

Run where a CUDA device is visible: ``python -m pytest -m gpu``. Elsewhere each test is skipped and
says why.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (this torch sees none); run pytest -m gpu on a GPU machine")]


def _train_config(root, model, **kw) -> dict:
    return {"model": str(model), "layers": [1], "rank": 4, "alpha": 8.0, "lr": 5e-3, "batch_size": 4,
            "grad_accum": 1, "max_steps": 6, "eval_every": 6, "checkpoint_every": 6, "guard_pairs": 4,
            "train_data": str(root / "train_pairs.jsonl"), "eval_data": str(root / "pairs.jsonl"), **kw}


def test_grid_on_gpu_matches_cpu(tiny_workspace, tmp_path):
    """Base margins to 1e-4 logits; every arm's flips on all but at most one pair, its trained loss
    curve to 1e-3; the report builds from the GPU grid as from the CPU one."""
    from mechmed.ablate import AblationConfig, run_ablation
    from mechmed.io import read_jsonl
    from mechmed.report import build_report

    root, ckpt = tiny_workspace
    # full float32 on the GPU too: TF32 matmuls and convolutions would differ from the CPU by ~1e-3
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = AblationConfig.from_dict({"train": _train_config(root, ckpt), "arms": ["selected", "all", "ce_only"]})
    runs = {dev: run_ablation(cfg, tmp_path / dev, device=dev, dtype="float32") for dev in ("cpu", "cuda")}
    base = {dev: read_jsonl(tmp_path / dev / "base-s0" / "pairs.jsonl") for dev in runs}
    for a, b in zip(base["cpu"], base["cuda"]):
        assert a["id"] == b["id"]
        assert abs(a["margin_question"] - b["margin_question"]) < 1e-4
        assert abs(a["margin_paraphrase"] - b["margin_paraphrase"]) < 1e-4
    for a, b in zip(runs["cpu"].rows, runs["cuda"].rows):
        assert (a["arm"], a["method"], a["layers"]) == (b["arm"], b["method"], b["layers"])
        assert abs(a["flip_rate"] - b["flip_rate"]) * a["n_pairs"] <= 1, (a, b)
        if a["arm"] == "base":
            continue
        ma = json.loads((tmp_path / "cpu" / "arms" / f"{a['arm']}-lora-s0" / "metrics.json").read_text())
        mb = json.loads((tmp_path / "cuda" / "arms" / f"{b['arm']}-lora-s0" / "metrics.json").read_text())
        assert mb["device"] == "cuda:0" and ma["device"] == "cpu"
        la = [h["loss"] for h in read_jsonl(tmp_path / "cpu" / "arms" / f"{a['arm']}-lora-s0" / "train_log.jsonl")]
        lb = [h["loss"] for h in read_jsonl(tmp_path / "cuda" / "arms" / f"{b['arm']}-lora-s0" / "train_log.jsonl")]
        assert len(la) == len(lb) and all(abs(x - y) <= 1e-3 * max(1.0, abs(x)) for x, y in zip(la, lb))
    for dev in runs:
        build_report(tmp_path / dev)
        assert (tmp_path / dev / "report.html").is_file()


def test_ablate_a_medgemma_4b_shaped_model_on_cuda(tiny_workspace, tmp_path):
    """34 layers of width 2560 (8 × 256 query heads, 4 KV heads, MLP 10240), random weights in
    bfloat16, through the command line: the table, its tests and the report come out."""
    from mechmed import tiny
    from mechmed.cli import main

    root, _ = tiny_workspace
    with torch.device("cuda"):
        model, processor = tiny.gemma3_vlm(layers=34, hidden=2560, heads=8, kv_heads=4, head_dim=256,
                                           intermediate=10240, image_size=64, patch=8, tokens_per_image=64,
                                           vision_hidden=32, vision_layers=1, seed=0)
    ckpt = tiny.save(model.to(torch.bfloat16), processor, tmp_path / "medgemma-4b-shaped")
    del model
    torch.cuda.empty_cache()
    train = _train_config(root, ckpt, layers=[16, 17, 18], max_steps=2, eval_every=2, checkpoint_every=2)
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump({"train": train, "arms": ["selected", "ce_only"]}))
    out = tmp_path / "grid"
    assert main(["ablate", "--config", str(tmp_path / "ablation.yaml"), "--out", str(out), "--device", "cuda",
                 "--report"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in result["rows"]] == ["base", "selected", "ce_only"]
    assert all(0.0 <= r["flip_rate"] <= 1.0 for r in result["rows"])
    assert result["rows"][1]["p_vs_base"] is not None
    metrics = json.loads((out / "arms" / "selected-lora-s0" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["dtype"] == "torch.bfloat16"
    assert (out / "report.html").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_named_gpu_is_the_one_used(tiny_workspace, tmp_path):
    """--device cuda:1: the base evaluation and every arm run on cuda:1, not accelerate's cuda:0."""
    from mechmed.ablate import AblationConfig, run_ablation

    root, ckpt = tiny_workspace
    cfg = AblationConfig.from_dict({"train": _train_config(root, ckpt, max_steps=2), "arms": ["selected"]})
    run_ablation(cfg, tmp_path, device="cuda:1", dtype="float32")
    metrics = json.loads((tmp_path / "arms" / "selected-lora-s0" / "metrics.json").read_text())
    assert metrics["device"] == "cuda:1"


def test_fsdp_training_saves_the_gathered_adapter_and_evaluates_it(tiny_workspace, tmp_path):
    """`accelerate launch --use_fsdp` (one process per visible GPU, at most 2): the adapter is saved from
    the weights every process gathers and evaluated on a fresh base model; it equals, to 1e-4, the
    adapter of the same steps trained data parallel (DDP) on as many processes."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root, ckpt = tiny_workspace
    n = min(2, torch.cuda.device_count())
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(_train_config(root, ckpt, dropout=0.0, max_steps=3, eval_every=3,
                                                checkpoint_every=3, batch_size=2)))
    env = {**os.environ, "MECHMED_PROGRESS": "0"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    runs = {}
    for name, extra in (("fsdp", ["--use_fsdp", "--fsdp_use_orig_params", "true"]), ("ddp", ["--multi_gpu"])):
        if name == "ddp" and n == 1:
            extra = []
        proc = subprocess.run([*launch, *extra, "-m", "mechmed.cli", "train", "--config", str(cfg), "--out",
                               str(tmp_path / name), "--device", "cuda", "--dtype", "float32"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("fsdp", "ddp"))
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert runs["fsdp"]["after"]["n_pairs"] == runs["ddp"]["after"]["n_pairs"] > 0
    assert not (tmp_path / "fsdp" / "checkpoint").exists()  # a sharded run writes no resumable checkpoint

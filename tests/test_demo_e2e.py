"""``mechmed demo`` end to end on the cached demo model, with a reduced grid (two arms, 40 attributed
pairs): the command a new user runs first, its progress lines, its report, and a rerun that reuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mechmed import figures as F

pytestmark = pytest.mark.slow

ARMS = ("selected", "consistency_only")


def _demo(out, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "MECHMED_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "mechmed.cli", "demo", "--out", str(out), "--arms", ",".join(ARMS),
           "--max-pairs", "40", "--workers", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def demo_run(demo_model_dir, demo_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = _demo(out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc


def test_demo_progress_lines(demo_run):
    out, proc = demo_run
    lines = proc.stdout.splitlines()
    first = {stage: next((i for i, x in enumerate(lines) if x.startswith(f"[{stage}]")), None)
             for stage in ("model", "sae_check", "attribute", "select_layers", "ablation", "report")}
    assert None not in first.values(), proc.stdout
    assert list(first.values()) == sorted(first.values()), "stages reported out of order"
    for stage in ("sae_check", "attribute", "ablation", "report"):
        assert any(x.startswith(f"[{stage}] done in ") for x in lines), stage
    assert any(x.startswith("[ablation] base model evaluated: flip rate ") for x in lines)
    # how sure the selection is, in the stage line and the config
    assert any(x.startswith("[select_layers] selected layers") and "resamples of the attributed questions" in x
               for x in lines), proc.stdout
    import yaml

    unc = yaml.safe_load((out / "train.yaml").read_text())["provenance"]["uncertainty"]
    assert unc["unit"] == "question" and 0 < unc["p_chosen"] <= 1
    assert any(x.startswith("[sae_check] the demo SAEs, one per layer (trained on first use") for x in lines)
    arm_lines = [x for x in lines if x.startswith("[ablation] arm ")]
    assert sorted(x.split()[2] for x in arm_lines) == [f"{i}/{len(ARMS)}" for i in range(1, len(ARMS) + 1)]
    assert {x.split()[3] for x in arm_lines} == {f"{a}-lora-s0" for a in ARMS}
    assert lines[-1].startswith("done in ") and str(out / "report.html") in lines[-1]
    # the terminal summary table: a header, a rule, base and one row per arm
    head = next(i for i, x in enumerate(lines) if x.startswith("arm ") and "flip rate [95% CI]" in x)
    assert set(lines[head + 1]) == {"-"}
    assert [lines[head + 2 + i].split()[0] for i in range(len(ARMS) + 1)] == ["base", *ARMS]
    assert "FutureWarning" not in proc.stderr and "Traceback" not in proc.stderr


def test_demo_report_and_results(demo_run):
    out, _ = demo_run
    res = json.loads((out / "ablation" / "results.json").read_text())
    assert [r["arm"] for r in res["summary"]] == ["base", *ARMS]
    md = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")
    # computed in deterministic CPU mode, and the report says so
    base_metrics = json.loads((out / "ablation" / "base-s0" / "metrics.json").read_text())
    assert base_metrics["determinism"]["mode"] == "deterministic" and base_metrics["determinism"]["env_pinned"]
    assert "Computed in deterministic CPU mode" in md
    sel = next(r for r in res["summary"] if r["arm"] == "selected")
    flip = f"{sel['flip_rate']:.3f} [{sel['flip_ci'][0]:.3f}, {sel['flip_ci'][1]:.3f}]"
    assert flip in md and flip in page
    assert "## Skipped" not in md, md.split("## Skipped")[-1]
    # the demo's result, on its fair split: fine-tuning lowers the held-out flip rate, pure consistency collapses
    base, cons = res["base"], next(r for r in res["summary"] if r["arm"] == "consistency_only")
    assert sel["flip_rate"] < base["flip_rate"] and sel["p_vs_base"] < 0.001, (sel, base)
    assert cons["collapsed"] and cons["yes_rate"] > 0.95
    assert set(sel["sets"]) == {"unseen", "negation"} and set(base["sets"]) == {"unseen", "negation"}
    assert base["sets"]["negation"]["flip_rate"] > base["flip_rate"]  # negation is reported apart: it flips most
    assert "Beside the main set, training the selected layers" in md
    names = ["r2_by_layer", "layer_profile", "feature_heatmap", "flip_by_arm", "flip_heatmap", "tradeoff",
             *(f"training_{a}-lora-s0" for a in ARMS)]
    for name in names:
        assert (out / "figures" / f"{name}.html").is_file(), name
        assert f'id="fig-{name}"' in page
        if F.browser_path() is not None:
            assert (out / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
            assert f"(figures/{name}.png)" in md
    scores = json.loads((out / "attribute" / "layer_scores.json").read_text())
    assert all(0 <= x < scores["n_layers"] for x in sel["layers"])
    # the layers (and clamp's features) are chosen on training pairs, none of them held out
    attributed = {p["id"] for p in scores["pairs"]}
    held_out = {json.loads(line)["id"] for line in (out / "ablation" / "base-s0" / "pairs.jsonl").open()}
    assert scores["split"] == "train" and len(attributed) == 40 and not attributed & held_out
    assert f"{scores['n_flipped']} of 40 attributed training pairs flipped" in md


def test_demo_rerun_reuses_finished_stages(demo_run):
    out, _ = demo_run
    proc = _demo(out, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("sae_check", "attribute", "select_layers"):
        assert f"[{stage}] reusing {out}" in proc.stdout
    assert f"[ablation] reusing {len(ARMS)} finished arm(s)" in proc.stdout
    assert "[ablation] arm " not in proc.stdout

"""Process policy: deterministic CPU mode (when it is asked for, the restart that sets it before torch
loads, the torch flags it sets and restores, and bit-identical short builds under emulated machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from mechmed import runtime
from mechmed.runtime import DETERMINISTIC_ENV, MODE_VARIABLE


def _clean_env(**extra) -> dict:
    """This process's environment without the mode's settings (what a fresh shell has), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DETERMINISTIC_ENV and k != MODE_VARIABLE}
    env.update(extra)
    return env


def test_mode_is_on_for_the_embedded_default_unless_the_variable_says(monkeypatch):
    monkeypatch.delenv(MODE_VARIABLE, raising=False)
    assert runtime.mode_requested("demo") and runtime.mode_requested("demo:train")
    assert not runtime.mode_requested("google/medgemma-4b-it") and not runtime.mode_requested(None)
    monkeypatch.setenv(MODE_VARIABLE, "0")
    assert not runtime.mode_requested("demo")
    monkeypatch.setenv(MODE_VARIABLE, "yes")
    assert runtime.mode_requested("google/medgemma-4b-it")


def test_deterministic_env_pins_every_setting():
    env = runtime.deterministic_env({"PATH": "/bin", "MKL_CBWR": "AUTO"})
    assert env["PATH"] == "/bin" and env[MODE_VARIABLE] == "1"
    assert all(env[k] == v for k, v in DETERMINISTIC_ENV.items())
    assert runtime.env_pinned(env) and not runtime.env_pinned({"MKL_CBWR": "AUTO"})
    assert not runtime.env_pinned({**env, "ATEN_CPU_CAPABILITY": "avx512"})


def test_deterministic_context_sets_and_restores_torch_flags(monkeypatch):
    import torch

    for k, v in runtime.deterministic_env({}).items():
        monkeypatch.setenv(k, v)
    before = (torch.backends.mkldnn.enabled, torch.are_deterministic_algorithms_enabled())
    with runtime.deterministic("cpu") as on:
        assert on and not torch.backends.mkldnn.enabled and torch.are_deterministic_algorithms_enabled()
    assert (torch.backends.mkldnn.enabled, torch.are_deterministic_algorithms_enabled()) == before
    with runtime.deterministic("cuda") as on:  # GPU kernels are not pinned: nothing changes
        assert not on and torch.backends.mkldnn.enabled == before[0]
    monkeypatch.setenv(MODE_VARIABLE, "0")
    with runtime.deterministic("cpu") as on:
        assert not on and torch.backends.mkldnn.enabled == before[0]


def test_the_model_a_command_line_loads_is_known_before_torch(tmp_path):
    from mechmed.cli import requested_model

    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text("model: google/medgemma-4b-it\nlayers: [1, 2]\n")
    grid = tmp_path / "ablation.yaml"
    grid.write_text("train:\n  model: demo\n  layers: [1, 2]\narms: [selected]\n")
    assert requested_model(["demo"]) == "demo" and requested_model(["demo-model", "build"]) == "demo"
    assert requested_model(["evaluate"]) == "demo"
    assert requested_model(["evaluate", "--model", "google/medgemma-4b-it"]) == "google/medgemma-4b-it"
    assert requested_model(["train", "--config", str(train_cfg)]) == "google/medgemma-4b-it"
    assert requested_model(["train", "--config", str(train_cfg), "--model", "demo"]) == "demo"
    assert requested_model(["ablate", "--config", str(grid)]) == "demo"
    assert requested_model(["ablate", "--config", str(tmp_path / "missing.yaml")]) is None
    assert requested_model(["compare", "a", "b"]) is None
    assert requested_model(["--help"]) is None and requested_model(["no-such-command"]) is None


def test_a_script_restarts_once_with_the_settings_in_force(tmp_path):
    """A fresh process asked for the mode restarts itself with the settings before torch loads, so
    torch runs the pinned kernels; with the mode off it does not restart."""
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        from mechmed.runtime import reexec_deterministic, DETERMINISTIC_ENV
        print("start", flush=True)
        reexec_deterministic(sys.argv[1])
        import torch
        print(json.dumps({"env": {k: os.environ.get(k) for k in DETERMINISTIC_ENV},
                          "capability": torch.backends.cpu.get_cpu_capability()}))
    """))
    run = subprocess.run([sys.executable, str(script), "demo"], capture_output=True, text=True, timeout=120,
                         env=_clean_env())
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines.count("start") == 2  # once before the restart, once after
    got = json.loads(lines[-1])
    assert got["env"] == DETERMINISTIC_ENV
    assert got["capability"] == runtime.PINNED_CAPABILITY
    off = subprocess.run([sys.executable, str(script), "demo"], capture_output=True, text=True, timeout=120,
                         env=_clean_env(**{MODE_VARIABLE: "0"}))
    assert off.stdout.splitlines().count("start") == 1 and json.loads(off.stdout.splitlines()[-1])["env"] == {
        k: None for k in DETERMINISTIC_ENV}


@pytest.mark.slow
def test_the_command_line_restarts_into_the_mode_and_finds_its_cache(demo_model_dir):
    """``mechmed demo-model build`` from a shell without the settings: it restarts with them, so it finds
    the model the suite built in the mode (a build in the default mode would have another cache key)."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mechmed", "demo-model", "build"], capture_output=True, text=True,
                         timeout=150, env=_clean_env())
    assert run.returncode == 0, run.stderr[-2000:]
    assert str(demo_model_dir) in run.stdout, run.stdout
    assert time.perf_counter() - t0 < 150


_SHORT_BUILD = textwrap.dedent("""
    import json, sys, tempfile
    from mechmed.demo.build import build_demo
    from mechmed.demo.train import DemoTrainConfig
    from mechmed.runtime import deterministic, determinism_state

    short = DemoTrainConfig(n_images=96, vision_steps=8, vision_batch=32, steps=8, batch=16, lm_batch=8,
                            noise_variants=4, n_corpus_reports=40)
    with tempfile.TemporaryDirectory() as out, deterministic():
        m = build_demo(out + "/m", seed=3, cache_dir=sys.argv[1], train_config=short)
    print(json.dumps({"digest": m["weights_sha256"], "flip_rate": m["flip_rate"], "state": determinism_state()}))
""")

#: Each emulates what another machine's CPU or core count would make the libraries pick on their own.
_OTHER_MACHINE = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OMP_NUM_THREADS": "16", "MKL_NUM_THREADS": "16",
                  "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2_Usable,-FMA_Usable,-AVX_Usable"}


def _short_build(cache, env: dict, cpus: str | None = None) -> dict:
    cmd = [sys.executable, "-c", _SHORT_BUILD, str(cache)]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.slow
def test_short_builds_are_bit_identical_on_emulated_machines(tmp_path, demo_data_dir):
    """The same short build (data, vision tower, decoder, evaluation) in the mode on one core, with MKL
    told the CPU has SSE4.2 only, 16 default threads and glibc's non-FMA maths, gives the same weights
    and flip rate as the reference. ATen's default kernels (a CPU without AVX2) give other weights: the
    comparison can fail."""
    from shutil import which

    mode = runtime.deterministic_env(_clean_env())
    ref = _short_build(tmp_path / "ref", mode)
    assert ref["state"]["mode"] == "deterministic" and ref["state"]["aten_cpu_capability"] == "AVX2"
    got = _short_build(tmp_path / "other", {**mode, **_OTHER_MACHINE}, cpus="0" if which("taskset") else None)
    assert got["state"]["mode"] == "deterministic"
    assert (got["digest"], got["flip_rate"]) == (ref["digest"], ref["flip_rate"])
    aten = _short_build(tmp_path / "aten", {**mode, "ATEN_CPU_CAPABILITY": "default"})
    assert aten["state"]["aten_cpu_capability"] == "DEFAULT" and aten["digest"] != ref["digest"]

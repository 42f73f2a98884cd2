"""Interruptions, safe defaults and determinism.

- ``mechmed train`` and ``mechmed ablate`` are SIGKILLed at several points (after their first,
  middle and last checkpoints) and resumed: final metrics and adapter weights equal an
  uninterrupted run's.
- Weights only through safetensors, no pickle, ``yaml.safe_load``, ``trust_remote_code`` only by
  flag, no network at import or in the demo path (sockets blocked), outputs only under ``--out``.
- Same seed → identical metrics for evaluate, attribute and train.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mechmed.cli import main
from mechmed.errors import MechmedError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mechmed"


def _config(ws, tmp: Path, **kw) -> Path:
    root, ckpt = ws
    cfg = {"model": str(ckpt), "layers": [1, 2], "rank": 4, "alpha": 8.0, "dropout": 0.1, "lr": 5e-3,
           "batch_size": 2, "grad_accum": 1, "epochs": 3.0, "eval_every": 3, "checkpoint_every": 1,
           "guard_pairs": 8, "train_data": str(root / "train_pairs.jsonl"), "eval_data": str(root / "pairs.jsonl"),
           **kw}
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = _safetensors(a), _safetensors(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _strip(metrics, run=None):
    """Metrics without wall times, with the run directory's own path replaced by "RUN"."""
    if isinstance(metrics, dict):
        return {k: _strip(v, run) for k, v in metrics.items() if k != "train_seconds"}
    if isinstance(metrics, list):
        return [_strip(v, run) for v in metrics]
    if isinstance(metrics, str) and run is not None:
        return metrics.replace(str(run), "RUN")
    return metrics


def _kill_when(cmd: list[str], ready, timeout: float = 120.0) -> None:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true (it must not finish first)."""
    env = {**os.environ, "MECHMED_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"finished before the kill point: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError("kill point never reached")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _checkpoint_step(run: Path) -> int:
    state = run / "checkpoint" / "state.json"
    if not state.is_file():
        return 0
    try:
        return json.loads(state.read_text())["step"]
    except (OSError, ValueError, KeyError):  # renamed away by the next checkpoint while we looked
        return 0


@pytest.fixture(scope="module")
def reference_run(tiny_workspace, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _config(tiny_workspace, tmp)
    assert main(["train", "--config", str(cfg), "--out", str(tmp / "run")]) == 0
    return cfg, tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 3, 5])
def test_train_killed_and_resumed_matches(reference_run, tmp_path, kill_after):
    cfg, ref = reference_run
    total = json.loads((ref / "metrics.json").read_text())["total_steps"]
    assert kill_after < total
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mechmed.cli", "train", "--config", str(cfg), "--out", str(run)]
    _kill_when(cmd, lambda: _checkpoint_step(run) >= kill_after)
    assert not (run / "metrics.json").exists()
    assert main(["train", "--config", str(cfg), "--out", str(run), "--resume"]) == 0
    got = json.loads((run / "metrics.json").read_text())
    want = json.loads((ref / "metrics.json").read_text())
    assert _strip(got, run) == _strip(want, ref)
    assert _same_weights(run / "adapter" / "adapter_model.safetensors", ref / "adapter" / "adapter_model.safetensors")
    assert not list(run.rglob("*.tmp")), "temporary files left behind"


@pytest.mark.slow
def test_ablate_killed_and_resumed_matches(tiny_workspace, tmp_path):
    cfg = _config(tiny_workspace, tmp_path, layers=[1], epochs=1.0, max_steps=4)
    abl = tmp_path / "ablation.yaml"
    abl.write_text(yaml.safe_dump({"train": str(cfg), "arms": ["selected", "late", "ce_only"]}))
    assert main(["ablate", "--config", str(abl), "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mechmed.cli", "ablate", "--config", str(abl), "--out", str(out)]
    # killed in the middle of the second arm, after its second checkpoint
    _kill_when(cmd, lambda: _checkpoint_step(out / "arms" / "late-lora-s0") >= 2)
    assert (out / "arms" / "selected-lora-s0" / "metrics.json").is_file()
    assert not (out / "results.json").exists()
    assert main(["ablate", "--config", str(abl), "--out", str(out)]) == 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((out / "results.json").read_text())
    for rows in (ref["rows"], got["rows"]):
        for r in rows:
            r.pop("run_dir")
    assert got["rows"] == ref["rows"]
    for arm in ("selected", "late", "ce_only"):
        name = f"{arm}-lora-s0/adapter/adapter_model.safetensors"
        assert _same_weights(out / "arms" / name, tmp_path / "ref" / "arms" / name)


# ----------------------------------------------------------------------------- safe defaults


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_no_pickle_no_unsafe_yaml_no_unsafe_torch_load():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(m and m.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for m in mods):
                    problems.append(f"{path.name}:{node.lineno} imports a pickle library")
        for node, owner, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                problems.append(f"{path.name}:{node.lineno} yaml.{name}")
            if owner == "torch" and name == "load":
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if name == "save_pretrained" and "safe_serialization" in kw:
                v = kw["safe_serialization"]
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{path.name}:{node.lineno} save_pretrained without safetensors")
            if "trust_remote_code" in kw:
                v = kw["trust_remote_code"]
                if isinstance(v, ast.Constant) and v.value is True:
                    problems.append(f"{path.name}:{node.lineno} trust_remote_code=True hard-coded")
            if name == "trace" and "remote" in kw:
                v = kw["remote"]
                if isinstance(v, ast.Constant) and v.value is True:
                    problems.append(f"{path.name}:{node.lineno} nnsight remote=True hard-coded")
    assert problems == []


def test_trust_remote_code_only_by_flag(tiny_workspace, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoConfig.from_pretrained

    def spy(*a, **k):
        seen.append(k.get("trust_remote_code", False))
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    from mechmed.models import load_model

    load_model(str(tiny_workspace[1]))
    assert seen and not any(seen)
    seen.clear()
    load_model(str(tiny_workspace[1]), trust_remote_code=True)
    assert seen and all(seen)


def test_saved_weights_are_safetensors(tiny_workspace, reference_run):
    _, run = reference_run
    files = [p.name for p in run.rglob("*") if p.is_file()]
    assert "adapter_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], files
    assert not [p.name for p in tiny_workspace[1].iterdir() if p.suffix in (".bin", ".pt", ".pkl")]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (local unix sockets are allowed)."""
    attempts = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network blocked by the test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, *a, **k: (attempts.append(address), guarded(socket.socket(), address)))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return attempts


def test_import_opens_no_connection():
    code = ("import socket\n"
            "def no(*a, **k): raise SystemExit('network at import')\n"
            "socket.socket.connect = no\nsocket.create_connection = no\n"
            "import mechmed, mechmed.cli, mechmed.models, mechmed.consistency, mechmed.capture, mechmed.saes, "
            "mechmed.attribution, mechmed.train, mechmed.ablate\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.slow
def test_demo_path_without_network(no_network, demo_model_dir, tmp_path, capsys):
    """evaluate / sae-check / attribute on the embedded default with every socket blocked and no
    offline variable set: nothing tries the network, everything is written under --out."""
    before = set(Path.cwd().iterdir())
    assert main(["evaluate", "--out", str(tmp_path / "eval"), "--limit", "40"]) == 0
    assert main(["sae-check", "--layers", "2", "--texts", "general", "--no-ce", "--out", str(tmp_path / "sae")]) == 0
    assert main(["attribute", "--max-pairs", "16", "--no-exact", "--out", str(tmp_path / "attr")]) == 0
    assert no_network == []
    assert set(Path.cwd().iterdir()) == before, "files written outside --out"
    for d in ("eval", "sae", "attr"):
        assert any((tmp_path / d).iterdir())


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_metrics(tiny_workspace, tmp_path):
    root, ckpt = tiny_workspace
    data = str(root / "pairs.jsonl")
    for run in ("a", "b"):
        assert main(["evaluate", "--model", str(ckpt), "--data", data, "--out", str(tmp_path / f"eval_{run}")]) == 0
        assert main(["attribute", "--model", str(ckpt), "--data", data, "--saes", "none",
                     "--out", str(tmp_path / f"attr_{run}")]) == 0
    assert (tmp_path / "eval_a" / "metrics.json").read_text() == (tmp_path / "eval_b" / "metrics.json").read_text()
    assert (tmp_path / "eval_a" / "pairs.jsonl").read_text() == (tmp_path / "eval_b" / "pairs.jsonl").read_text()
    la = json.loads((tmp_path / "attr_a" / "layer_scores.json").read_text())
    lb = json.loads((tmp_path / "attr_b" / "layer_scores.json").read_text())
    assert la == lb


def test_train_same_seed_same_result(reference_run, tmp_path):
    cfg, ref = reference_run
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "again")]) == 0
    assert _strip(json.loads((tmp_path / "again" / "metrics.json").read_text()), tmp_path / "again") == \
        _strip(json.loads((ref / "metrics.json").read_text()), ref)
    assert _same_weights(tmp_path / "again" / "adapter" / "adapter_model.safetensors",
                         ref / "adapter" / "adapter_model.safetensors")


# ----------------------------------------------------------------------------- config parsing, any input


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                    max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["layers", "rank", "lr", "method", "consistency", "epochs", "seed",
                                        "target_modules", "answer_words", "spectral", "ce_weight", "rnak",
                                        "config_version", "bf16", "max_steps"]), _values, max_size=6))
@example({"layers": [""]})  # once crashed int() conversion with a ValueError
@example({"layers": [None, 1]})
def test_any_training_config_is_valid_or_a_clear_error(body):
    from mechmed.config import TrainConfig

    try:
        TrainConfig.from_dict(body, source="cfg.yaml")
    except MechmedError as e:
        assert "\n" not in str(e) and str(e)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_any_yaml_text_is_valid_or_a_clear_error(text):
    import tempfile

    from mechmed.ablate import AblationConfig
    from mechmed.config import TrainConfig

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text, encoding="utf-8")
        for loader in (TrainConfig.load, AblationConfig.load):
            try:
                loader(path)
            except MechmedError as e:
                assert "\n" not in str(e) and str(e)


def test_outputs_follow_the_umask(tmp_path):
    """Files written atomically and the directories the caches build in get the mode the user's umask
    gives (a report on shared storage is readable by colleagues when the umask says so)."""
    import stat

    from mechmed.io import temp_dir, write_json, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.md", "x")
        write_json(tmp_path / "b.json", {"x": 1})
        built = temp_dir(tmp_path, prefix=".build.")
        assert stat.S_IMODE((tmp_path / "a.md").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o644
        assert stat.S_IMODE(built.stat().st_mode) == 0o755
        os.umask(0o077)  # a private umask stays private
        write_text(tmp_path / "c.md", "x")
        assert stat.S_IMODE((tmp_path / "c.md").stat().st_mode) == 0o600
        assert stat.S_IMODE(temp_dir(tmp_path, prefix=".private.").stat().st_mode) == 0o700
    finally:
        os.umask(old)


def test_safetensors_outputs_follow_the_umask(tmp_path, tiny_models, tiny_workspace):
    """safetensors writes owner-only files; every weights file mechmed writes (a saved checkpoint, an
    SAE set, a spectral adapter, an activation shard, a training run's adapter and checkpoint) gets
    the umask's mode instead."""
    import stat

    import torch
    import yaml
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from mechmed import tiny
    from mechmed.config import TrainConfig
    from mechmed.saes import save_sae_set
    from mechmed.store import _write_shard
    from mechmed.train import train

    old = os.umask(0o022)
    try:
        model, proc = tiny_models["Gemma3ForCausalLM"]
        tiny.save(model, proc, tmp_path / "ckpt")
        save_sae_set({0: TopKSAE(TopKSAEConfig(d_in=8, d_sae=4, k=2, metadata=SAEMetadata(hook_name="x")))},
                     tmp_path / "saes")
        _write_shard(tmp_path / "shard.safetensors", {"a": torch.zeros(2)}, {})
        root, ckpt = tiny_workspace
        cfg = TrainConfig.from_dict({**yaml.safe_load("layers: [1]\nrank: 2\nmax_steps: 1\nbatch_size: 2\ngrad_accum: 1\n"
                                                      "checkpoint_every: 1\neval_every: 1\nguard_pairs: 2"),
                                     "model": str(ckpt), "method": "spectral_moe", "spectral": {"n_experts": 2},
                                     "train_data": str(root / "train_pairs.jsonl"),
                                     "eval_data": str(root / "pairs.jsonl")})
        train(cfg, tmp_path / "run", evaluate_before_after=False, png=False)
        files = [p for p in tmp_path.rglob("*.safetensors")]
        assert len(files) >= 6, files
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    finally:
        os.umask(old)

"""The command line end to end on a saved tiny checkpoint, and its error contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mechmed.cli import main
from mechmed.errors import MechmedError


def test_help_imports_no_heavy_library():
    """Nor numpy: a command restarts itself in deterministic mode only before numpy and torch load."""
    code = ("import sys, mechmed.cli as c; c.build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'numpy', 'transformers', 'sae_lens', 'nnsight', 'peft', 'plotly') "
            "if m in sys.modules];"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def workspace(tiny_workspace):
    return tiny_workspace


def test_evaluate_then_compare(workspace, capsys):
    root, ckpt = workspace
    assert main(["evaluate", "--model", str(ckpt), "--data", str(root / "pairs.jsonl"),
                 "--out", str(root / "a"), "--batch-size", "3"]) == 0
    assert main(["evaluate", "--model", str(ckpt), "--data", str(root / "pairs.jsonl"),
                 "--out", str(root / "b"), "--limit", "6", "--no-controls"]) == 0
    m = json.loads((root / "a" / "metrics.json").read_text())
    for key in ("n_pairs", "n_questions", "accuracy", "flip_rate", "flip_rate_ci", "question_flip_rate",
                "margin_diff", "margin_diff_ci", "auc", "yes_rate", "blank_image_agreement", "swap_sensitivity"):
        assert key in m
    assert m["n_pairs"] == 8 and m["n_questions"] == 4
    assert m["flip_risk"]["coverage"]["risk"] == 0.05 and 0 <= m["flip_risk"]["ece"] <= 1
    assert "flips foreseen by |margin|" in capsys.readouterr().out
    import torch

    assert m["seed"] == 0 and m["versions"]["torch"] == torch.__version__ and "transformers" in m["versions"]
    # no --device: auto, which is CUDA only where torch sees a GPU
    assert m["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu") and m["dtype"].startswith("torch.")
    assert len((root / "a" / "pairs.jsonl").read_text().splitlines()) == 8
    assert main(["compare", str(root / "a"), str(root / "b"), "--out", str(root / "cmp.json")]) == 0
    cmp = json.loads((root / "cmp.json").read_text())
    assert cmp["paired"]["n_common_pairs"] == 6
    # identical model on the shared pairs: no discordant flips
    assert cmp["paired"]["mcnemar_flips"]["p_value"] == 1.0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("flip_rate"))
    # the paired test is read first, then the unpaired one, each named
    assert line.index("McNemar p = 1.0000 (paired, 6 pairs)") < line.index("two-proportion z")


def test_module_entry_point_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mechmed.cli", "evaluate", "--model", "demo", "--data",
                        str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "missing.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_train_options_and_config_fields_agree():
    from dataclasses import fields

    from mechmed.cli import build_parser
    from mechmed.config import TrainConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in fields(TrainConfig)} - {"spectral", "provenance"} <= dests


def test_train_from_config_with_override(workspace, tmp_path, capsys):
    from mechmed.config import TrainConfig

    root, ckpt = workspace
    cfg = TrainConfig(model=str(ckpt), layers=[0], rank=2, alpha=4.0, batch_size=2, grad_accum=1, max_steps=2,
                      eval_every=0, guard_pairs=4, train_data=str(root / "train_pairs.jsonl"),
                      eval_data=str(root / "pairs.jsonl"))
    path = cfg.save(tmp_path / "train.yaml")
    assert main(["train", "--config", str(path), "--layers", "1-2", "--out", str(tmp_path / "run")]) == 0
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "- 1\n- 2\n" in resolved
    assert "trained lora on layers [1, 2]" in capsys.readouterr().out
    # a misspelled option in the file is one line and exit 2
    path.write_text(path.read_text().replace("rank:", "rnak:"))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run2")]) == 2
    assert "did you mean 'rank'" in capsys.readouterr().err


def test_verbosity_before_or_after_the_command(tmp_path, capsys):
    """-v / -q go before or after the command; together they are a usage error."""
    import logging

    from mechmed.cli import build_parser

    for argv in (["-v", "evaluate"], ["evaluate", "-v"]):
        assert build_parser().parse_args(argv).verbose is True
    for argv in (["-q", "evaluate"], ["evaluate", "--quiet"]):
        assert build_parser().parse_args(argv).quiet is True
    assert not hasattr(build_parser().parse_args(["evaluate"]), "verbose")
    assert main(["-v", "evaluate", "-q", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "-v and -q together" in capsys.readouterr().err
    logging.getLogger().handlers.clear()


def test_hub_options_reach_the_loader(workspace, tmp_path):
    """--cache-dir, --revision and --local-files-only reach from_pretrained: a hub id is found in a
    Hugging Face cache laid out by hand (models--org--name/snapshots/<commit>, refs/main), offline;
    a revision the cache does not hold is a one-line error."""
    import shutil

    root, ckpt = workspace
    cache = tmp_path / "hf"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(ckpt, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    common = ["evaluate", "--model", "org/tiny", "--local-files-only", "--cache-dir", str(cache),
              "--data", str(root / "pairs.jsonl"), "--no-controls"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--revision", "abc123", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert a["flip_rate"] == b["flip_rate"] and a["n_pairs"] == 8
    assert main([*common, "--revision", "v9", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def _hub_cache(ckpt, root):
    """A Hugging Face cache laid out by hand: ``org/tiny`` at commit abc123 (refs/main)."""
    import shutil

    snapshot = root / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(ckpt, snapshot)
    (root / "models--org--tiny" / "refs").mkdir()
    (root / "models--org--tiny" / "refs" / "main").write_text("abc123")
    return root


def test_train_and_ablate_open_the_model_as_evaluate_does(workspace, tmp_path, capsys):
    """train and ablate take --revision, --cache-dir and --local-files-only (and --trust-remote-code,
    --device-map): the run's config records them under model:, the ablation's plan passes them to every
    arm, and a revision the cache lacks is a one-line error before anything is written."""
    import yaml

    root, ckpt = workspace
    cache = _hub_cache(ckpt, tmp_path / "hf")
    hub = ["--model", "org/tiny", "--local-files-only", "--cache-dir", str(cache)]
    small = ["--layers", "1", "--rank", "2", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
             "--eval-every", "2",
             "--checkpoint-every", "2", "--guard-pairs", "4", "--train-data", str(root / "train_pairs.jsonl"),
             "--eval-data", str(root / "pairs.jsonl"), "--extra-eval", "none"]
    assert main(["train", *hub, "--revision", "abc123", *small, "--out", str(tmp_path / "run")]) == 0
    model = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert model == {"name": "org/tiny", "revision": "abc123", "cache_dir": str(cache), "local_files_only": True}
    assert main(["train", *hub, "--revision", "v9", *small, "--out", str(tmp_path / "bad")]) == 2
    assert "v9" in capsys.readouterr().err and not (tmp_path / "bad").exists()

    train = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    train["model"] = "org/tiny"  # the options come from the command line this time
    cfg = tmp_path / "ablation.yaml"
    cfg.write_text(yaml.safe_dump({"train": train, "arms": ["selected"], "seeds": [0]}))
    opts = ["--cache-dir", str(cache), "--local-files-only", "--revision", "abc123", "--device", "cpu"]
    assert main(["ablate", "--config", str(cfg), "--out", str(tmp_path / "grid"), "--plan", *opts]) == 0
    planned = yaml.safe_load((tmp_path / "grid" / "plan" / "selected-lora-s0.yaml").read_text())["model"]
    assert planned == model
    assert main(["ablate", "--config", str(cfg), "--out", str(tmp_path / "grid"), "--arm", "base-s0", *opts]) == 0
    assert (tmp_path / "grid" / "base-s0" / "metrics.json").is_file()
    assert main(["ablate", "--config", str(cfg), "--out", str(tmp_path / "grid2"), "--revision", "v9", "--device",
                 "cpu", "--cache-dir", str(cache), "--local-files-only"]) == 2
    assert "v9" in capsys.readouterr().err


def test_model_spec_round_trip():
    """A bare model name stays a bare name in YAML; loading options make it a mapping; an unknown key
    or a mapping without a name is a one-line error."""
    from mechmed.config import ModelSpec, TrainConfig

    assert TrainConfig(layers=[1]).to_dict()["model"] == "demo"
    d = TrainConfig(model={"name": "org/x", "revision": "r1", "trust_remote_code": True}, layers=[1]).to_dict()
    assert d["model"] == {"name": "org/x", "revision": "r1", "trust_remote_code": True}
    assert TrainConfig.from_dict(d).model == ModelSpec("org/x", revision="r1", trust_remote_code=True)
    assert ModelSpec.of("org/x").options(placement=False) == {"revision": None, "trust_remote_code": False,
                                                               "cache_dir": None, "local_files_only": None}
    with pytest.raises(MechmedError, match="did you mean 'revision'"):
        ModelSpec.of({"name": "org/x", "revison": "r1"})
    with pytest.raises(MechmedError, match="needs name"):
        ModelSpec.of({"revision": "r1"})
    with pytest.raises(MechmedError, match="quote a commit"):
        ModelSpec.of({"name": "org/x", "revision": 1234567})
    with pytest.raises(MechmedError, match="local_files_only"):
        ModelSpec.of({"name": "org/x", "local_files_only": 1})
    # the command line over a config's model: a flag replaces its option; another --model starts afresh
    from argparse import Namespace

    args = Namespace(model=None, revision="r2", trust_remote_code=False, cache_dir=None, local_files_only=None,
                     device_map=None)
    base = {"name": "org/x", "revision": "r1", "cache_dir": "/c"}
    assert ModelSpec.from_args(args, base) == ModelSpec("org/x", revision="r2", cache_dir="/c")
    args.model = "other/y"
    assert ModelSpec.from_args(args, base) == ModelSpec("other/y", revision="r2")


def test_help_shows_defaults_and_an_example_that_parses():
    """Every command's --help ends with an example that the parser accepts, and every option whose
    default is a value says it (training options: the config's default, and the demo's where it differs)."""
    import argparse
    import shlex

    from mechmed.cli import EXAMPLES, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(EXAMPLES)
    for name, sub in commands.items():
        text = sub.format_help()
        assert f"example:\n  {EXAMPLES[name]}" in text, name
        args = parser.parse_args(shlex.split(EXAMPLES[name])[1:])
        assert args.command == name
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction) or (
                    any(action.default is v for v in (None, False, argparse.SUPPRESS))
                    and getattr(action, "config_field", None) is None):
                continue
            assert "default" in formatter._get_help_string(action).lower(), (name, action.option_strings)
    lr = next(a for a in commands["train"]._actions if a.dest == "lr")
    help_lr = commands["train"]._get_formatter()._get_help_string(lr)
    from mechmed.config import TrainConfig, demo_defaults

    assert f"(default {TrainConfig.__dataclass_fields__['lr'].default}; with --model demo {demo_defaults()['lr']})" \
        in help_lr


def test_a_base_text_only_checkpoint_end_to_end(tmp_path):
    """A text-only Gemma 3 without a chat template (as a pretrained base checkpoint is) on text-only
    pairs: evaluate records the plain prompt format; attribute (layers only) and select-layers run;
    --prompt-template replaces the plain prompt and is recorded."""
    from mechmed import tiny

    tok = tiny.gemma_tokenizer()
    tok.chat_template = None
    model, _ = tiny.gemma3_causal_lm(tok, layers=3)
    ckpt = tiny.save(model, tok, tmp_path / "base")
    qs = [("Is there a pleural effusion?", "Is there any effusion?", "yes"),
          ("Is the heart normal?", "Does this image show cardiomegaly?", "no"),
          ("Is there any evidence of edema in the left lung?", "Is there edema?", "no"),
          ("Is there a pleural effusion?", "Does this image show a pleural effusion?", "yes")]
    pairs = tmp_path / "text_pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"t{i}", "question": q, "paraphrase": p, "answer": a}) + "\n"
                             for i, (q, p, a) in enumerate(qs)))
    assert main(["evaluate", "--model", str(ckpt), "--data", str(pairs), "--out", str(tmp_path / "eval")]) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["model_provenance"]["prompt_format"] == {"kind": "plain", "template": "Question: {question}\nAnswer:"}
    assert m["n_pairs"] == 4 and m.get("blank_image_agreement") is None
    assert main(["attribute", "--model", str(ckpt), "--data", str(pairs), "--saes", "none", "--max-pairs", "4",
                 "--out", str(tmp_path / "attr")]) == 0
    assert main(["select-layers", "--scores", str(tmp_path / "attr" / "layer_scores.json"), "--score", "gain_all",
                 "--width", "2", "--model", str(ckpt), "--train-data", str(pairs), "--eval-data", str(pairs),
                 "--out", str(tmp_path / "train.yaml")]) == 0
    assert main(["evaluate", "--model", str(ckpt), "--data", str(pairs), "--out", str(tmp_path / "eval2"),
                 "--prompt-template", "Q: {question} A:"]) == 0
    m2 = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert m2["model_provenance"]["prompt_format"] == {"kind": "custom", "template": "Q: {question} A:"}
    # attribution with a template: select-layers writes it into the training config
    assert main(["attribute", "--model", str(ckpt), "--data", str(pairs), "--saes", "none", "--max-pairs", "4",
                 "--prompt-template", "Q: {question} A:", "--out", str(tmp_path / "attr2")]) == 0
    assert main(["select-layers", "--scores", str(tmp_path / "attr2" / "layer_scores.json"), "--score", "gain_all",
                 "--width", "2", "--model", str(ckpt), "--out", str(tmp_path / "train2.yaml")]) == 0
    import yaml

    assert yaml.safe_load((tmp_path / "train2.yaml").read_text())["prompt_template"] == "Q: {question} A:"


def test_the_attributed_set_is_named_for_sources_only():
    """layer_scores.json says which pairs were attributed: a source's set or a hub dataset's split
    (``--split`` where the name gives none); a file is read whole and names none."""
    from mechmed.stages import _attributed_set

    assert _attributed_set("demo", "train") == "train" and _attributed_set("demo", "eval") == "eval"
    assert _attributed_set("demo:unseen", "train") == "unseen"
    assert _attributed_set("hf:owner/name@test", "train") == "test"
    assert _attributed_set("hf:owner/name", "train") == "train"
    assert _attributed_set("hf:owner/name", "eval") is None  # the loader picks the only split, or test
    assert _attributed_set("pairs.jsonl", "train") is None

"""The error contract of every command, table-driven: bad input → one line on stderr that names the
file, row, option or layer and says what to do; exit code 2; no traceback; nothing half-written
under ``--out``.

Each case builds its bad input in a temporary directory and returns the command line and a
substring the message must contain. The tiny Gemma 3 checkpoint of ``tiny_workspace`` stands in
for a model (its 3 decoder layers are 64 wide).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from mechmed.cli import main

CASES = {}


def case(command: str):
    def register(fn):
        CASES[f"{command}:{fn.__name__}"] = fn
        return fn
    return register


def _pairs(ws) -> str:
    return str(ws[0] / "pairs.jsonl")


def _row(**kw) -> dict:
    return {"id": "r1", "image": "images/0.png", "question": "Is there a pleural effusion?",
            "paraphrase": "Is there any effusion?", "answer": "yes", **kw}


def _write_rows(tmp: Path, ws, rows, name="bad.jsonl") -> str:
    path = tmp / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    if not (tmp / "images").exists():
        (tmp / "images").symlink_to(ws[0] / "images")
    return str(path)


def _evaluate(ws, tmp, data=None, model=None, *extra):
    return ["evaluate", "--model", model or str(ws[1]), "--data", data or _pairs(ws), "--out", str(tmp / "out"),
            "--no-controls", *extra]


# ----------------------------------------------------------------------------- data files (evaluate)


@case("evaluate")
def risk_out_of_range(ws, tmp):
    return _evaluate(ws, tmp, None, None, "--risk", "1.5"), "--risk 1.5"


@case("evaluate")
def missing_data_file(ws, tmp):
    return _evaluate(ws, tmp, str(tmp / "nope.jsonl")), "nope.jsonl"


@case("evaluate")
def unknown_demo_set(ws, tmp):
    return _evaluate(ws, tmp, "demo:heldout"), "demo:heldout: the demo has no set 'heldout'; use demo:eval"


@case("train")
def extra_eval_without_a_name(ws, tmp):
    return ["train", "--model", str(ws[1]), "--layers", "1", "--train-data", _pairs(ws), "--eval-data", _pairs(ws),
            "--extra-eval", "demo:unseen", "--out", str(tmp / "out")], "--extra-eval demo:unseen: give NAME=DATA"


@case("evaluate")
def unreadable_data_directory(ws, tmp):
    (tmp / "empty_dir").mkdir()
    return _evaluate(ws, tmp, str(tmp / "empty_dir")), "empty_dir"


@case("evaluate")
def malformed_jsonl_line(ws, tmp):
    return _evaluate(ws, tmp, _write_rows(tmp, ws, [_row(), "{not json"])), "line 2"


@case("evaluate")
def row_without_paraphrase(ws, tmp):
    r = _row()
    del r["paraphrase"]
    return _evaluate(ws, tmp, _write_rows(tmp, ws, [r])), "paraphrase"


@case("evaluate")
def answer_not_yes_no(ws, tmp):
    return _evaluate(ws, tmp, _write_rows(tmp, ws, [_row(answer="maybe")])), "maybe"


@case("evaluate")
def duplicate_ids(ws, tmp):
    return _evaluate(ws, tmp, _write_rows(tmp, ws, [_row(), _row()])), "r1"


@case("evaluate")
def missing_image(ws, tmp):
    return _evaluate(ws, tmp, _write_rows(tmp, ws, [_row(image="images/missing.png")])), "missing.png"


@case("evaluate")
def corrupt_image(ws, tmp):
    (tmp / "img").mkdir()
    (tmp / "img" / "junk.png").write_bytes(b"this is not a png")
    return _evaluate(ws, tmp, _write_rows(tmp, ws, [_row(image="img/junk.png")])), "junk.png"


@case("evaluate")
def truncated_image(ws, tmp):
    (tmp / "img").mkdir()
    data = (ws[0] / "images" / "0.png").read_bytes()
    (tmp / "img" / "cut.png").write_bytes(data[: len(data) // 2])
    return _evaluate(ws, tmp, _write_rows(tmp, ws, [_row(image="img/cut.png")])), "cut.png"


@case("evaluate")
def empty_dataset(ws, tmp):
    (tmp / "empty.jsonl").write_text("")
    return _evaluate(ws, tmp, str(tmp / "empty.jsonl")), "empty.jsonl"


@case("evaluate")
def malformed_csv(ws, tmp):
    (tmp / "bad.csv").write_text("id,image,question\nr1,images/0.png,Is there?\n")
    return _evaluate(ws, tmp, str(tmp / "bad.csv")), "bad.csv"


# ----------------------------------------------------------------------------- models and options


@case("evaluate")
def model_directory_missing(ws, tmp):
    return _evaluate(ws, tmp, None, str(tmp / "no_model")), "no_model"


@case("evaluate")
def unknown_model_family(ws, tmp):
    fake = tmp / "bert"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    return _evaluate(ws, tmp, None, str(fake)), "BertModel"


@case("evaluate")
def malformed_model_config(ws, tmp):
    fake = tmp / "broken_model"
    fake.mkdir()
    (fake / "config.json").write_text("{oops")
    return _evaluate(ws, tmp, None, str(fake)), "broken_model"


@case("evaluate")
def answer_word_not_one_token(ws, tmp):
    return _evaluate(ws, tmp, None, None, "--answer-words", "yes,not at all"), "not at all"


@case("evaluate")
def output_not_writable(ws, tmp):
    (tmp / "a_file").write_text("x")
    return ["evaluate", "--model", str(ws[1]), "--data", _pairs(ws), "--out", str(tmp / "a_file" / "out")], "a_file"


@case("evaluate")
def unknown_option_value(ws, tmp):
    return _evaluate(ws, tmp, None, None, "--batch-size", "lots"), "--batch-size"


@case("compare")
def compare_missing_run(ws, tmp):
    return ["compare", str(tmp / "x"), str(tmp / "y")], "metrics.json"


@case("compare")
def compare_not_an_evaluation(ws, tmp):
    (tmp / "x").mkdir()
    (tmp / "x" / "metrics.json").write_text(json.dumps({"hello": 1}))
    return ["compare", str(tmp / "x"), str(tmp / "x")], "metrics.json"


# ----------------------------------------------------------------------------- SAEs and layers


def _sae(tmp: Path, name: str, d_in=64, layer=1, save_layer=None):
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from mechmed.sites import Site

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=32, k=4, metadata=SAEMetadata(hook_name=Site(layer).hook_name)))
    sae.save_model(str(tmp / name / f"layer_{layer if save_layer is None else save_layer}"))
    return str(tmp / name)


def _sae_check(ws, tmp, saes, layers="1"):
    return ["sae-check", "--model", str(ws[1]), "--saes", saes, "--layers", layers, "--texts", "general",
            "--no-ce", "--out", str(tmp / "out")]


@case("sae-check")
def layer_out_of_range(ws, tmp):
    return _sae_check(ws, tmp, _sae(tmp, "saes"), layers="7"), "layer 7"


@case("sae-check")
def sae_width_mismatch(ws, tmp):
    return _sae_check(ws, tmp, _sae(tmp, "narrow", d_in=48)), "48"


@case("sae-check")
def sae_hook_not_the_site(ws, tmp):
    return _sae_check(ws, tmp, _sae(tmp, "wrong", layer=2, save_layer=1)), "blocks.2"


@case("sae-check")
def sae_directory_missing(ws, tmp):
    return _sae_check(ws, tmp, str(tmp / "no_saes")), "no_saes"


@case("sae-check")
def unknown_text_set(ws, tmp):
    return ["sae-check", "--model", str(ws[1]), "--saes", _sae(tmp, "saes"), "--layers", "1", "--texts", "poetry",
            "--out", str(tmp / "out")], "poetry"


@case("sae-check")
def malformed_layers_option(ws, tmp):
    return _sae_check(ws, tmp, _sae(tmp, "saes"), layers="one-two"), "one-two"


@case("attribute")
def attribute_sae_width_mismatch(ws, tmp):
    return ["attribute", "--model", str(ws[1]), "--data", _pairs(ws), "--saes", _sae(tmp, "narrow", d_in=48),
            "--out", str(tmp / "out")], "48"


@case("attribute")
def attribute_empty_dataset(ws, tmp):
    (tmp / "empty.jsonl").write_text("\n")
    return ["attribute", "--model", str(ws[1]), "--data", str(tmp / "empty.jsonl"), "--saes", "none",
            "--out", str(tmp / "out")], "empty.jsonl"


# ----------------------------------------------------------------------------- select-layers


def _scores(tmp: Path, n_layers=3, **kw) -> str:
    body = {"model": "x", "n_layers": n_layers,
            "scores": {"gain_flipped": {"mean": [0.1 * (i + 1) for i in range(n_layers)]}}, **kw}
    (tmp / "layer_scores.json").write_text(json.dumps(body))
    return str(tmp / "layer_scores.json")


@case("select-layers")
def scores_file_missing(ws, tmp):
    return ["select-layers", "--scores", str(tmp / "gone.json"), "--out", str(tmp / "out" / "t.yaml")], "gone.json"


@case("select-layers")
def scores_file_malformed(ws, tmp):
    (tmp / "s.json").write_text("{\"scores\": [1, 2")
    return ["select-layers", "--scores", str(tmp / "s.json"), "--out", str(tmp / "out" / "t.yaml")], "s.json"


@case("select-layers")
def scores_file_of_another_kind(ws, tmp):
    (tmp / "s.json").write_text(json.dumps([1, 2, 3]))
    return ["select-layers", "--scores", str(tmp / "s.json"), "--out", str(tmp / "out" / "t.yaml")], "s.json"


@case("select-layers")
def window_wider_than_model(ws, tmp):
    return ["select-layers", "--scores", _scores(tmp), "--width", "5", "--out", str(tmp / "out" / "t.yaml")], \
        "--width"


@case("select-layers")
def unknown_strategy(ws, tmp):
    return ["select-layers", "--scores", _scores(tmp), "--strategy", "best", "--out", str(tmp / "out" / "t.yaml")], \
        "--strategy"


@case("select-layers")
def unknown_score(ws, tmp):
    return ["select-layers", "--scores", _scores(tmp), "--score", "attr_magic", "--width", "2",
            "--out", str(tmp / "out" / "t.yaml")], "attr_magic"


@case("select-layers")
def nan_in_scores(ws, tmp):
    path = tmp / "nan.json"
    path.write_text('{"model": "x", "scores": {"gain_flipped": {"mean": [0.1, NaN, 0.3]}}}')
    return ["select-layers", "--scores", str(path), "--width", "2", "--out", str(tmp / "out" / "t.yaml")], "layer 1"


# ----------------------------------------------------------------------------- train


def _config(ws, tmp, **kw) -> str:
    root, ckpt = ws
    cfg = {"model": str(ckpt), "layers": [1], "rank": 2, "alpha": 4.0, "lr": 1e-3, "batch_size": 2, "grad_accum": 1,
           "max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "guard_pairs": 4,
           "train_data": str(root / "train_pairs.jsonl"), "eval_data": str(root / "pairs.jsonl"), **kw}
    (tmp / "train.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp / "train.yaml")


def _train(ws, tmp, *extra, **cfg):
    return ["train", "--config", _config(ws, tmp, **cfg), "--out", str(tmp / "out"), *extra]


@case("evaluate")
def device_that_is_not_a_device(ws, tmp):
    return _evaluate(ws, tmp, None, None, "--device", "banana"), "--device banana: not a torch device"


@case("train")
def device_that_is_not_there(ws, tmp):
    """A GPU this machine does not have fails before the base evaluation, not as a traceback after it."""
    return ["train", "--config", _config(ws, tmp), "--device", "cuda:99", "--out", str(tmp / "out")], \
        "--device cuda:99: "


@case("train")
def more_pairs_per_step_than_training_pairs(ws, tmp):
    """12 training pairs cannot fill an optimiser step of 4 × 8 pairs: said before the model loads."""
    return _train(ws, tmp, "--batch-size", "4", "--grad-accum", "8"), \
        "batch_size × grad_accum = 32 pairs per optimiser step, but train_data has 12"


@case("train")
def layers_past_the_model(ws, tmp):
    """Layers the model does not have fail from its config, before the base model is evaluated."""
    return ["train", "--config", _config(ws, tmp), "--layers", "2-40", "--out", str(tmp / "out")], \
        "config option layers: layer 3 is outside the model's 3 decoder layers (0-2)"


@case("train")
def target_module_not_in_the_layers(ws, tmp):
    return ["train", "--config", _config(ws, tmp), "--target-modules", "q_proj,nope_proj", "--out",
            str(tmp / "out")], "config option target_modules: matched 1 linear modules, expected 2"


@case("train")
def config_missing(ws, tmp):
    return ["train", "--config", str(tmp / "none.yaml"), "--out", str(tmp / "out")], "none.yaml"


@case("train")
def config_malformed_yaml(ws, tmp):
    (tmp / "bad.yaml").write_text("layers: [1, 2\nrank: 4\n")
    return ["train", "--config", str(tmp / "bad.yaml"), "--out", str(tmp / "out")], "bad.yaml"


@case("train")
def config_key_misspelled(ws, tmp):
    return _train(ws, tmp, rnak=4), "did you mean 'rank'"


@case("train")
def train_layer_out_of_range(ws, tmp):
    return _train(ws, tmp, layers=[1, 9]), "layer 9"


@case("train")
def unknown_method(ws, tmp):
    return _train(ws, tmp, method="qlora"), "qlora"


@case("train")
def unknown_consistency_loss(ws, tmp):
    return _train(ws, tmp, consistency="cosine"), "cosine"


@case("train")
def target_module_not_in_model(ws, tmp):
    return _train(ws, tmp, target_modules=["qkv_proj"]), "target_modules"


@case("train")
def loss_not_finite(ws, tmp):
    return _train(ws, tmp, lr=1e30, max_steps=4, eval_every=100), "lower lr"


@case("train")
def train_data_missing(ws, tmp):
    return _train(ws, tmp, train_data=str(tmp / "nothing.jsonl")), "nothing.jsonl"


@case("train")
def no_layers_given(ws, tmp):
    return ["train", "--out", str(tmp / "out")], "--layers"


# ----------------------------------------------------------------------------- ablate


def _ablation(ws, tmp, body) -> list:
    (tmp / "ablation.yaml").write_text(yaml.safe_dump(body))
    return ["ablate", "--config", str(tmp / "ablation.yaml"), "--out", str(tmp / "out")]


@case("ablate")
def ablation_unknown_arm(ws, tmp):
    return _ablation(ws, tmp, {"train": _config(ws, tmp), "arms": ["selected", "latest"]}), "latest"


@case("ablate")
def ablation_key_misspelled(ws, tmp):
    return _ablation(ws, tmp, {"train": _config(ws, tmp), "method": ["lora"]}), "did you mean 'methods'"


@case("ablate")
def ablation_without_train(ws, tmp):
    return _ablation(ws, tmp, {"arms": ["selected"]}), "train"


@case("ablate")
def ablation_unknown_method(ws, tmp):
    return _ablation(ws, tmp, {"train": _config(ws, tmp), "methods": ["dora"]}), "dora"


@case("ablate")
def ablation_window_past_model(ws, tmp):
    return _ablation(ws, tmp, {"train": _config(ws, tmp, layers=[5]), "arms": ["selected"]}), "[5]"


@case("ablate")
def ablation_on_a_gpu_that_is_not_there(ws, tmp):
    """The grid's device is checked before its base model is evaluated."""
    return [*_ablation(ws, tmp, {"train": _config(ws, tmp), "arms": ["selected"]}), "--device", "cuda:7"], \
        "--device cuda:7: "


@case("ablate")
def ablation_target_module_not_in_the_model(ws, tmp):
    """Every arm's target modules are checked on the model's module tree (no weights) before the base
    model is evaluated."""
    return _ablation(ws, tmp, {"train": _config(ws, tmp, target_modules=["q_proj", "nope_proj"]),
                               "arms": ["selected", "all"]}), "config option target_modules: matched"


@case("demo")
def demo_on_a_gpu_that_is_not_there(ws, tmp):
    """The demo checks its device before it builds or reuses anything."""
    return ["demo", "--device", "cuda:5", "--out", str(tmp / "out")], "--device cuda:5: "


@case("evaluate")
def prompt_template_with_an_unknown_placeholder(ws, tmp):
    return _evaluate(ws, tmp, None, None, "--prompt-template", "Q: {quest}"), "--prompt-template 'Q: {quest}'"


@case("evaluate")
def gguf_file_that_is_not_there(ws, tmp):
    return _evaluate(ws, tmp, None, str(tmp / "model.gguf")), "no such GGUF file"


@case("evaluate")
def gguf_file_not_in_the_directory(ws, tmp):
    (tmp / "models").mkdir()
    (tmp / "models" / "other.gguf").write_bytes(b"GGUF")
    return _evaluate(ws, tmp, None, str(tmp / "models"), "--gguf-file", "medgemma-4b-q4.gguf"), \
        "choose one of other.gguf"


@case("evaluate")
def hub_dataset_without_an_owner(ws, tmp):
    return _evaluate(ws, tmp, None, None, "--data", "hf:psf-med"), "name a hub dataset as OWNER/NAME"


@case("evaluate")
def device_map_that_accelerate_does_not_know(ws, tmp):
    return _evaluate(ws, tmp, None, None, "--device-map", "everywhere"), "--device-map"


def _files(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tiny_workspace, tmp_path, capsys):
    argv, expect = CASES[name](tiny_workspace, tmp_path)
    out_arg = argv[argv.index("--out") + 1] if "--out" in argv else None
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert expect in err, err
    if out_arg and Path(out_arg).suffix == "":
        assert _files(Path(out_arg)) == [], "half-written output"


def test_the_matrix_is_large():
    assert len(CASES) >= 30
    assert {c.split(":")[0] for c in CASES} >= {"evaluate", "compare", "sae-check", "attribute", "select-layers",
                                                 "train", "ablate"}


def test_newer_config_keys_are_warned_and_dropped(tiny_workspace, tmp_path, caplog):
    from mechmed.config import CONFIG_VERSION, TrainConfig

    path = Path(_config(tiny_workspace, tmp_path))
    body = yaml.safe_load(path.read_text())
    body.update(config_version=CONFIG_VERSION + 1, future_option=3)
    path.write_text(yaml.safe_dump(body))
    with caplog.at_level("WARNING"):
        cfg = TrainConfig.load(path)
    assert cfg.layers == [1] and "future_option" in caplog.text


def test_nan_activations_are_named(tiny_workspace, tmp_path, capsys):
    """A checkpoint whose layer-1 weights hold NaN: the error names the model and says the margins are
    not finite, instead of writing NaN metrics."""
    import torch

    from mechmed import tiny

    model, proc = tiny.gemma3_vlm(layers=3, seed=1)
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    ckpt = tiny.save(model, proc, tmp_path / "nan_model")
    code = main(_evaluate(tiny_workspace, tmp_path, None, str(ckpt)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not finite" in err and "nan_model" in err, err
    assert _files(tmp_path / "out") == []


def test_files_are_written_atomically(tmp_path, monkeypatch):
    """An interrupted write leaves the previous file (or none), never a partial one."""
    from mechmed.io import write_json

    target = tmp_path / "metrics.json"
    write_json(target, {"a": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]

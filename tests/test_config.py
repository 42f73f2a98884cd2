"""The training config: round trip, validation, unknown keys, --help text from field docs."""

from __future__ import annotations

import pytest
import yaml

from mechmed.config import CONFIG_VERSION, TrainConfig, demo_defaults, field_docs
from mechmed.errors import MechmedError


def test_round_trip(tmp_path):
    c = TrainConfig(layers=[3, 4, 5], method="lora", provenance={"strategy": "window"}, **demo_defaults())
    path = c.save(tmp_path / "train.yaml")
    raw = yaml.safe_load(path.read_text())
    assert raw["config_version"] == CONFIG_VERSION
    assert TrainConfig.load(path) == c


def test_defaults_follow_the_paper_cards():
    c = TrainConfig(layers=[15, 16, 17, 18, 19])
    assert (c.rank, c.alpha, c.dropout, c.lr, c.batch_size, c.grad_accum, c.epochs) == (16, 32.0, 0.05, 2e-4, 1, 8, 3.0)
    assert c.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(("patch", "match"), [
    ({"layrs": [1]}, "did you mean 'layers'"),
    ({"method": "dora"}, "method"),
    ({"layers": []}, "layers"),
    ({"rank": "sixteen"}, "rank"),
    ({"consistency": "kl"}, "consistency"),
    ({"ce_weight": 0, "consistency_weight": 0}, "not both zero"),
    ({"method": "spectral_moe", "rank": 12}, "multiple of"),
    ({"spectral": {"top_k": 9}, "method": "spectral_moe", "rank": 16}, "top_k"),
    ({"spectral": {"n_expert": 4}}, "did you mean 'n_experts'"),
])
def test_invalid_configs_name_the_option(tmp_path, patch, match):
    d = {"layers": [1, 2], **patch}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(MechmedError, match=match):
        TrainConfig.load(path)


def test_newer_version_keys_are_warned_and_dropped(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"config_version": CONFIG_VERSION + 1, "layers": [2], "future_knob": 3}))
    c = TrainConfig.load(path)
    assert c.layers == [2]
    assert "future_knob" in caplog.text


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("layers: [1, 2\nrank: 3\n")
    with pytest.raises(MechmedError, match=r"c.yaml, line \d"):
        TrainConfig.load(path)
    with pytest.raises(MechmedError, match="not found"):
        TrainConfig.load(tmp_path / "missing.yaml")


def test_every_field_is_documented():
    docs = field_docs()
    from dataclasses import fields

    assert {f.name for f in fields(TrainConfig)} == set(docs)
    assert all(len(v) > 10 for v in docs.values())


def test_rank_default_depends_on_the_method():
    """LoRA's rank per layer defaults to 16; spectral experts share a total rank of 32 (r/N each);
    an explicit rank wins, and the resolved rank is what the saved config holds."""
    from mechmed.config import DEFAULT_RANK

    assert TrainConfig(layers=[0]).rank == DEFAULT_RANK["lora"] == 16
    spectral = TrainConfig(layers=[0], method="spectral_moe")
    assert spectral.rank == DEFAULT_RANK["spectral_moe"] == 32
    assert spectral.rank // spectral.spectral.n_experts == 4
    assert TrainConfig(layers=[0], method="spectral_moe", rank=16).rank == 16
    assert TrainConfig.from_dict(spectral.to_dict()).rank == 32


def test_extra_eval_defaults_and_names():
    # eval_data 'demo': its unseen and negation sets
    assert TrainConfig(layers=[1]).extra_eval == {"unseen": "demo:unseen", "negation": "demo:negation"}
    assert TrainConfig(layers=[1], eval_data="pairs.jsonl").extra_eval == {}
    assert TrainConfig(layers=[1], extra_eval={" neg ": " n.jsonl "}).extra_eval == {"neg": "n.jsonl"}
    for bad in ({"..": "x.jsonl"}, {"main": "x.jsonl"}, {"a/b": "x.jsonl"}, {"ok": ""}, ["x.jsonl"]):
        with pytest.raises(MechmedError, match="extra_eval"):
            TrainConfig(layers=[1], extra_eval=bad)

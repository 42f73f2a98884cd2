"""Activation store: round trip, resume after interruption, atomic shards, safetensors only, bad inputs."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from conftest import QUESTIONS, make_image
from mechmed.capture import capture, text_token_mask
from mechmed.data.records import ParaphrasePair
from mechmed.errors import MechmedError
from mechmed.readout import build_inputs
from mechmed.sites import Site
from mechmed.store import ActivationStore, Prompt, as_prompts, read_index, write_activations

SITES = [Site(0), Site(2), Site(1, "mlp_out")]
N = 7  # prompts; shard_size 2 -> shards of 2, 2, 2, 1


@pytest.fixture(scope="module")
def vlm(tiny_bundles):
    return tiny_bundles["Gemma3ForConditionalGeneration"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    out = []
    for i in range(N):
        path = root / f"img{i}.png"
        make_image(i).save(path)
        out.append(Prompt(f"p{i}", QUESTIONS[i % len(QUESTIONS)] + (" Answer yes or no." if i % 3 else ""), str(path)))
    return out


def _direct(b, prompts, sites, batch, positions="last"):
    """Capture without the store, batch by batch: {site: [rows, d]}."""
    from PIL import Image

    parts = {s: [] for s in sites}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        inputs = build_inputs(b.processor, [p.text for p in chunk], [Image.open(p.image) for p in chunk])
        pos = "last" if positions == "last" else text_token_mask(b, inputs)
        acts, _ = capture(b, inputs, sites, positions=pos)
        for s in sites:
            parts[s].append(acts[s][:, 0] if positions == "last" else acts[s])
    return {s: torch.cat(v) for s, v in parts.items()}


def _same_store(a, b) -> None:
    assert json.loads((a / "meta.json").read_text()) == json.loads((b / "meta.json").read_text())
    assert read_index(a) == read_index(b)
    sa, sb = ActivationStore(a), ActivationStore(b)
    for s in sa.sites:
        assert torch.equal(sa[s], sb[s])


def test_round_trip_equals_direct_capture(vlm, prompts, tmp_path):
    res = write_activations(vlm, prompts, SITES, tmp_path / "s", shard_size=2, batch_size=2)
    assert res.complete and res.written == [0, 1, 2, 3] and res.skipped == []
    assert res.peak_rows <= 2  # one shard in memory
    store = ActivationStore(tmp_path / "s")
    assert len(store) == N and store.n_rows == N and store.complete
    assert set(store.sites) == set(SITES) and store.d_model == vlm.d_model and store.dtype == torch.float32
    direct = _direct(vlm, prompts, SITES, batch=2)
    for s in SITES:
        assert store[s].shape == (N, vlm.d_model)
        torch.testing.assert_close(store[s], direct[s], atol=0, rtol=0)
        # another batching only changes the padding: equal to float rounding
        torch.testing.assert_close(store[s], _direct(vlm, prompts, [s], batch=N)[s], atol=1e-5, rtol=1e-5)
    # lazy access paths agree
    assert torch.equal(store["resid_post:2"], store[Site(2)]) and torch.equal(store["mlp_out.1"], store[SITES[2]])
    batches = list(store.iter_batches(Site(0), 3))
    assert [len(x) for x in batches] == [3, 3, 1]
    assert torch.equal(torch.cat(batches), store[Site(0)])
    p = store.prompt(4)
    assert (p["id"], p["text"], p["image"], p["rows"], p["shard"]) == \
        ("p4", prompts[4].text, prompts[4].image, (4, 5), 2)
    index = read_index(tmp_path / "s")
    assert index["complete"] and [(s["prompt_start"], s["prompt_end"]) for s in index["shards"]] == \
        [(0, 2), (2, 4), (4, 6), (6, 7)]
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["keys"] == ["resid_post.0", "mlp_out.1", "resid_post.2"]
    assert meta["d_model"] == vlm.d_model and meta["dtype"] == "float32" and len(meta["prompts"]) == N


def test_token_positions_store_ragged_rows(vlm, prompts, tmp_path):
    write_activations(vlm, prompts[:5], [Site(1)], tmp_path / "t", positions="text", shard_size=4, batch_size=2)
    store = ActivationStore(tmp_path / "t")
    direct = _direct(vlm, prompts[:5], [Site(1)], batch=2, positions="text")[Site(1)]
    torch.testing.assert_close(store[Site(1)], direct, atol=0, rtol=0)
    rows = store.prompt_rows()
    assert len(rows) == 5 and int(rows.sum()) == store.n_rows == len(direct)
    r = store.rows(3)
    assert r.stop - r.start == int(rows[3]) and store.prompt(3)["rows"] == (r.start, r.stop)


def test_resume_after_interruption_is_identical(vlm, prompts, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    write_activations(vlm, prompts, SITES, full, shard_size=2, batch_size=2)

    def crash_after_second(k):
        if k == 1:
            raise KeyboardInterrupt  # as if the job were stopped right after shard 1 landed

    with pytest.raises(KeyboardInterrupt):
        write_activations(vlm, prompts, SITES, part, shard_size=2, batch_size=2, on_shard=crash_after_second)
    assert sorted(p.name for p in part.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not read_index(part)["complete"]
    with pytest.raises(MechmedError, match="incomplete.*resume"):
        ActivationStore(part)
    partial = ActivationStore(part, allow_partial=True)
    assert len(partial) == 4 and not partial.complete
    # max_shards: one more shard, then stop
    step = write_activations(vlm, prompts, SITES, part, shard_size=2, batch_size=2, max_shards=1)
    assert step.written == [2] and step.skipped == [0, 1] and not step.complete
    done = write_activations(vlm, prompts, SITES, part, shard_size=2, batch_size=2)
    assert done.written == [3] and done.skipped == [0, 1, 2] and done.complete
    _same_store(full, part)
    again = write_activations(vlm, prompts, SITES, part, shard_size=2, batch_size=2)
    assert again.written == [] and again.complete


def test_a_killed_write_never_leaves_a_complete_looking_shard(vlm, prompts, tmp_path, monkeypatch):
    import mechmed.store as store_mod

    ref, out = tmp_path / "ref", tmp_path / "out"
    write_activations(vlm, prompts, SITES, ref, shard_size=3, batch_size=3)
    real_save = store_mod._save_file
    calls = []

    def dies_mid_write(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 2:  # the second shard: half a file, then the process "dies"
            real_save(tensors, path, metadata)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            raise SystemExit("killed")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(store_mod, "_save_file", dies_mid_write)
    with pytest.raises(SystemExit):
        write_activations(vlm, prompts, SITES, out, shard_size=3, batch_size=3)
    monkeypatch.setattr(store_mod, "_save_file", real_save)
    assert [p.name for p in out.glob("shard-*")] == ["shard-00000.safetensors"]
    assert not list(out.glob(".*.tmp"))  # the half-written temporary is gone
    # a SIGKILL leaves its temporary behind: it is ignored, then cleaned up by the next run
    (out / ".shard-00001.safetensors.abc123.tmp").write_bytes(b"\x00" * 10)
    with pytest.raises(MechmedError, match="incomplete"):
        ActivationStore(out)
    res = write_activations(vlm, prompts, SITES, out, shard_size=3, batch_size=3)
    assert res.written == [1, 2] and res.skipped == [0]
    assert not list(out.glob(".*.tmp"))
    _same_store(ref, out)


def test_shards_are_safetensors_not_pickle(vlm, prompts, tmp_path):
    from safetensors import safe_open

    write_activations(vlm, prompts[:3], SITES, tmp_path, shard_size=2, batch_size=2, dtype="bfloat16")
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json", ".safetensors", ".safetensors"]
    for shard in tmp_path.glob("*.safetensors"):
        data = shard.read_bytes()
        assert not data.startswith(b"\x80") and not data.startswith(b"PK")  # neither pickle nor torch.save zip
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        assert {"resid_post.0", "resid_post.2", "mlp_out.1", "prompt_rows"} <= set(header)
        assert header["resid_post.0"]["dtype"] == "BF16"
        with safe_open(str(shard), framework="pt") as f:
            assert f.metadata()["format"] == "mechmed-activations"
    assert ActivationStore(tmp_path)[Site(0)].dtype == torch.bfloat16


def test_paraphrase_pairs_become_two_prompts_each(tiny_bundles, tmp_path):
    b = tiny_bundles["Gemma3ForCausalLM"]
    pairs = [ParaphrasePair(id=f"q{i}", question=QUESTIONS[i], paraphrase=QUESTIONS[i + 1], answer="yes")
             for i in range(3)]
    assert [p.id for p in as_prompts(pairs)][:2] == ["q0/question", "q0/paraphrase"]
    write_activations(b, pairs, [1], tmp_path, shard_size=4, batch_size=4)
    store = ActivationStore(tmp_path)
    assert len(store) == 6 and store.prompt(1)["text"] == QUESTIONS[1]
    inputs = build_inputs(b.processor, [QUESTIONS[0], QUESTIONS[1], QUESTIONS[1], QUESTIONS[2]])
    direct = capture(b, inputs, [Site(1)], positions="last").acts[Site(1)][:, 0]
    torch.testing.assert_close(store[Site(1)][:4], direct, atol=0, rtol=0)


def test_bad_inputs_raise_mechmed_errors(vlm, prompts, tmp_path):
    with pytest.raises(MechmedError, match="layer 9: out of range"):
        write_activations(vlm, prompts, [Site(9)], tmp_path / "a")
    with pytest.raises(MechmedError, match="prompt list is empty"):
        write_activations(vlm, [], SITES, tmp_path / "a")
    with pytest.raises(MechmedError, match="no sites"):
        write_activations(vlm, prompts, [], tmp_path / "a")
    with pytest.raises(MechmedError, match="positions='first'"):
        write_activations(vlm, prompts, SITES, tmp_path / "a", positions="first")
    with pytest.raises(MechmedError, match="shard_size=0"):
        write_activations(vlm, prompts, SITES, tmp_path / "a", shard_size=0)
    with pytest.raises(MechmedError, match="dtype='int8'"):
        write_activations(vlm, prompts, SITES, tmp_path / "a", dtype="int8")
    with pytest.raises(MechmedError, match="appears twice"):
        write_activations(vlm, [prompts[0], prompts[0]], SITES, tmp_path / "a")
    with pytest.raises(MechmedError, match="has no image"):
        write_activations(vlm, [prompts[0], Prompt("x", "Is the heart normal?")], SITES, tmp_path / "a")
    with pytest.raises(MechmedError, match="image .*missing.png: not found"):
        write_activations(vlm, [Prompt("x", "Is the heart normal?", str(tmp_path / "missing.png"))], SITES,
                          tmp_path / "a")
    write_activations(vlm, prompts[:2], SITES, tmp_path / "b", shard_size=2)
    with pytest.raises(MechmedError, match="another run.*sites"):
        write_activations(vlm, prompts[:2], [Site(1)], tmp_path / "b", shard_size=2)
    store = ActivationStore(tmp_path / "b")
    with pytest.raises(MechmedError, match="site resid_post:1: not in store"):
        store[Site(1)]
    with pytest.raises(MechmedError, match="prompt 5: out of range"):
        store.prompt(5)
    with pytest.raises(MechmedError, match="not a directory"):
        ActivationStore(tmp_path / "nowhere")


def test_capture_command_stores_the_hidden_states(tiny_workspace, tmp_path):
    """``mechmed capture`` writes both phrasings of every pair; each stored row is the model's own
    ``output_hidden_states`` at the answer position (one prompt at a time; 1e-5)."""
    from mechmed.cli import main
    from mechmed.data import load_pairs
    from mechmed.data.images import load_image
    from mechmed.models import load_model

    ws, ckpt = tiny_workspace
    out = tmp_path / "acts"
    assert main(["capture", "--model", str(ckpt), "--data", str(ws / "pairs.jsonl"), "--layers", "0,1",
                 "--shard-size", "3", "--out", str(out)]) == 0
    store = ActivationStore(out)
    pairs = load_pairs(ws / "pairs.jsonl")
    assert [p["id"] for p in store.prompts] == [f"{p.id}/{side}" for p in pairs for side in ("question", "paraphrase")]
    b = load_model(str(ckpt))
    for i, p in enumerate(store.prompts):
        inputs = build_inputs(b.processor, [p["text"]], [load_image(p["image"])])
        with torch.no_grad():
            hidden = b.model(**inputs, output_hidden_states=True).hidden_states
        for layer in (0, 1):  # not the last layer: its hidden state is after the final norm
            torch.testing.assert_close(store[Site(layer)][i].float(), hidden[layer + 1][0, -1].float(), atol=1e-5, rtol=0)
    # a layer the model does not have, or a dtype the store does not keep, fails before any weights
    # load, and writes nothing
    assert main(["capture", "--model", str(ckpt), "--layers", "9", "--out", str(tmp_path / "bad")]) == 2
    assert main(["capture", "--model", str(ckpt), "--store-dtype", "float64", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()

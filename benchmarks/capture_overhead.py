"""Capture overhead: a bare forward vs capturing every decoder layer's resid_post with each backend.

Two randomly initialised ``Gemma3ForConditionalGeneration`` models (built offline by
``mechmed.tiny.gemma3_vlm``):

- ``demo``: the embedded default's size (6 layers, d_model 64);
- ``medgemma-4b-shaped``: MedGemma-4B's decoder width (hidden 2560, 8 heads x head_dim 256, 4 KV
  heads, MLP 10240) with 2 layers and a small vision tower, so the language model dominates.

Each measured call is one forward with ``use_cache=False, logits_to_keep=1`` under ``no_grad``:
``bare`` (the model alone), ``hooks`` / ``nnsight`` / ``transformer_lens`` (``mechmed.capture.capture``
of all layers' resid_post, all positions). Wrappers are built before timing (their one-off build time is
reported apart). ``bare_control`` is the bare forward timed a second time, as its own condition:
its ratio to ``bare`` shows the noise floor (on a machine shared with other jobs, a few per cent or
more). After warm-up, each round times every condition once, in an order rotated round by
round (alternating A/B, so drift and background load hit all conditions alike); a sample on the demo
model is the mean of a few consecutive forwards (they take milliseconds). Reported: median,
quartiles, min, max per condition; ``ratio`` = median over rounds of (condition / bare in the same
round), the ratio of medians and the ratio of minima (the least-disturbed samples). Bars: hooks / bare <= 1.05, hooks <= nnsight, hooks <= TL.

Run: ``python benchmarks/capture_overhead.py`` (about 1-3 minutes on 2 cores); writes
``benchmarks/results/capture_overhead.json`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

CONDITIONS = ("bare", "bare_control", "hooks", "nnsight", "transformer_lens")
HERE = Path(__file__).resolve().parent


def build(name: str):
    from mechmed import tiny
    from mechmed.models import bundle

    if name == "demo":
        model, processor = tiny.gemma3_vlm(layers=6, hidden=64, initializer_range=0.05, seed=0)
        batch, image_size = 4, 32
    else:
        model, processor = tiny.gemma3_vlm(layers=2, hidden=2560, heads=8, kv_heads=4, head_dim=256,
                                           intermediate=10240, image_size=64, patch=8, tokens_per_image=64,
                                           vision_hidden=32, vision_layers=1, seed=0)
        batch, image_size = 1, 64
    return bundle(model, processor, name=name), batch, image_size


def make_inputs(b, batch: int, image_size: int):
    import numpy as np
    from PIL import Image

    from mechmed.readout import build_inputs

    questions = ["Is there a pleural effusion?", "Is there any evidence of edema in the left lung?",
                 "Does this image show cardiomegaly?", "Is the heart normal?"][:batch]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size), dtype=np.uint8)) for _ in questions]
    return build_inputs(b.processor, questions, images)


def runners(b, inputs):
    import torch

    from mechmed.capture import capture

    sites = b.family.sites(b.model.config)

    def bare():
        with torch.no_grad():
            return b.model(**inputs, use_cache=False, logits_to_keep=1)

    def backend(name):
        return lambda: capture(b, inputs, sites, name)

    # Every condition calls the model at the same Python stack depth (runner -> function -> model): on
    # CPython 3.11 a Python-bound forward's speed depends on that depth (see mechmed.capture._hook_fns).
    # bare_control runs the bare forward again: its ratio to bare is the noise floor of the measurement.
    return {"bare": lambda: bare(), "bare_control": lambda: bare(), **{n: backend(n) for n in CONDITIONS[2:]}}, sites


def interleaved(fns: dict, rounds: int, warmup: int, calls: int = 1) -> dict:
    """Seconds per call of each function, ``rounds`` samples each: after ``warmup`` calls of every
    function, each round runs all of them in a rotated order (reversed every other round), so drift
    in the machine's speed falls on every condition alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order[::-1] if r % 2 else order:
            t = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            times[name].append((time.perf_counter() - t) / calls)
    return times


def summary(times: dict, reference: str) -> dict:
    """Medians, quartiles and ratios to ``reference``, the ratio taken within each round."""
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        paired = [t / r for t, r in zip(ts, times[reference])]
        qr = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        out[name] = {"median_s": statistics.median(ts), "p25_s": q[0], "p75_s": q[2], "min_s": min(ts),
                     "max_s": max(ts), "n": len(ts), "ratio": statistics.median(paired),
                     "ratio_p25": qr[0], "ratio_p75": qr[2],
                     "ratio_of_medians": statistics.median(ts) / statistics.median(times[reference]),
                     "ratio_of_mins": min(ts) / min(times[reference]), "times_s": ts}
    return out


def measure(b, inputs, rounds: int, warmup: int, calls: int = 1) -> dict:
    import torch

    from mechmed.capture import nnsight_model, transformer_lens_bridge

    build_s = {}
    for name, fn in (("nnsight", nnsight_model), ("transformer_lens", transformer_lens_bridge)):
        t = time.perf_counter()
        fn(b)
        build_s[name] = time.perf_counter() - t
    run, sites = runners(b, inputs)
    # the backends must do the same work: check they agree before timing them
    ref = run["hooks"]().acts
    real = inputs["attention_mask"].bool()
    for name in ("nnsight", "transformer_lens"):
        acts = run[name]().acts
        for s in sites:
            torch.testing.assert_close(acts[s][real], ref[s][real], atol=1e-3, rtol=1e-3)
    times = interleaved({name: run[name] for name in CONDITIONS}, rounds, warmup, calls)
    out = summary(times, "bare")
    return {"conditions": out, "wrapper_build_s": build_s, "sites": len(sites), "calls_per_sample": calls,
            "rounds": rounds, "warmup": warmup,
            "tokens": list(inputs["input_ids"].shape)}


def machine() -> dict:
    import nnsight
    import torch
    import transformer_lens
    import transformers

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "nnsight": nnsight.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", "?"), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--rounds-demo", type=int, default=25)
    ap.add_argument("--calls-demo", type=int, default=4, help="forwards per timed sample on the demo model")
    ap.add_argument("--rounds-4b", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "capture_overhead.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = machine()
    t0 = time.perf_counter()
    results = {}
    for name, rounds, calls in (("demo", args.rounds_demo, args.calls_demo), ("medgemma-4b-shaped", args.rounds_4b, 1)):
        b, batch, image_size = build(name)
        inputs = make_inputs(b, batch, image_size)
        print(f"[{name}] inputs {list(inputs['input_ids'].shape)}, {rounds} rounds ...", file=sys.stderr, flush=True)
        results[name] = measure(b, inputs, rounds, args.warmup, calls)
        del b
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["total_s"] = time.perf_counter() - t0
    bars = {}
    for name, res in results.items():
        c = res["conditions"]
        bars[name] = {"hooks_over_bare_le_1.05": c["hooks"]["ratio"] <= 1.05,
                      "hooks_le_nnsight": c["hooks"]["median_s"] <= c["nnsight"]["median_s"],
                      "hooks_le_transformer_lens": c["hooks"]["median_s"] <= c["transformer_lens"]["median_s"],
                      "noise_floor_control_over_bare": round(c["bare_control"]["ratio"], 4)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "capture_overhead", "machine": info, "results": results, "bars": bars},
                              indent=2) + "\n")

    lines = [f"capture overhead (all layers' resid_post, all positions); torch {info['torch']}, "
             f"{info['torch_threads']} threads of {info['cpu_count']} CPUs, load {info['loadavg_start'][0]:.1f}",
             f"{'model':<20} {'condition':<17} {'median ms':>10} {'IQR ms':>17} {'min ms':>8} {'ratio':>7} {'r(med)':>7} "
             f"{'r(min)':>7}"]
    for name, res in results.items():
        for cond, r in res["conditions"].items():
            iqr = f"{1e3 * r['p25_s']:.1f}-{1e3 * r['p75_s']:.1f}"
            lines.append(f"{name:<20} {cond:<17} {1e3 * r['median_s']:>10.1f} {iqr:>17} {1e3 * r['min_s']:>8.1f} "
                         f"{r['ratio']:>7.3f} {r['ratio_of_medians']:>7.3f} {r['ratio_of_mins']:>7.3f}")
        lines.append(f"{name:<20} bars: " + ", ".join(
            f"{k}={v}" if isinstance(v, float) else f"{k}={'PASS' if v else 'FAIL'}" for k, v in bars[name].items()))
    lines.append(f"written {out} in {info['total_s']:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

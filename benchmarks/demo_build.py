"""Time the embedded default's cold build (data + training) for seeds 0, 1, 2 and check its bars.

Usage: ``python benchmarks/demo_build.py [--seeds 0 1 2] [--out benchmarks/results/demo_build.json]``

Each seed builds in a fresh temporary cache directory (nothing cached). Prints a table (seed, build
seconds, canonical accuracy, flip rate, yes-rate, blank-image agreement) and writes the rows, the
machine and the bars to JSON. Bars: build ≤ 60 s on 2 CPU cores, ≥ 6 decoder layers, canonical
accuracy ≥ 0.85, flip rate (held-out meaning-preserving pairs) in [0.15, 0.40], yes-rate in [0.3, 0.7], blank-image agreement ≤ 0.75.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BARS = {
    "build_s": (None, 60.0),
    "decoder_layers": (6, None),
    "canonical_accuracy": (0.85, None),
    "flip_rate": (0.15, 0.40),
    "yes_rate": (0.30, 0.70),
    "blank_image_agreement": (None, 0.75),
}


def _passes(row: dict) -> dict:
    out = {}
    for key, (lo, hi) in BARS.items():
        v = row[key]
        out[key] = (lo is None or v >= lo) and (hi is None or v <= hi)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_build.json")
    args = ap.parse_args(argv)

    import torch

    from mechmed.demo.build import ensure_demo_model, read_build_metrics

    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="mechmed-demo-bench-") as cache:
            t0 = time.perf_counter()
            path = ensure_demo_model(cache_dir=cache, seed=seed)
            wall = time.perf_counter() - t0
            m = read_build_metrics(path)
        rows.append(
            {
                "seed": seed,
                "build_s": m["timing"]["build_s"],
                "data_s": m["timing"]["data_s"],
                "train_s": m["timing"]["train_s"],
                "eval_s": m["timing"]["eval_s"],
                "ensure_s": wall,
                "cpu_s": m["timing"]["cpu_s"],
                "decoder_layers": m["decoder_layers"],
                "n_parameters": m["n_parameters"],
                "canonical_accuracy": m["canonical_accuracy"],
                "paraphrase_accuracy": m["paraphrase_accuracy"],
                "flip_rate": m["flip_rate"],
                "flip_rate_unseen": m["flip_rate_unseen"],
                "flip_rate_negation": m["flip_rate_negation"],
                "yes_rate": m["yes_rate"],
                "blank_image_agreement": m["blank_image_agreement"],
                "weights_sha256": m["weights_sha256"],
            }
        )
        rows[-1]["passes"] = _passes(rows[-1])

    header = f"{'seed':>4} {'build s':>8} {'canon acc':>9} {'flip':>6} {'yes-rate':>8} {'blank agr':>9}  bars"
    print(header)
    print("-" * len(header))
    for r in rows:
        ok = (
            "ok"
            if all(r["passes"].values())
            else "FAIL " + ",".join(k for k, v in r["passes"].items() if not v)
        )
        print(
            f"{r['seed']:>4} {r['build_s']:>8.1f} {r['canonical_accuracy']:>9.3f} {r['flip_rate']:>6.3f} "
            f"{r['yes_rate']:>8.3f} {r['blank_image_agreement']:>9.3f}  {ok}"
        )
    result = {
        "benchmark": "demo_build",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "bars": {k: list(v) for k, v in BARS.items()},
        "rows": rows,
        "all_pass": all(all(r["passes"].values()) for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

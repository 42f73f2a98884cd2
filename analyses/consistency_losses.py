"""Which consistency loss lowers held-out flips most? CE + each loss against CE alone, over seeds.

Trains the same adapter on the same layers once per consistency loss and weight (``teacher_kl``
at weights 2 and 1, ``sym_kl``, ``js``, ``margin_mse`` at 1; cross-entropy weight 1) and once with
cross-entropy alone, for every seed, and evaluates each on the held-out pairs (and, on the demo, on the unseen
wrappers and the negation set). Each loss is one :func:`mechmed.ablate.run_ablation` grid (arm
``selected``); the first also trains ``ce_only`` and ``consistency_only`` (the seed paper's
symmetric KL without cross-entropy). This is the table that chose mechmed's default loss
(docs/training.md).

Writes ``<loss>-w<weight>/`` (one ablation directory per loss), ``losses.csv`` (one row per loss and seed),
``losses.md`` (the table, mean over seeds) and ``consistency_losses.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import finish, is_demo, parser, run_script, sample_pairs, write_csv

LOSSES = "teacher_kl:2,teacher_kl:1,sym_kl:1,js:1,margin_mse:1"
LABELS = {"base": "base (no training)", "ce_only": "CE only", "consistency_only": "sym_kl only (no CE)"}


def build_parser():
    p = parser(__doc__, "runs/analyses/consistency_losses")
    p.add_argument("--config", default=None, help="training config YAML (its layers and hyperparameters)")
    p.add_argument("--layers", default=None, help="layers to adapt, e.g. 1-3 (overrides --config's; demo default 1-3)")
    p.add_argument("--losses", default=LOSSES, help="consistency losses to compare, each LOSS or LOSS:WEIGHT "
                   "(the consistency weight; default the config's)")
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated")
    p.add_argument("--train-data", default=None, help="training pairs (default: --data; the demo's training split)")
    p.add_argument("--image-root", default=None, help="resolve image paths of both data files under this folder")
    p.add_argument("--train-pairs", type=int, default=None, help="a seeded sample of the training pairs (default all)")
    p.add_argument("--eval-pairs", type=int, default=None, help="a seeded sample of the held-out pairs (default all)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps per run (default: the config's)")
    p.add_argument("--workers", type=int, default=2, help="runs trained in parallel processes")
    return p


def training_config(args, out: Path) -> dict:
    from mechmed.config import ModelSpec, TrainConfig, demo_defaults
    from mechmed.sites import parse_layers

    train = TrainConfig.load(args.config).to_dict() if args.config else (demo_defaults() if is_demo(args) else {})
    train.pop("config_version", None)
    layers = args.layers or (None if args.config else "1-3")
    if layers:
        train["layers"] = parse_layers(layers)
    if args.max_steps is not None:
        train["max_steps"] = args.max_steps
    data = out / "data"
    train.update(model=ModelSpec.from_args(args, train.get("model")).to_value(), image_root=args.image_root,
                 train_data=sample_pairs(args.train_data or args.data, "train", args.train_pairs, 0,
                                         data / "train_pairs.jsonl", args.image_root),
                 eval_data=sample_pairs(args.data, "eval", args.eval_pairs, 0, data / "eval_pairs.jsonl",
                                        args.image_root))
    return train


def run(args) -> dict:
    import numpy as np

    from mechmed.ablate import AblationConfig, run_ablation

    out = Path(args.out)
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    train = training_config(args, out)
    rows = []
    for i, item in enumerate(losses):
        loss, _, weight = item.partition(":")
        weight = float(weight) if weight else train.get("consistency_weight", 1.0)
        arms = ["selected", "ce_only", "consistency_only"] if i == 0 else ["selected"]
        cfg = AblationConfig.from_dict({"train": {**train, "consistency": loss, "consistency_weight": weight},
                                        "arms": arms, "seeds": seeds, "workers": args.workers},
                                       source=f"consistency_losses: {item}")
        res = run_ablation(cfg, out / f"{loss}-w{weight:g}", workers=args.workers)
        for r in res.rows:
            if r["arm"] != "selected" and i > 0:
                continue  # the base and the controls once, from the first grid
            name = f"CE + {weight:g} × {loss}" if r["arm"] == "selected" else LABELS[r["arm"]]
            rows.append({"run": name, "seed": r["seed"], "flip_rate": r["flip_rate"], "margin_diff": r["margin_diff"],
                         "canonical_accuracy": r["canonical_accuracy"], "yes_rate": r["yes_rate"],
                         "collapsed": r["collapsed"], "p_vs_base": r["p_vs_base"],
                         **{f"flip_{k}": v["flip_rate"] for k, v in (r.get("sets") or {}).items()}})
    write_csv(out / "losses.csv", rows)
    names = list(dict.fromkeys(r["run"] for r in rows))
    extra = [k for k in rows[0] if k.startswith("flip_") and k != "flip_rate"]
    head = (["run", *(f"flip, seed {s}" for s in seeds), "flip, mean", "\\|Δmargin\\|", "accuracy", "yes-rate",
             *(k.replace("flip_", "flip: ") for k in extra), "collapsed"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        rs = {r["seed"]: r for r in rows if r["run"] == name}
        mean = {k: np.mean([r[k] for r in rs.values()]) for k in ("flip_rate", "margin_diff", "canonical_accuracy",
                                                                   "yes_rate", *extra)}
        cells = [name, *(f"{rs[s]['flip_rate']:.3f}" if s in rs else "" for s in seeds), f"**{mean['flip_rate']:.3f}**",
                 f"{mean['margin_diff']:.2f}", f"{mean['canonical_accuracy']:.3f}", f"{mean['yes_rate']:.2f}",
                 *(f"{mean[k]:.3f}" for k in extra),
                 ", ".join(str(s) for s, r in rs.items() if r["collapsed"]) or "no"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "losses.md").write_text(table, encoding="utf-8")
    print(table)
    return finish(out, {"model": args.model, "data": args.data, "layers": train["layers"], "seeds": seeds,
                        "losses": losses, "rows": rows, "table": table}, "consistency_losses.json")


def main(argv=None) -> int:
    return run_script(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())

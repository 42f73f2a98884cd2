"""Forgetting under sequential tasks: LoRA, spectral experts and all-layer LoRA, trained on one task and then another.

The second seed result (Sparse Spectral LoRA, MedQwen) reports that routed spectral experts forget
about 5% of a first task after a second, where plain LoRA loses 20-50%. Here each arm trains one
adapter on task 1 (pairs about effusion, cardiomegaly, pneumothorax), then goes on training it on
task 2 (nodule, consolidation, edema): :func:`mechmed.forgetting.sequential_forgetting`, once per
seed. Arms: ``lora`` and ``spectral_moe`` on the given layers (the same total rank), and ``lora_all``
(LoRA on every decoder layer, the most the model can move). Reported per seed: accuracy and flip
rate on each task for the base model and after each stage, with Wilson 95% intervals and paired
exact McNemar tests; first whether task 2's training changed task 2 at all (without that there is
nothing to forget), then what task 1 kept.

Writes ``seed_<s>/forgetting.json`` (and each stage's run directory under it), ``forgetting.csv``
(one row per arm and seed), ``forgetting.md`` (the table) and ``forgetting_summary.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import finish, is_demo, parser, run_script, write_csv


def build_parser():
    p = parser(__doc__, "runs/analyses/forgetting")
    p.add_argument("--layers", default="1-3", help="decoder layers of the lora and spectral_moe arms, e.g. 1-3 or 15-19")
    p.add_argument("--arms", default="lora,spectral_moe,lora_all", help="arms, comma-separated: lora, spectral_moe, "
                   "lora_all")
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (each also picks the demo model and data)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per task (default: one epoch of the "
                   "larger task's training pairs)")
    p.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs per task, a seeded sample "
                   "(default all)")
    return p


def _cell(m: dict, key: str) -> str:
    ci = m["accuracy_ci" if key == "accuracy" else "flip_ci"]
    return f"{m[key]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def run(args) -> dict:
    from mechmed.config import TrainConfig, demo_defaults
    from mechmed.forgetting import sequential_forgetting
    from mechmed.sites import parse_layers

    out = Path(args.out)
    base = demo_defaults() if is_demo(args) else {}
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows, reports = [], {}
    for seed in seeds:
        cfg = TrainConfig.from_dict({**base, "model": args.model, "train_data": args.data, "eval_data": args.data,
                                     "seed": seed, "layers": parse_layers(args.layers)}, source="forgetting")
        r = sequential_forgetting(cfg, out / f"seed_{seed}", steps=args.steps, arms=arms, n_eval=args.eval_pairs,
                                  device=args.device, progress=True).results
        reports[seed] = r
        for arm in arms:
            s = r["summary"][arm]
            row = {"arm": arm, "seed": seed, "layers": s["layers"], "steps_per_task": r["steps_per_task"]}
            for task in ("task_1", "task_2"):
                for stage in ("base", "after_task_1", "after_task_2"):
                    for key in ("accuracy", "flip_rate", "yes_rate"):
                        row[f"{task}_{stage}_{key}"] = s[f"{task}_{stage}"][key]
            for change in ("task_1_learned", "task_2_learned", "task_1_kept"):
                row[f"{change}_flip_p"] = s[change]["flip_test"]["p_value"]
                row[f"{change}_accuracy_p"] = s[change]["accuracy_test"]["p_value"]
            row["forgetting"], row["flip_forgetting"] = s["forgetting"], s["flip_forgetting"]
            rows.append(row)
    write_csv(out / "forgetting.csv", rows)

    head = ["arm", "seed", "task 2 flips: after 1 → after 2 (p)", "task 1 flips: after 1 → after 2 (p)",
            "task 1 accuracy: after 1 → after 2 (p)", "task 1 flips, base → after 1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed in seeds:
        for arm in arms:
            s = reports[seed]["summary"][arm]
            t2, t1 = s["task_2_learned"], s["task_1_kept"]
            lines.append("| " + " | ".join([
                arm, str(seed),
                f"{_cell(s['task_2_after_task_1'], 'flip_rate')} → {_cell(s['task_2_after_task_2'], 'flip_rate')} "
                f"(p={t2['flip_test']['p_value']:.2g})",
                f"{_cell(s['task_1_after_task_1'], 'flip_rate')} → {_cell(s['task_1_after_task_2'], 'flip_rate')} "
                f"(p={t1['flip_test']['p_value']:.2g})",
                f"{_cell(s['task_1_after_task_1'], 'accuracy')} → {_cell(s['task_1_after_task_2'], 'accuracy')} "
                f"(p={t1['accuracy_test']['p_value']:.2g})",
                f"{s['task_1_base']['flip_rate']:.3f} → {s['task_1_after_task_1']['flip_rate']:.3f} "
                f"(p={s['task_1_learned']['flip_test']['p_value']:.2g})"]) + " |")
    table = "\n".join(lines) + "\n"
    (out / "forgetting.md").write_text(table, encoding="utf-8")
    first = reports[seeds[0]]
    print(f"task 1 = {', '.join(first['task_1'])}; task 2 = {', '.join(first['task_2'])}; "
          f"{first['steps_per_task']} steps per task; held-out pairs per task {first['n_eval_pairs']}")
    print(table)
    return finish(out, {"model": args.model, "data": args.data, "arms": arms, "seeds": seeds, "rows": rows,
                        "table": table}, "forgetting_summary.json")


def main(argv=None) -> int:
    return run_script(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())

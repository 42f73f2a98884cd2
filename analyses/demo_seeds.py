"""The demo over several seeds, with claims tested across them: ``mechmed demo --seed S`` for each seed
(each builds that seed's model, data and SAEs, in deterministic CPU mode), then every arm pooled over
the seeds with tests stratified by seed (the table in docs/demo.md).

Each pooled p is the exact sign-flip test of the per-question differences over (seed, question)
clusters (:func:`mechmed.stats.mcnemar_clustered`): each seed's questions are their own clusters, so a
claim it supports is one the seeds share, not one seed's. Writes ``pooled.json`` (every row and the
pooled summary, :func:`mechmed.ablate.pool_seed_runs`) and ``pooled.md`` (the tables) under ``--out``, and
with ``--audit`` the selection audit over the seeds (``selection_audit.html``/``.png``, one panel a seed);
finished seeds are reused. About 6 minutes a seed on 2 cores, cold.

    python analyses/demo_seeds.py --seeds 0 1 2 3 4 --out runs/demo-seeds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Comparisons docs/demo.md makes: (arm, against, p key of the pooled summary).
COMPARISONS = [(arm, "base", "p_vs_base_clustered") for arm in
               ("selected", "ce_only", "act", "early", "late", "all", "clamp", "steer", "ensemble")] + [
    ("selected", "CE only", "p_vs_ce_only_clustered"), ("act", "CE only", "p_vs_ce_only_clustered"),
    ("selected", "best trained", "p_vs_best_trained_clustered"), ("act", "best trained", "p_vs_best_trained_clustered"),
    ("clamp", "best trained", "p_vs_best_trained_clustered"), ("steer", "best trained", "p_vs_best_trained_clustered"),
    ("ensemble", "best trained", "p_vs_best_trained_clustered")]
#: Arms compared with each other (the layer ranges, and the two consistency losses), over the pairs both
#: evaluated, with the same stratified test.
ARM_PAIRS = [("early", "selected"), ("all", "selected"), ("late", "selected"), ("all", "early"), ("act", "selected")]


def run_seed(seed: int, out: Path, audit: bool = False) -> float:
    """``mechmed demo --seed seed --out out [--audit]`` in a fresh process; its wall seconds (0 when
    finished before)."""
    done = out / "ablation" / "results.json"
    res = json.loads(done.read_text()) if done.is_file() else {}
    nulls = all(r.get("null") for r in res.get("rows", []) if r["arm"] in ("clamp", "steer"))
    if res and nulls and (out / "report.md").is_file() and (not audit or "audit" in res):
        return 0.0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mechmed", "demo", "--seed", str(seed), "--out", str(out)]
                   + (["--audit"] if audit else []), check=True)
    return time.perf_counter() - t0


def _fmt_p(p) -> str:
    if p is None:
        return "n/a"
    if p == 0:  # below float64's range
        return "< 1e-300"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.0e}"


def selection_rows(pooled: dict) -> list[str]:
    """Per seed: the window select-layers chose, how often it wins over resampled questions, the
    runner-up, and the base model's canonical accuracy and flip rate (markdown rows)."""
    import yaml

    lines = ["| seed | selected window | P(best) | runner-up (P) | base canonical accuracy | base flip rate |",
             "|---|---|---|---|---|---|"]
    base = {r["seed"]: r for r in pooled["rows"] if r["arm"] == "base"}
    for run in pooled["runs"]:
        cfg = yaml.safe_load((Path(run).parent / "train.yaml").read_text(encoding="utf-8"))
        seed, unc = cfg["seed"], (cfg.get("provenance") or {}).get("uncertainty") or {}
        others = [c for c in unc.get("candidates", []) if c["layers"] != unc.get("chosen")]
        r = max(others, key=lambda c: c["p_best"]) if others else None
        lines.append(f"| {seed} | {cfg['layers'][0]}–{cfg['layers'][-1]} | {unc.get('p_chosen', float('nan')):.2f} | "
                     + (f"{r['layers'][0]}–{r['layers'][-1]} ({r['p_best']:.2f})" if r else "") + " | "
                     f"{base[seed]['canonical_accuracy']:.3f} | {base[seed]['flip_rate']:.3f} |")
    return lines


def arm_pairs(pooled: dict) -> list[dict]:
    """Each of :data:`ARM_PAIRS` present in ``pooled``: both pooled flip rates over the pairs both
    arms evaluated and the stratified p (:func:`mechmed.consistency.paired_flips`, ids ``seed:id``)."""
    from mechmed.ablate import _read_pairs
    from mechmed.consistency import paired_flips

    def pairs(arm: str) -> dict:
        out = {}
        for r in pooled["rows"]:
            if r["arm"] == arm:
                d = Path(r["run_dir"]) if arm == "base" else Path(r["run_dir"]) / "after"
                out.update({f"{r['seed']}:{k}": v for k, v in _read_pairs(d / "pairs.jsonl").items()})
        return out

    out = []
    for a, b in ARM_PAIRS:
        pa, pb = pairs(a), pairs(b)
        common = sorted(set(pa) & set(pb))
        if not common:
            continue
        out.append({"arm": a, "against": b, "n_pairs": len(common),
                    "flip_rate": sum(pa[i]["flip"] for i in common) / len(common),
                    "flip_rate_against": sum(pb[i]["flip"] for i in common) / len(common),
                    "p_clustered": paired_flips(pa, pb, clustered=True, by_seed=True)})
    return out


def flip_risk_rows(pooled: dict) -> list[dict]:
    """Per arm: how well |margin| on the original question foresees its flips, per seed and pooled over
    the seeds (clusters are (seed, question)), from each run's per-pair rows
    (:func:`mechmed.consistency.flip_risk_of_rows`), and the change of the pooled AUROC from the base
    model's on the same pairs (:func:`mechmed.stats.paired_clustered_auc`)."""
    from mechmed.consistency import flip_risk_of_rows, headline_rows
    from mechmed.io import read_jsonl
    from mechmed.stats import paired_clustered_auc

    by_arm: dict = {}
    for r in pooled["rows"]:
        d = Path(r["run_dir"]) if r["arm"] == "base" else Path(r["run_dir"]) / "after"
        rows = read_jsonl(d / "pairs.jsonl")
        by_arm.setdefault(r["arm"], []).append((r["seed"], rows))
    def tagged(runs):
        return [{**x, "question_id": f"{seed}:{x.get('question_id') or x['question']}",
                 "image": f"{seed}:{x.get('image')}"} for seed, rows in runs for x in rows]

    def headline(rows):
        return {f"{x['question_id']}|{x['id']}": x for x in headline_rows(rows)}

    base = headline(tagged(by_arm.get("base", [])))
    out = []
    for arm, runs in by_arm.items():
        rows = tagged(runs)
        entry = {"arm": arm, "per_seed": {seed: flip_risk_of_rows(r) for seed, r in runs},
                 "pooled": flip_risk_of_rows(rows), "vs_base": None}
        mine = headline(rows)
        common = sorted(set(mine) & set(base))
        if arm != "base" and common:  # the same pairs, the same (seed, question) draws for both
            a, b = ([-abs(d[k]["margin_question"]) for k in common] for d in (base, mine))
            fa, fb = ([d[k]["flip"] for k in common] for d in (base, mine))
            entry["vs_base"] = paired_clustered_auc(a, fa, b, fb, [k.split("|")[0] for k in common])
        out.append(entry)
    return out


def risk_table(risks: list[dict], seeds: list[int]) -> list[str]:
    """:func:`flip_risk_rows` as markdown: the AUROC per seed and pooled with its interval, its change from
    the base model on the same pairs (paired bootstrap over (seed, question) clusters), the pooled ECE
    and coverage."""
    if not risks:
        return []
    lines = ["| arm | " + " | ".join(f"AUROC seed {s}" for s in seeds) + " | pooled AUROC [95% CI, by question] | "
             "change from base [95% CI], p | ECE | coverage at 5% risk |", "|---" * (len(seeds) + 5) + "|"]
    for r in risks:
        cells = [f"{r['per_seed'][s]['auroc_margin']:.3f}" if r["per_seed"].get(s, {}).get("auroc_margin") is not None
                 else "" for s in seeds]
        p = r["pooled"]
        auroc = "" if p["auroc_margin"] is None else (
            f"{p['auroc_margin']:.3f} [{p['auroc_margin_ci'][0]:.3f}, {p['auroc_margin_ci'][1]:.3f}]")
        v = r.get("vs_base") or {}
        change = "" if v.get("difference") is None else (
            f"{v['difference']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}], {_fmt_p(v['p_value'])}")
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + f" | {auroc} | {change} | {p['ece']:.3f} | "
                     f"{p['coverage']['coverage']:.3f} |")
    return ["", *lines]


def audit_tables(audit: dict) -> str:
    """The selection audit over seeds as markdown: each window's flip reduction per seed, the correlations
    of every score with what training achieved, the criteria's regrets, and the verdict."""
    import numpy as np

    from mechmed.figures import layer_text

    units, p = audit["units"], audit["pooled"]
    labels = [u["label"].replace("lora ", "") for u in units]
    names = [r["name"] for r in units[0]["candidates"] if r["kind"] != "random"]
    lines = ["", "Selection audit: flip-rate reduction (base − trained) of each candidate; * the selected window", "",
             "| candidate | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for n in names:
        cells = []
        for u in units:
            r = next(r for r in u["candidates"] if r["name"] == n)
            cells.append(f"{r['flip_reduction']:.3f}{'*' if r['selected'] else ''}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    rand = [[r["flip_reduction"] for r in u["candidates"] if r["kind"] == "random"] for u in units]
    lines.append("| random sets (median, range) | " + " | ".join(
        f"{float(np.median(v)):.3f} ({min(v):.3f}–{max(v):.3f})" if v else "" for v in rand) + " |")
    lines += ["", "| predictor | Spearman ρ per seed | mean ρ [95% CI] |", "|---|---|---|"]
    for k, v in p["spearman"].items():
        lines.append(f"| {k} | {', '.join(f'{x:+.2f}' for x in v['per_unit'])} | {v['rho']:+.2f} "
                     f"[{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}] |")
    lines += ["", "| criterion | windows per seed | regret per seed | mean regret [95% CI] |", "|---|---|---|---|"]
    for k, c in sorted(p["criteria"].items(), key=lambda kv: kv[1]["regret"]):
        lines.append(f"| {k} | {', '.join(layer_text(w) for w in c['windows'])} | "
                     f"{', '.join(f'{x:.3f}' for x in c['per_unit'])} | {c['regret']:.3f} "
                     f"[{c['regret_ci'][0]:.3f}, {c['regret_ci'][1]:.3f}] |")
    return "\n".join(lines) + "\n\n" + p["verdict"] + "\n"


def null_table(pooled: dict) -> list[str]:
    """Clamp and steer against their matched nulls (mechmed.nulls), per seed and summed over the seeds
    (draw j of the pooled null the sum of every seed's draw j): base flips reversed and the net of new flips."""
    seeds = sorted({r["seed"] for r in pooled["rows"]})
    by = {(r["arm"], r["seed"]): r for r in pooled["rows"]}
    summary = {r["arm"]: r for r in pooled["summary"]}
    lines = ["", "| arm | null | " + " | ".join(f"seed {s}: reversed (null mean, best) / net" for s in seeds)
             + " | seeds summed: reversed (null mean, best; p) | net (null mean, best; p) |", "|---" * (len(seeds) + 4) + "|"]

    def cell(n):
        r, net = n["reversed"], n["net"]
        return f"{r['arm']} ({r['mean']:.1f}, {r['best']}) / {net['arm']:+d}"

    for arm in ("clamp", "steer"):
        nulls = [by[(arm, s)].get("null") for s in seeds if (arm, s) in by]
        if not nulls or not all(n and not n.get("skipped") for n in nulls):
            continue
        pooled_null = summary[arm].get("null") or {}
        for key in [None] + (["scaled"] if all(n.get("scaled") for n in nulls) else []):
            per = [n[key] | {"n_base_flips": n["n_base_flips"]} if key else n for n in nulls]
            tot = (pooled_null.get(key) if key else pooled_null) or {}
            if "reversed" not in tot:  # the seeds drew different numbers of nulls: no pooled null
                continue
            name = ("random features, rescaled to the clamp's change" if key else
                    "random features" if arm == "clamp" else "random directions, same norm")
            r, net = tot["reversed"], tot["net"]
            lines.append(f"| {arm} | {name} ({nulls[0]['draws']} draws) | " + " | ".join(cell(n) for n in per)
                         + f" | {r['arm']} ({r['mean']:.1f}, {r['best']}; {_fmt_p(r['p'])}) | {net['arm']:+d} "
                         f"({net['mean']:+.1f}, {net['best']:+d}; {_fmt_p(net['p'])}) |")
    return lines if len(lines) > 2 else []


def tables(pooled: dict) -> str:
    """The pooled tables as markdown: per seed the selection; per arm the per-seed flip rates and the
    pooled rate with its interval clustered by question; then each comparison with its stratified p."""
    seeds = sorted({r["seed"] for r in pooled["rows"]})
    by = {(r["arm"], r["seed"]): r for r in pooled["rows"]}
    lines = [*selection_rows(pooled), "", "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled [95% CI, by question] | "
             "canonical accuracy | unseen | negation |", "|---" * (len(seeds) + 5) + "|"]
    for r in pooled["summary"]:
        cells = [f"{by[(r['arm'], s)]['flip_rate']:.3f}" + (" (c)" if by[(r['arm'], s)]["collapsed"] else "")
                 if (r["arm"], s) in by else "" for s in seeds]
        sets = r.get("sets") or {}
        lines.append(f"| {r['arm']} | " + " | ".join(cells)
                     + f" | {r['flip_rate']:.3f} [{r['flip_ci_clustered'][0]:.3f}, {r['flip_ci_clustered'][1]:.3f}]"
                     + f" | {r['canonical_accuracy']:.3f} | "
                     + " | ".join(f"{sets[n]['flip_rate']:.3f}" if sets.get(n) else "" for n in ("unseen", "negation"))
                     + " |")
    summary = {r["arm"]: r for r in pooled["summary"]}
    lines += ["", f"Best trained arm (fewest pooled flips, not collapsed): {pooled['best_trained']}", "",
              "| arm | against | pooled flip rate, arm vs reference | p, stratified by seed (by question) | "
              "the same per seed, not clustered |", "|---|---|---|---|---|"]
    best = (pooled["best_trained"] or "").rsplit("-", 1)[0]
    for arm, against, key in COMPARISONS:
        if arm not in summary:
            continue
        ref = {"base": "base", "CE only": "ce_only", "best trained": best}[against]
        if ref not in summary or ref == arm:
            continue
        per_seed = [by[(arm, s)].get(key.replace("_clustered", "")) for s in seeds if (arm, s) in by]
        lines.append(f"| {arm} | {against} ({ref}) | {summary[arm]['flip_rate']:.3f} vs {summary[ref]['flip_rate']:.3f} | "
                     f"{_fmt_p(summary[arm].get(key))} | {', '.join(_fmt_p(p) for p in per_seed)} |")
    for c in pooled.get("arm_pairs", []):
        lines.append(f"| {c['arm']} | {c['against']} | {c['flip_rate']:.3f} vs {c['flip_rate_against']:.3f} | "
                     f"{_fmt_p(c['p_clustered'])} | |")
    for name in ("unseen", "negation"):
        sets = summary.get("selected", {}).get("sets") or {}
        if name in sets:
            lines.append(f"| selected, {name} set | base | {sets[name]['flip_rate']:.3f} vs "
                         f"{summary['base']['sets'][name]['flip_rate']:.3f} | {_fmt_p(sets[name]['p_vs_base_clustered'])} | |")
    lines += risk_table(pooled.get("flip_risk", []), seeds)
    lines += null_table(pooled)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=Path("runs/demo-seeds"))
    ap.add_argument("--pool-only", action="store_true", help="pool the finished seeds under --out; run nothing")
    ap.add_argument("--audit", action="store_true", help="also run the selection audit in every seed (mechmed demo "
                    "--audit) and pool it; seeds that ran it are pooled whether or not this is given")
    args = ap.parse_args(argv)

    from mechmed.ablate import pool_audits, pool_seed_runs

    times = {}
    for s in args.seeds:
        if not args.pool_only:
            times[s] = run_seed(s, args.out / f"seed-{s}", args.audit)
            print(f"seed {s}: {times[s]:.0f} s", flush=True)
    pooled = pool_seed_runs([args.out / f"seed-{s}" / "ablation" for s in args.seeds])
    pooled["arm_pairs"] = arm_pairs(pooled)
    pooled["flip_risk"] = flip_risk_rows(pooled)
    before = args.out / "pooled.json"
    if args.pool_only and before.is_file():  # keep the wall times of the runs that made the seeds
        times = json.loads(before.read_text(encoding="utf-8")).get("wall_s") or times
    pooled["wall_s"] = times
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = [args.out / f"seed-{s}" / "ablation" for s in args.seeds]
    if all("audit" in json.loads((d / "results.json").read_text(encoding="utf-8")) for d in dirs):
        from mechmed.figures import audit_scatter, save_figure

        pooled["audit"] = pool_audits(dirs)
        save_figure(audit_scatter(pooled["audit"]), args.out / "selection_audit")  # one panel per seed
    (args.out / "pooled.json").write_text(json.dumps(pooled, indent=1) + "\n", encoding="utf-8")
    md = tables(pooled) + (audit_tables(pooled["audit"]) if "audit" in pooled else "")
    (args.out / "pooled.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Deterministic CPU mode: does the seed-0 embedded default come out bit-identical on other machines, and
what does the mode cost?

Usage: ``python benchmarks/determinism.py [--seed 0] [--saes] [--out benchmarks/results/determinism.json]``

Each row builds the demo model (and with ``--saes`` its SAE set) from nothing, in a fresh cache, in a
fresh process whose environment emulates another machine: what a different CPU or core count would
make MKL, ATen, oneDNN, numpy or glibc pick on their own. Rows in deterministic mode start from
:data:`mechmed.runtime.DETERMINISTIC_ENV` and change one thing; the ``default mode`` row pins nothing,
as mechmed did before the mode, and gives the cost. Prints a table (machine, weights digest, SAE digest,
evaluation-data digest, build seconds, same as the reference?) and writes the rows to JSON.

The reference row is the mode as shipped. ``ATen default kernels`` is what a CPU without AVX2 runs:
its digest is expected to differ (the mode pins AVX2 kernels; see docs/demo.md), as is that of ``MKL's own
path``, which shows what the MKL pin is for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name -> (environment changes on top of the mode's settings (None: remove), CPUs to run on, mode on?)
MACHINES = {
    "reference (the mode as shipped)": ({}, None, True),
    "default mode (nothing pinned)": ({}, None, False),
    "one core": ({}, [0], True),
    "16 OpenMP threads by default": ({"OMP_NUM_THREADS": "16", "MKL_NUM_THREADS": "16"}, None, True),
    # MKL picks its path from the CPU's vendor and features, and on an AMD CPU it ignores
    # MKL_ENABLE_INSTRUCTIONS and every CBWR branch but COMPATIBLE: these two rows emulate an older
    # Intel CPU on Intel only
    "MKL on an SSE4.2 CPU": ({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, None, True),
    "MKL on an AVX CPU": ({"MKL_ENABLE_INSTRUCTIONS": "AVX"}, None, True),
    "MKL's own path (MKL_CBWR unset)": ({"MKL_CBWR": None}, None, True),
    "oneDNN at its widest ISA": ({"ONEDNN_MAX_CPU_ISA": None}, None, True),
    "numpy at its widest SIMD": ({"NPY_DISABLE_CPU_FEATURES": None}, None, True),
    "glibc libm without FMA/AVX2": ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2_Usable,-FMA_Usable,-AVX_Usable"},
                                    None, True),
    "ATen default kernels (a CPU without AVX2)": ({"ATEN_CPU_CAPABILITY": "default"}, None, True),
}
#: The rows that also build the SAE set with --saes (each adds about 100 s).
SAE_ROWS = ("reference (the mode as shipped)", "default mode (nothing pinned)", "one core", "MKL on an SSE4.2 CPU",
            "glibc libm without FMA/AVX2")


def _data_digest(data_dir: Path) -> str:
    """SHA-256 over the evaluation and training data: every pair file and image, by relative path."""
    h = hashlib.sha256()
    for f in sorted(data_dir.rglob("*")):
        if f.is_file() and (f.suffix in (".jsonl", ".png")):
            h.update(str(f.relative_to(data_dir)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def child(seed: int, saes: bool) -> None:
    """Build in a fresh cache and print one JSON line."""
    t0 = time.perf_counter()
    from mechmed.demo.build import ensure_demo_model, read_build_metrics
    from mechmed.runtime import determinism_state

    with tempfile.TemporaryDirectory(prefix="mechmed-det-") as cache:
        m = read_build_metrics(ensure_demo_model(cache_dir=cache, seed=seed))
        row = {"weights_sha256": m["weights_sha256"], "data_sha256": _data_digest(Path(m["data_dir"])),
               "build_s": m["timing"]["build_s"], "canonical_accuracy": m["canonical_accuracy"],
               "flip_rate": m["flip_rate"], "state": determinism_state()}
        if saes:
            from mechmed.demo.saes import ensure_demo_saes
            from mechmed.io import read_json
            from mechmed.saes import MANIFEST

            t1 = time.perf_counter()
            manifest = read_json(Path(ensure_demo_saes(cache_dir=cache, seed=seed)) / MANIFEST, "SAE manifest")
            row["saes_sha256"], row["saes_s"] = manifest["weights_sha256"], time.perf_counter() - t1
    row["wall_s"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(row), flush=True)


def run_row(name: str, seed: int, saes: bool) -> dict:
    from mechmed.runtime import DETERMINISTIC_ENV, MODE_VARIABLE

    changes, cpus, mode = MACHINES[name]
    env = {k: v for k, v in os.environ.items() if k not in DETERMINISTIC_ENV and k != MODE_VARIABLE}
    env[MODE_VARIABLE] = "1" if mode else "0"
    if mode:
        env.update(DETERMINISTIC_ENV)
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    cmd = [sys.executable, __file__, "--child", "--seed", str(seed)] + (["--saes"] if saes else [])
    if cpus is not None:
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{name}: the build failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"machine": name, "env_changes": changes, "cpus": cpus, "mode": mode, **json.loads(lines[-1][7:])}


#: The emulated machine of ``--demo``: every emulation above that keeps the mode's settings, at once.
OTHER_MACHINE = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OMP_NUM_THREADS": "16", "MKL_NUM_THREADS": "16",
                 "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2_Usable,-FMA_Usable,-AVX_Usable"}


def _numbers(run: Path) -> dict:
    """What ``mechmed demo`` computed (no paths, times or versions): every ablation row and summary row,
    every pair's margins in every evaluation, the SAE check's rows and the layer scores."""
    drop = ("run_dir", "runs")
    res = json.loads((run / "ablation" / "results.json").read_text(encoding="utf-8"))
    rows = [{k: v for k, v in r.items() if k not in drop} for r in res["rows"] + res["summary"]]
    margins = {str(f.relative_to(run)): hashlib.sha256(
        "".join(json.dumps([x.get("id"), x.get("m_q"), x.get("m_p")]) for x in map(json.loads, f.read_text(
            encoding="utf-8").splitlines())).encode()).hexdigest() for f in sorted(run.rglob("pairs.jsonl"))}
    sae = json.loads((run / "sae_check" / "sae_check.json").read_text(encoding="utf-8"))
    scores = json.loads((run / "attribute" / "layer_scores.json").read_text(encoding="utf-8"))
    return {"rows": rows, "margins": margins, "sae_rows": sae.get("rows"), "layer_scores": scores.get("scores")}


def demo_twice(seed: int, out: Path) -> dict:
    """``mechmed demo --seed seed`` from nothing (fresh cache) on this machine as it is and on the
    emulated :data:`OTHER_MACHINE` (one core, MKL told the CPU has SSE4.2, 16 default threads, glibc's
    non-FMA maths): are all their numbers the same?"""
    from mechmed.runtime import DETERMINISTIC_ENV, MODE_VARIABLE

    base = {k: v for k, v in os.environ.items() if k not in DETERMINISTIC_ENV and k != MODE_VARIABLE}
    runs = {}
    for name, extra, cpus in (("this machine", {}, None), ("emulated other machine", OTHER_MACHINE, "0")):
        with tempfile.TemporaryDirectory(prefix="mechmed-det-demo-") as cache:
            run = out / name.replace(" ", "-")
            cmd = [sys.executable, "-m", "mechmed", "demo", "--seed", str(seed), "--out", str(run)]
            if cpus:
                cmd = ["taskset", "-c", cpus, *cmd]
            t0 = time.perf_counter()
            subprocess.run(cmd, env={**base, **extra, "MECHMED_CACHE": cache, "MECHMED_PROGRESS": "0"},
                           check=True, capture_output=True, text=True)
            runs[name] = {"wall_s": time.perf_counter() - t0, "numbers": _numbers(run)}
    a, b = (r["numbers"] for r in runs.values())
    same = {k: a[k] == b[k] for k in a}
    print("mechmed demo from nothing, this machine against the emulated one: "
          + ", ".join(f"{k} {'identical' if v else 'DIFFER'}" for k, v in same.items()))
    return {"seed": seed, "same": same, "wall_s": {k: r["wall_s"] for k, r in runs.items()},
            "other_machine": OTHER_MACHINE}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--saes", action="store_true", help="also build the SAE set in the rows of SAE_ROWS")
    ap.add_argument("--rows", nargs="*", default=None, help="only these machines (default all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "determinism.json")
    ap.add_argument("--demo", type=Path, default=None, metavar="DIR",
                    help="instead: run mechmed demo from nothing here and on the emulated other machine, under DIR, "
                    "and compare every number (about 15 minutes)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.seed, args.saes)
        return 0
    if args.demo is not None:
        result = demo_twice(args.seed, args.demo)
        path = args.out.with_name(args.out.stem + "_demo.json")
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
        return 0 if all(result["same"].values()) else 1
    rows = []
    if args.rows and args.out.is_file():  # rerun some rows: keep the others of the earlier run (same seed)
        earlier = json.loads(args.out.read_text(encoding="utf-8"))
        if earlier.get("seed") == args.seed:
            rows = [r for r in earlier["rows"] if r["machine"] not in args.rows]
    for name in args.rows or MACHINES:
        rows.append(run_row(name, args.seed, args.saes and name in SAE_ROWS))
        r = rows[-1]
        ref = next(x for x in rows if x["machine"].startswith("reference"))
        same = {k: r.get(k) == ref.get(k) for k in ("weights_sha256", "saes_sha256", "data_sha256") if k in r}
        r["same_as_reference"] = same
        print(f"{name:45s} weights {r['weights_sha256'][:12]} saes {r.get('saes_sha256', '-')[:12]:12s} "
              f"data {r['data_sha256'][:12]} build {r['build_s']:6.1f} s  same: "
              + ", ".join(f"{k.split('_')[0]}={v}" for k, v in same.items()), flush=True)
        _write(args, rows)  # after every row: an interrupted run keeps what it measured
    _write(args, rows, final=True)
    return 0


def _write(args, rows: list, final: bool = False) -> None:
    import torch

    info = {"machine": platform.machine(), "processor": _cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "seed": args.seed, "rows": rows}
    rows.sort(key=lambda r: list(MACHINES).index(r["machine"]))
    ref = next((r for r in rows if r["machine"].startswith("reference")), None)
    plain = next((r for r in rows if r["machine"].startswith("default mode")), None)
    if ref and plain:
        info["mode_cost"] = {"build_s_mode": ref["build_s"], "build_s_default": plain["build_s"],
                             "ratio": ref["build_s"] / plain["build_s"]}
        if final:
            print(f"the mode's build takes {ref['build_s']:.1f} s against {plain['build_s']:.1f} s "
                  f"({ref['build_s'] / plain['build_s']:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())

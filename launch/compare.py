"""`mbrec compare`: every balancing method (and single-task models) trained on the same data,
inside ONE distributed job, so that throughput is measured side by side; then the paper's
tables as `report.md`, `results.csv` and plots.

    Table 3 analogue: per-task eval NE gain vs equal weights (%), average, mean +- std over seeds
    Table 2 analogue: training QPS drop vs equal weights (same job), next to the NE gains
    Table 4 analogue: MultiBalance's beta sweep, and the EMA ablation
    Figure 2 analogue: gradient magnitudes before balancing, weights, magnitudes after
    Negative transfer: each task's NE under equal-weight joint training vs a single-task model
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from launch.config import load_config
from launch.report import binary_tasks

log = logging.getLogger(__name__)

ALL_METHODS = ["equal", "uncertainty", "pcgrad", "gradvac", "graddrop", "dbmtl", "imtlg", "mgda",
               "moco", "multibalance", "multibalance_noema", "param_mgda", "param_moco"]


@dataclass
class Variant:
    name: str
    overrides: List[str]
    kind: str  # method | beta | single


def variants(methods: List[str], betas: List[float], tasks: List[str], single_task: bool) -> List[Variant]:
    out = []
    for m in methods:
        if m == "multibalance_noema":
            out.append(Variant(m, ["balancer.method=multibalance", "balancer.multibalance.ema=false"], "method"))
        else:
            out.append(Variant(m, [f"balancer.method={m}"], "method"))
    for b in betas:
        out.append(Variant(f"multibalance_beta{b:g}", ["balancer.method=multibalance",
                                                        f"balancer.multibalance.beta={b}"], "beta"))
    if single_task:
        for t in tasks:
            out.append(Variant(f"single_{t}", ["balancer.method=equal", f'data.tasks=[{{name = "{t}"}}]'], "single"))
    return out


def plan(config: str, overrides: List[str], methods: List[str], betas: List[float], seeds: int,
         single_task: bool, out: Path) -> List[Tuple[str, int, List[str]]]:
    cfg = load_config(config, overrides)
    tasks = [t.name for t in cfg.data.tasks]
    runs = []
    for seed in range(seeds):  # seed-major: every method's first seed finishes first
        for v in variants(methods, betas, tasks, single_task):
            run_dir = out / v.name / f"seed{seed}"
            runs.append((v.name, seed, list(overrides) + v.overrides + [
                f"trainer.seed={seed}", f"trainer.out_dir={run_dir}", "trainer.resume=false",
                "trainer.progress_bar=false", "trainer.checkpoint_every=0", "trainer.checkpoint_at_end=false"]))
    return runs


def run_plan(config: str, plan_file: str) -> int:
    """The job's entry point on every rank: trains the planned runs one after another."""
    from trainer.loop import train
    entries = json.loads(Path(plan_file).read_text())
    for i, (name, seed, overrides) in enumerate(entries):
        cfg = load_config(config, overrides)
        if (Path(cfg.trainer.out_dir) / "summary.json").is_file():
            continue  # finished in an earlier, interrupted compare
        log.info("[%d/%d] %s seed %d", i + 1, len(entries), name, seed)
        train(cfg)
    return 0


def _load(out: Path) -> Dict[str, List[dict]]:
    runs: Dict[str, List[dict]] = {}
    for summary in sorted(out.glob("*/seed*/summary.json")):
        runs.setdefault(summary.parent.parent.name, []).append(json.loads(summary.read_text()))
    return runs


def _ms(values: List[float], fmt: str = "{:+.3f}") -> str:
    import numpy as np
    if not values:
        return "-"
    m, s = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return (fmt + " ± " + fmt.replace("+", "")).format(m, s)


def gains_by_seed(runs: Dict[str, List[dict]], name: str, tasks: List[str]) -> Dict[str, List[float]]:
    """Per task (and 'average'): the NE gain vs equal weights of the same seed, in %."""
    from launch.report import ne_gain
    base = {r["seed"]: r for r in runs["equal"]}
    out: Dict[str, List[float]] = {t: [] for t in tasks + ["average"]}
    for r in runs[name]:
        b = base.get(r["seed"])
        if b is None:
            continue
        g = [ne_gain(b["eval"][t]["ne"], r["eval"][t]["ne"]) for t in tasks]
        for t, v in zip(tasks, g):
            out[t].append(v)
        out["average"].append(sum(g) / len(g))
    return out


def compare_tables(runs: Dict[str, List[dict]], tasks: List[str]) -> Dict[str, str]:
    import numpy as np
    from launch.report import markdown_table
    joint = [n for n in runs if not n.startswith("single_")]
    gains = {n: gains_by_seed(runs, n, tasks) for n in joint if n != "equal"}
    cols = tasks + ["average"]
    best = {c: max(gains, key=lambda n: np.mean(gains[n][c]) if gains[n][c] else -1e9) for c in cols} if gains else {}
    qps = {n: [r["train_rows_per_s"] for r in runs[n]] for n in joint}
    base_qps = float(np.mean(qps["equal"]))
    noise = {c: float(np.std(gains["multibalance"][c], ddof=1)) if "multibalance" in gains and len(gains["multibalance"][c]) > 1 else float("nan") for c in cols}

    def gain_cell(n, c):
        cell = _ms(gains[n][c])
        return f"**{cell}**" if best.get(c) == n else cell

    t3 = markdown_table(["method"] + [f"NE gain {c} %" for c in cols] + ["seeds"],
                        [["equal (NE)"] + [_ms([r["eval"][t]["ne"] for r in runs["equal"]], "{:.5f}") for t in tasks]
                         + [_ms([float(np.mean([r["eval"][t]["ne"] for t in tasks])) for r in runs["equal"]], "{:.5f}"),
                            str(len(runs["equal"]))]]
                        + [[n] + [gain_cell(n, c) for c in cols] + [str(len(runs[n]))] for n in gains])
    t2 = markdown_table(["method", "train QPS (rows/s)", "QPS drop vs equal %", "avg NE gain %"],
                        [[n, _ms(qps[n], "{:.0f}"), _ms([100 * (1 - q / base_qps) for q in qps[n]], "{:+.2f}"),
                          _ms(gains[n]["average"]) if n in gains else "0"] for n in joint])
    singles = {t: runs.get(f"single_{t}", []) for t in tasks}
    nt = markdown_table(["task", "NE joint (equal weights)", "NE single-task", "joint vs single %", "negative transfer"],
                        [[t, _ms([r["eval"][t]["ne"] for r in runs["equal"]], "{:.5f}"),
                          _ms([r["eval"][t]["ne"] for r in singles[t]], "{:.5f}"),
                          _ms([100 * (s["eval"][t]["ne"] - j["eval"][t]["ne"]) / s["eval"][t]["ne"]
                               for j, s in zip(runs["equal"], singles[t])]),
                          ("yes" if singles[t] and np.mean([r["eval"][t]["ne"] for r in runs["equal"]])
                           > np.mean([r["eval"][t]["ne"] for r in singles[t]]) else "no") if singles[t] else "-"]
                         for t in tasks])
    return {"table3": t3, "table2": t2, "negative_transfer": nt,
            "noise": ", ".join(f"{c}: {v:.3f}" for c, v in noise.items())}


def write_compare_report(out: Path) -> str:
    from launch.report import defined_or_nan, plot_balancing
    runs = _load(out)
    for name, rs in runs.items():
        for r, seed_dir in zip(rs, sorted((out / name).glob("seed*/summary.json"))):
            r["seed"] = int(seed_dir.parent.name[4:])
    if "equal" not in runs:
        raise ValueError(f"{out}: no finished equal-weights run to compare against")
    tasks = binary_tasks(runs["equal"][0])
    tables = compare_tables(runs, tasks)
    plots = [plot_balancing(out / n / "seed0", tasks, out, n) for n in ("multibalance", "multibalance_noema")
             if (out / n / "seed0" / "metrics.jsonl").is_file()]
    plots = [p for p in plots if p is not None]
    text = "\n".join([
        "# mbrec compare", "",
        "NE gain = 100 (NE(equal) - NE(method)) / NE(equal), per seed against the equal-weights run "
        "of the same seed; mean ± std over seeds; best per column in bold. Positive is better; "
        "the paper calls a change of 0.05 % significant.", "",
        "## NE gain vs equal weights (paper Table 3; beta sweep = Table 4)", "", tables["table3"], "",
        f"Seed-to-seed std of MultiBalance's gain: {tables['noise']}", "",
        "## Training throughput, same job (paper Table 2)", "", tables["table2"], "",
        "## Negative transfer: joint (equal weights) vs single-task models", "", tables["negative_transfer"], "",
        "Joint vs single > 0: the joint model is better on that task; negative transfer = the joint "
        "model is worse than the single-task one.", "",
    ] + [f"![{p.stem}]({p.name})" for p in plots]) + "\n"
    (out / "report.md").write_text(text)
    with open(out / "results.csv", "w") as f:
        f.write("variant,seed,task,ne,auc,train_rows_per_s\n")
        for name, rs in sorted(runs.items()):
            for r in rs:
                for t, v in r["eval"].items():
                    f.write(f"{name},{r['seed']},{t},{defined_or_nan(v['ne']):.6f},{defined_or_nan(v['auc']):.6f},"
                            f"{r['train_rows_per_s']:.1f}\n")
    print(text)
    return text

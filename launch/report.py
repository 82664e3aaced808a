"""Results of finished runs: a per-task table (NE, AUC, NE gain vs equal weights, oracle NE),
`report.md`, `results.csv` and the Figure-2-style plots of gradient magnitudes and task
weights over training."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow.parquet as pq

from data.storage import resolve_files

log = logging.getLogger(__name__)


def normalized_entropy(p: np.ndarray, y: np.ndarray) -> float:
    """NE = mean BCE / entropy of the label rate (DESIGN.md, 'Definitions')."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    y = y.astype(np.float64)
    ce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    r = y.mean()
    return float(ce / -(r * np.log(r) + (1 - r) * np.log(1 - r)))


def oracle_ne(eval_patterns: List[str], tasks: List[Dict[str, str]]) -> Dict[str, Optional[float]]:
    """NE of the true probabilities (column p_<task>, if the files have it) on the labelled
    eval rows: the best any model can reach. None where the data has no truth column."""
    files = resolve_files(eval_patterns)
    out: Dict[str, Optional[float]] = {}
    for task in tasks:
        truth = f"p_{task['name']}"
        if truth not in pq.ParquetFile(files[0]).schema_arrow.names:
            out[task["name"]] = None
            continue
        cols = [pq.read_table(f, columns=[task["column"], truth]) for f in files]
        y = np.concatenate([c.column(0).to_numpy(zero_copy_only=False).astype(np.float64) for c in cols])
        p = np.concatenate([c.column(1).to_numpy(zero_copy_only=False) for c in cols])
        keep = ~np.isnan(y)
        out[task["name"]] = normalized_entropy(p[keep], y[keep])
    return out


def defined_or_nan(x) -> float:
    """A metric of summary.json; null (a task whose eval labels are one class) -> NaN."""
    return float("nan") if x is None else x


def ne_gain(ne_base: float, ne: float) -> float:
    """The paper's NE gain, in %: 100 (NE(equal) - NE(method)) / NE(equal)."""
    return 100.0 * (ne_base - ne) / ne_base


def _read_jsonl(path: Path, kind: str) -> List[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def plot_balancing(run: Path, tasks: List[str], out: Path, name: str = "") -> Optional[Path]:
    """Gradient magnitudes before balancing, task weights, magnitudes after (paper Fig. 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_jsonl(run / "metrics.jsonl", "train")
    if not rows or f"grad_norm/{tasks[0]}" not in rows[0]:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("grad_norm", "weight", "grad_norm_balanced"),
                              ("||g_m|| before balancing", "task weight lambda_m",
                               "||c_m g_m|| passed on (mean(u) lambda_m v_m)")):
        for t in tasks:
            ax.plot(steps, [r[f"{key}/{t}"] for r in rows], label=t)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    fig.tight_layout()
    path = out / f"balancing_{name or run.name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def binary_tasks(summary: Dict) -> List[str]:
    return [t["name"] for t in summary["tasks"] if t.get("kind", "binary") == "binary"]


def results_table(runs: List[Path]) -> tuple[List[str], List[List[str]], Dict]:
    summaries = {r.name: json.loads((r / "summary.json").read_text()) for r in runs}
    base = next((n for n, s in summaries.items() if s["method"] == "equal"), None)
    first = next(iter(summaries.values()))
    tasks = binary_tasks(first)  # NE / AUC tables; regression tasks' MSE / MAE are in summary.json
    oracle = oracle_ne(first["eval_files"], first["tasks"])
    header = ["task"] + [f"NE {n}" for n in summaries] + [f"AUC {n}" for n in summaries]
    # calibration (mean prediction / label rate) and grouped AUC, where the runs have them
    extra = [k for k in ("calibration", "gauc") if all(k in s["eval"][tasks[0]] for s in summaries.values())] if tasks else []
    header += [f"{'GAUC' if k == 'gauc' else 'calibration'} {n}" for k in extra for n in summaries]
    header += [f"NE gain {n} %" for n in summaries if base and n != base] + ["oracle NE"]
    rows = []
    for t in tasks + ["average"]:
        def ne(n):
            s = summaries[n]["eval"]
            return float(np.mean([defined_or_nan(s[k]["ne"]) for k in tasks])) if t == "average" else defined_or_nan(s[t]["ne"])

        def auc(n):
            s = summaries[n]["eval"]
            return float(np.mean([defined_or_nan(s[k]["auc"]) for k in tasks])) if t == "average" else defined_or_nan(s[t]["auc"])
        def other(n, k):
            s = summaries[n]["eval"]
            return float(np.mean([defined_or_nan(s[j][k]) for j in tasks])) if t == "average" else defined_or_nan(s[t][k])
        row = [t] + [f"{ne(n):.5f}" for n in summaries] + [f"{auc(n):.4f}" for n in summaries]
        row += [f"{other(n, k):.4f}" for k in extra for n in summaries]
        if t == "average":  # the mean of the per-task gains, as the paper's tables report
            row += [f"{np.mean([ne_gain(summaries[base]['eval'][k]['ne'], summaries[n]['eval'][k]['ne']) for k in tasks]):+.3f}"
                    for n in summaries if base and n != base]
            orc = [oracle[k] for k in tasks]
            row += [f"{np.mean(orc):.5f}" if None not in orc else "-"]
        else:
            row += [f"{ne_gain(ne(base), ne(n)):+.3f}" for n in summaries if base and n != base]
            row += [f"{oracle[t]:.5f}" if oracle[t] is not None else "-"]
        rows.append(row)
    return header, rows, summaries


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_report(runs: List[Path], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    header, rows, summaries = results_table(runs)
    table = markdown_table(header, rows)
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    tasks = binary_tasks(next(iter(summaries.values())))
    plots = [p for p in (plot_balancing(r, tasks, out) for r in runs) if p is not None]
    lines = ["# mbrec results", "", "Eval NE (lower is better) and AUC per task, across all ranks. "
             "NE gain = 100 (NE(equal) - NE(method)) / NE(equal); positive is better. "
             "Oracle NE: the true probabilities of the generator (the best any model can reach).",
             "", table, "", "## Runs", ""]
    for name, s in summaries.items():
        lines.append(f"- `{name}`: method {s['method']}, {s['steps']} steps on {s['world_size']} ranks, "
                     f"final task weights {[round(w, 3) for w in s['final_weights']]}, "
                     f"{s['train_rows_per_s']:.0f} train rows/s, reader counters {s['train_reader']}")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(table)
    print(f"\nreport: {out / 'report.md'}")
    return table

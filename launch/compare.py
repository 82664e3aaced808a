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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from launch.config import load_config
from launch.report import binary_tasks
from trainer.errors import RunError

log = logging.getLogger(__name__)

ALL_METHODS = ["equal", "uncertainty", "pcgrad", "gradvac", "graddrop", "dbmtl", "imtlg", "mgda",
               "moco", "multibalance", "multibalance_noema", "multibalance_exact", "multibalance_magnitude",
               "multibalance_paper", "multibalance_capped", "magnitude_equalised", "param_mgda", "param_moco"]
MB = "balancer.multibalance"
# MultiBalance's ablations, by name: the paper's form unless named otherwise
ABLATIONS = {
    "multibalance_noema": [f"{MB}.ema=false"],  # the paper's "remove EMA" (v = g)
    "multibalance_exact": [f"{MB}.deferred=false"],  # this step's Gram, not the previous one's
    "multibalance_magnitude": [f"{MB}.deferred=false", f"{MB}.rescale=magnitude"],  # v = (u / n) g
    # the paper's step on this step's Gram (the default before the comparison in
    # docs/results/balancing-evidence); the default is the capped step on the tracked Gram
    "multibalance_paper": [f"{MB}.step=paper", f"{MB}.gram_ema=0"],
    "multibalance_capped": [f"{MB}.step=capped", f"{MB}.gram_ema=0"],  # capped, this step's Gram
    # lambda from an EMA of the global Gram (beyond the paper), with the capped step: the default
    "multibalance_tracked": [f"{MB}.step=capped", f"{MB}.gram_ema=0.05"],
    # lambda frozen at uniform, the EMA rescaling kept: task m weighted mean(u) / u_m. What the
    # rescaling alone does, apart from lambda's dynamics
    "magnitude_equalised": [f"{MB}.beta=0"],
}


@dataclass
class Variant:
    name: str
    overrides: List[str]
    kind: str  # method | beta | single


def variants(methods: List[str], betas: List[float], tasks: List[str], single_task: bool,
             beta_steps: Tuple[str, ...] = ("paper",)) -> List[Variant]:
    """Runs per seed: the methods, MultiBalance at each beta for each step rule ("paper": the
    paper's update; "capped": the stable one), and single-task models."""
    out = []
    for m in methods:
        if m in ABLATIONS:
            out.append(Variant(m, ["balancer.method=multibalance"] + ABLATIONS[m], "method"))
        else:
            out.append(Variant(m, [f"balancer.method={m}"], "method"))
    for step in beta_steps:
        for b in betas:
            name = f"multibalance{'_' + step if step != 'paper' else ''}_beta{b:g}"
            # on this step's Gram: the paper's form at each beta (Table 4), tracked Gram off
            out.append(Variant(name, ["balancer.method=multibalance", f"{MB}.beta={b}", f"{MB}.step={step}",
                                      f"{MB}.gram_ema=0"], "beta"))
    if single_task:
        for t in tasks:
            out.append(Variant(f"single_{t}", ["balancer.method=equal", f'data.tasks=[{{name = "{t}"}}]'], "single"))
    return out


def plan(config: str, overrides: List[str], methods: List[str], betas: List[float], seeds: int,
         single_task: bool, out: Path, beta_steps: Tuple[str, ...] = ("paper",)) -> List[Tuple[str, int, List[str]]]:
    cfg = load_config(config, overrides)
    tasks = [t.name for t in cfg.data.tasks]
    runs = []
    for seed in range(seeds):  # seed-major: every method's first seed finishes first
        # a seed is the initialisation and, where the training data is shuffled, its order too:
        # the intervals then cover both kinds of noise (see `_what_ran`)
        order = [f"data.shuffle_seed={seed}"] if cfg.data.shuffle else []
        for v in variants(methods, betas, tasks, single_task, beta_steps):
            run_dir = out / v.name / f"seed{seed}"
            runs.append((v.name, seed, list(overrides) + v.overrides + order + [
                f"trainer.seed={seed}", f"trainer.out_dir={run_dir}", "trainer.resume=false",
                "trainer.progress_bar=false", "trainer.checkpoint_every=0", "trainer.checkpoint_at_end=false"]))
    return runs


SETTINGS = "compare_settings.json"  # the digest of a compare run's resolved config


def _settings(cfg) -> str:
    import dataclasses
    import hashlib
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_same_settings(run_dir: Path, cfg) -> None:
    """A finished run in --out is reused only if it ran with exactly this run's settings."""
    saved = run_dir / SETTINGS
    if not saved.is_file() or json.loads(saved.read_text())["settings"] != _settings(cfg):
        raise RunError(f"{run_dir} holds a finished run {'of other settings' if saved.is_file() else 'whose settings are unknown'}"
                       f" (--steps, --set, the config or its data differ): use a new --out for this compare, "
                       f"or remove it")


def run_plan(config: str, plan_file: str) -> int:
    """The job's entry point on every rank: trains the planned runs one after another."""
    import time
    from trainer.loop import train
    entries = json.loads(Path(plan_file).read_text())
    durations: List[float] = []
    for i, (name, seed, overrides) in enumerate(entries):
        cfg = load_config(config, overrides)
        run_dir = Path(cfg.trainer.out_dir)
        if (run_dir / "summary.json").is_file():
            _check_same_settings(run_dir, cfg)
            continue  # finished in an earlier, interrupted compare with these settings
        t0 = time.perf_counter()
        summary = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            (run_dir / SETTINGS).write_text(json.dumps({"settings": _settings(cfg)}))
        durations.append(time.perf_counter() - t0)
        left = (len(entries) - i - 1) * sum(durations) / len(durations)
        log.info("[%d/%d] %s seed %d: %d steps in %.0f s; about %.0f min left", i + 1, len(entries), name, seed,
                 summary["steps"], durations[-1], left / 60)
    return 0


def _load(out: Path) -> Dict[str, List[dict]]:
    """Per variant, its finished runs' summaries, with `seed`, `dir` and the run's resolved
    settings (`config`, from run.json) added."""
    runs: Dict[str, List[dict]] = {}
    for summary in sorted(out.glob("*/seed*/summary.json")):
        r = json.loads(summary.read_text())
        r["seed"], r["dir"] = int(summary.parent.name[4:]), summary.parent
        run_json = summary.parent / "run.json"
        r["config"] = json.loads(run_json.read_text()) if run_json.is_file() else {}
        runs.setdefault(summary.parent.parent.name, []).append(r)
    return runs


def oscillation(run_dir: Path) -> float:
    """MultiBalance's oscillation statistic over a run: the share of lambda updates that reversed
    the previous one (`lambda_reversal`, per log interval and task), averaged; nan without it."""
    import numpy as np
    values = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            values += [v for k, v in rec.items() if k.startswith("lambda_reversal/")]
    return float(np.mean(values)) if values else float("nan")


def beta_table(runs: Dict[str, List[dict]], tasks: List[str]) -> str:
    """Table 4 analogue: MultiBalance (paper rescaling, deferred, with EMA, no tracked Gram) by beta and step rule,
    read from each run's settings: average NE gain with its 95 % interval, and the oscillation."""
    from launch.report import markdown_table
    import numpy as np
    cells: Dict[Tuple[float, str], str] = {}
    for name, rs in runs.items():
        c = rs[0]["config"]
        if (c.get("balancer.method") != "multibalance" or not c.get(f"{MB}.ema") or not c.get(f"{MB}.deferred")
                or c.get(f"{MB}.rescale") != "paper" or c.get(f"{MB}.gram_ema", 0.0) > 0):
            continue  # (the tracked Gram is another form, not a beta x step cell)
        osc = float(np.mean([oscillation(r["dir"]) for r in rs]))
        cells[(c[f"{MB}.beta"], c[f"{MB}.step"])] = f"{_ci(gains_by_seed(runs, name, tasks)['average'])} ({osc:.2f})"
    betas = sorted({b for b, _ in cells})
    if not betas:
        return "(no MultiBalance run of the paper's form on this step's Gram: see `--betas`)"
    return markdown_table(["beta", "paper step: avg NE gain % (reversals)", "capped step: avg NE gain % (reversals)"],
                          [[f"{b:g}", cells.get((b, "paper"), "-"), cells.get((b, "capped"), "-")] for b in betas])


def _logged_mean(run_dir: Path, prefix: str) -> float:
    """The mean of a logged per-task statistic (`prefix`/task) over a run's log records and tasks."""
    import numpy as np
    values = []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            values += [v for k, v in json.loads(line).items() if k.startswith(prefix + "/")]
    return float(np.mean(values)) if values else float("nan")


def dynamics_table(runs: Dict[str, List[dict]], tasks: List[str]) -> str:
    """Per MultiBalance variant: lambda's reversal share, the tasks' mean representation-gradient
    cosine (a sample per log record), each task's final lambda (mean over seeds), and the
    average NE gain on rare (base rate < RARE) and frequent tasks."""
    from launch.report import markdown_table
    import numpy as np
    rates = runs["equal"][0].get("head_bias", {}).get("base_rates") or [None] * len(tasks)
    names = [t["name"] for t in runs["equal"][0]["tasks"]]
    rate = {t: r for t, r in zip(names, rates)}
    rare = [t for t in tasks if rate.get(t) is not None and rate[t] < RARE]
    rows = []
    for name, rs in runs.items():
        if rs[0]["config"].get("balancer.method") != "multibalance":
            continue
        g = gains_by_seed(runs, name, tasks)
        split = [[float(np.mean([g[t][i] for t in group])) for i in range(len(g["average"]))] if group else []
                 for group in (rare, [t for t in tasks if t not in rare])]
        lam = np.mean([r["final_weights"] for r in rs], axis=0)
        rows.append([name, f"{np.mean([oscillation(r['dir']) for r in rs]):.2f}",
                     f"{np.mean([_logged_mean(r['dir'], 'grad_cosine') for r in rs]):+.3f}",
                     " ".join(f"{x:.2f}" for x in lam), _ci(split[0]), _ci(split[1])])
    return markdown_table(["variant", "reversals", "mean grad cosine", f"final lambda ({', '.join(names)})",
                           f"avg NE gain % rare (< {100 * RARE:g} %: {', '.join(rare) or 'none'})",
                           "avg NE gain % frequent"], rows)


RARE = 0.01  # a task whose training base rate is below this is "rare" in the dynamics table


def _ms(values: List[float], fmt: str = "{:+.3f}") -> str:
    """mean ± std (levels: NE, QPS)."""
    import numpy as np
    if not values:
        return "-"
    m, s = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return (fmt + " ± " + fmt.replace("+", "")).format(m, s)


T975 = [float("nan"), 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # by n - 1
T80 = [float("nan"), 1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879]  # one-sided, 80 %


def interval(values: List[float]) -> Tuple[float, float, float]:
    """mean, 95 % half-width (t, n - 1 degrees of freedom) and the smallest effect a paired test
    at 5 % would detect with 80 % power, (t_0.975 + t_0.8) sd / sqrt(n), of paired differences."""
    import numpy as np
    n = len(values)
    if n < 2:
        return (float(np.mean(values)) if values else float("nan")), float("nan"), float("nan")
    sd = float(np.std(values, ddof=1)) / np.sqrt(n)
    t, p = (T975[n - 1], T80[n - 1]) if n - 1 < len(T975) else (1.96, 0.842)
    return float(np.mean(values)), t * sd, (t + p) * sd


def _ci(values: List[float], fmt: str = "{:+.3f}") -> str:
    """mean ± 95 % half-width of paired differences."""
    if not values:
        return "-"
    m, h, _ = interval(values)
    return (fmt + " ± " + fmt.replace("+", "")).format(m, h) if h == h else fmt.format(m) + " (1 seed)"


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


def _qps_ratio(runs: Dict[str, List[dict]], name: str) -> List[float]:
    """Per seed, QPS(method) / QPS(equal) against the equal-weights run of that seed (1: as fast)."""
    base = {r["seed"]: r["train_rows_per_s"] for r in runs["equal"]}
    return [r["train_rows_per_s"] / base[r["seed"]] for r in runs[name] if r["seed"] in base]


def _beyond_noise(values: List[float]) -> bool:
    """A gain whose 95 % interval lies above 0 (two seeds at least)."""
    m, h, _ = interval(values) if values else (float("nan"),) * 3
    return h == h and m - h > 0


def compare_tables(runs: Dict[str, List[dict]], tasks: List[str]) -> Dict[str, str]:
    import numpy as np
    from launch.report import markdown_table
    joint = [n for n in runs if not n.startswith("single_")]
    gains = {n: gains_by_seed(runs, n, tasks) for n in joint if n != "equal"}
    cols = tasks + ["average"]
    best = {c: max(gains, key=lambda n: np.mean(gains[n][c]) if gains[n][c] else -1e9) for c in cols} if gains else {}
    qps = {n: [r["train_rows_per_s"] for r in runs[n]] for n in joint}
    noise = {c: float(np.std(gains["multibalance"][c], ddof=1)) if "multibalance" in gains and len(gains["multibalance"][c]) > 1 else float("nan") for c in cols}

    def gain_cell(n, c):  # bold: the column's best, where its interval lies above 0 (not inside the noise)
        cell = _ci(gains[n][c])
        return f"**{cell}**" if best.get(c) == n and _beyond_noise(gains[n][c]) else cell

    # a method that trained exactly the equal-weights model on every seed (weights that never left
    # uniform, e.g. MoCo with 2 tasks): flagged, as its "+0.000 ± 0.000" is not a measurement
    same = {n for n in gains if all(g == 0.0 for c in cols for g in gains[n][c])
            and all(max(r["final_weights"]) - min(r["final_weights"]) < 1e-6 for r in runs[n])}

    t3 = markdown_table(["method"] + [f"NE gain {c} % (mean ± 95 % interval; equal: NE, mean ± seed std)"
                                      if c == cols[0] else f"NE gain {c} %" for c in cols] + ["seeds"],
                        [["equal (NE, mean ± seed std)"] + [_ms([r["eval"][t]["ne"] for r in runs["equal"]], "{:.5f}") for t in tasks]
                         + [_ms([float(np.mean([r["eval"][t]["ne"] for t in tasks])) for r in runs["equal"]], "{:.5f}"),
                            str(len(runs["equal"]))]]
                        + [[n + (" (weights never left uniform: the equal-weights model)" if n in same else "")]
                           + [gain_cell(n, c) for c in cols] + [str(len(runs[n]))] for n in gains])
    mde = markdown_table(["method", "average NE gain %", "95 % interval", "smallest detectable effect %"],
                         [[n, *(f"{x:+.3f}" if i == 0 else f"{x:.3f}" for i, x in enumerate(interval(gains[n]["average"])))]
                          for n in gains])
    auc = markdown_table(["method"] + [f"AUC {t} (mean ± seed std)" if t == tasks[0] else f"AUC {t}" for t in tasks]
                         + ["AUC average"],
                         [[n] + [_ms([r["eval"][t]["auc"] for r in runs[n]], "{:.4f}") for t in tasks]
                          + [_ms([float(np.mean([r["eval"][t]["auc"] for t in tasks])) for r in runs[n]], "{:.4f}")]
                          for n in joint])
    # calibration (mean prediction / label rate: 1 is calibrated) and GAUC where every run has them
    for key, title in (("calibration", "calibration"), ("gauc", "GAUC")):
        if all(r["eval"][t].get(key) is not None for n in joint for r in runs[n] for t in tasks):
            auc += "\n\n" + markdown_table(["method"] + [f"{title} {t} (mean ± seed std)" for t in tasks],
                                            [[n] + [_ms([r["eval"][t][key] for r in runs[n]], "{:.4f}") for t in tasks]
                                             for n in joint])
    t2 = markdown_table(["method", "train QPS (rows/s, mean ± seed std)",
                         "QPS / equal's QPS (paired by seed, mean ± 95 % interval)", "avg NE gain % (± 95 % interval)"],
                        [[n, _ms(qps[n], "{:.0f}"), _ci(_qps_ratio(runs, n), "{:.3f}"),
                          _ci(gains[n]["average"]) if n in gains else "0"] for n in joint])
    singles = {t: runs.get(f"single_{t}", []) for t in tasks}
    nt = markdown_table(["task", "NE joint (equal weights)", "NE single-task", "joint vs single %", "negative transfer"],
                        [[t, _ms([r["eval"][t]["ne"] for r in runs["equal"]], "{:.5f}"),
                          _ms([r["eval"][t]["ne"] for r in singles[t]], "{:.5f}"),
                          _ci(_joint_vs_single(runs["equal"], singles[t], t)),
                          _transfer_verdict(_joint_vs_single(runs["equal"], singles[t], t))] for t in tasks])
    return {"table3": t3, "table2": t2, "negative_transfer": nt, "mde": mde, "auc": auc,
            "noise": ", ".join(f"{c}: {v:.3f}" for c, v in noise.items()) if "multibalance" in gains else ""}


def _joint_vs_single(joint: List[dict], single: List[dict], task: str) -> List[float]:
    """Per seed (paired): 100 (NE single - NE joint) / NE single; > 0: the joint model is better."""
    by_seed = {r["seed"]: r for r in single}
    return [100 * (by_seed[j["seed"]]["eval"][task]["ne"] - j["eval"][task]["ne"]) / by_seed[j["seed"]]["eval"][task]["ne"]
            for j in joint if j["seed"] in by_seed]


def _transfer_verdict(diffs: List[float]) -> str:
    """Negative transfer only where the 95 % interval of the paired differences is below 0."""
    if not diffs:
        return "-"
    m, h, _ = interval(diffs)
    if h != h:
        return "undecided (1 seed)"
    return "yes" if m + h < 0 else "no" if m - h > 0 else "within noise"


def _what_ran(runs: Dict[str, List[dict]]) -> str:
    steps = sorted({r["steps"] for rs in runs.values() for r in rs})
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    shuffled = bool(runs["equal"][0]["config"].get("data.shuffle"))
    noise = ("model initialisation and training data order (data.shuffle on: data.shuffle_seed = the seed)"
             if shuffled else "model initialisation only (data.shuffle off: every seed reads the data in one order)")
    return (f"{len(runs)} variants x {len(seeds)} seed(s), {' / '.join(map(str, steps))} training steps per run, "
            f"{runs['equal'][0]['world_size']} rank(s); a seed varies the {noise}")


def write_compare_report(out: Path) -> str:
    from launch.report import defined_or_nan, plot_balancing
    runs = _load(out)
    if "equal" not in runs:
        raise ValueError(f"{out}: no finished equal-weights run to compare against")
    tasks = binary_tasks(runs["equal"][0])
    tables = compare_tables(runs, tasks)
    plots = [plot_balancing(out / n / "seed0", tasks, out, n) for n in ("multibalance", "multibalance_noema")
             if (out / n / "seed0" / "metrics.jsonl").is_file()]
    plots = [p for p in plots if p is not None]
    text = "\n".join([
        "# mbrec compare", "",
        f"What ran: {_what_ran(runs)}.", "",
        "NE gain = 100 (NE(equal) - NE(method)) / NE(equal), per seed against the equal-weights run "
        "of the same seed (same initialisation, same data order); mean ± 95 % interval of those "
        "paired differences; a column's best in bold where its interval lies above 0 (beyond the seeds' noise). "
        "Positive is better; the paper calls a change "
        "of 0.05 % significant.", "",
        "## NE gain vs equal weights (paper Table 3; beta sweep = Table 4)", "", tables["table3"], "",
        *([f"Seed-to-seed std of MultiBalance's gain: {tables['noise']}", ""] if tables["noise"] else []),
        "## MultiBalance by beta and step rule (paper Table 4)", "", beta_table(runs, tasks), "",
        "Reversals: the share of weight updates that reversed the previous update's direction "
        "(mean over tasks and the run): near 0.5 or above, lambda oscillates instead of converging.", "",
        "## MultiBalance's dynamics", "", dynamics_table(runs, tasks), "",
        "Mean grad cosine: the mean pairwise cosine of the tasks' gradients w.r.t. the shared "
        "representation over the global batch, sampled at each log record. Rare / frequent: the "
        "average NE gain (95 % interval) over the tasks below / above the base-rate threshold.", "",
        "## What these runs can resolve", "", tables["mde"], "",
        "The interval is that of the paired (same seed) differences; the smallest detectable effect is "
        "the average gain a paired t-test at 5 % would find with 80 % power, given this spread and "
        "number of seeds. A gain inside its interval's reach of 0 is noise.", "",
        "## AUC", "", tables["auc"], "",
        "## Training throughput, same job (paper Table 2)", "", tables["table2"], "",
        "Throughput here is indicative (runs share the machine with whatever else runs on it); "
        "`mbrec bench` measures it, with rounds and paired ratios.", "",
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

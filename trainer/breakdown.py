"""`mbrec bench --breakdown`: where one training step's time goes, per variant.

Each variant runs `steps` training steps (DMP + the train pipeline, as in training) under
torch.profiler (CPU activities). Every profiled event inside a step belongs to the innermost
named range around it: the train pipeline's own (`## forward ##`, `## backward ##`,
`## optimizer ##`, ...) or the balancer's (`mbrec.local_gram`, `mbrec.host_step`, ..., see
`balancing.base.scope`), and its self time (its time minus its children's) is added to that
range's row. A row's "Python" is the self time of the named range itself: interpreter time
between the torch ops it calls. The rows therefore add up to the profiled step time exactly;
`check` says so, and the table prints the same step timed without the profiler beside it (the
profiler adds about a microsecond per op, so profiled times rank and difference the parts,
while the unprofiled step time is the one that counts).
"""
from __future__ import annotations

import itertools
import statistics
import time
from collections import defaultdict
from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

from balancing.base import profile_scopes

STEP = "mbrec.step"
# the train pipeline's ranges, by their first word (`## forward 3 ##` -> forward)
PIPELINE = ("forward", "backward", "optimizer", "zero_grad", "wait_for_batch", "next_batch", "start_sparse_data_dist",
            "wait_sparse_data_dist", "copy_batch_to_gpu", "load_batch")
# events recognised by name wherever they run: the fan-out's autograd node and the collectives
BY_NAME = (("_FanOutBackward", "autograd node _FanOutBackward"), ("all_reduce", "all-reduce (DDP, Gram)"),
           ("allreduce", "all-reduce (DDP, Gram)"))


def _label(name: str) -> str:
    """The row an event starts, or '' for an op that belongs to its parent's row."""
    if name.startswith("mbrec."):
        return "balancer " + name[len("mbrec."):]
    if name.startswith("## "):
        word = name[3:].split(" ")[0]
        return ("pipeline " + word) if word in PIPELINE else "pipeline other"
    for key, row in BY_NAME:
        if key in name:
            return row
    return ""


def attribute(events) -> Tuple[Dict[str, Dict[str, float]], float, int]:
    """profiler events -> ({row: {"ops": us, "python": us}}, summed step time in us, steps).

    Walks the tree under each `mbrec.step` range: an event with a label starts its row and its
    self time is that row's Python; an unlabelled op's self time goes to the row it runs in."""
    rows: Dict[str, Dict[str, float]] = defaultdict(lambda: {"ops": 0.0, "python": 0.0})
    total, steps = 0.0, 0
    for root in events:
        if root.name != STEP or root.cpu_parent is not None:
            continue
        steps += 1
        total += root.cpu_time_total
        stack = [(root, "pipeline (between ranges)", True)]
        while stack:
            e, row, named = stack.pop()
            rows[row]["python" if named else "ops"] += e.self_cpu_time_total
            for child in e.cpu_children:
                label = _label(child.name)
                stack.append((child, label or row, bool(label)))
    return dict(rows), total, steps


def check(rows: Dict[str, Dict[str, float]], total: float) -> float:
    """The rows' sum minus the profiled step time (us): 0 up to rounding, or the table is wrong."""
    return sum(r["ops"] + r["python"] for r in rows.values()) - total


def _steps(pipeline, batches: Iterator, n: int) -> None:
    for _ in range(n):
        pipeline.progress(batches)


def profile_variant(pipeline, batches: Iterator, steps: int, warmup: int) -> Dict:
    """Times `steps` steps without the profiler, then profiles `steps` more -> the row table."""
    _steps(pipeline, batches, warmup)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        pipeline.progress(batches)
        times.append(time.perf_counter() - t0)
    profile_scopes(True)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function(STEP):
                    pipeline.progress(batches)
    finally:
        profile_scopes(False)
    rows, total, n = attribute(prof.events())
    per = {k: {"ops": v["ops"] / n, "python": v["python"] / n} for k, v in rows.items()}
    return {"rows": per, "profiled_step_us": total / n, "step_us": 1e6 * statistics.median(times),
            "check_us": check(rows, total) / n}


def run_breakdown(cfg, variants: List[str], steps: int, warmup: int, env) -> Dict:
    """{variant: profile_variant(...)} on this rank (every rank runs the same steps)."""
    from trainer.bench import build_variant, pin_cpu, random_batches
    pin_cpu(env)
    fixed = random_batches(cfg, 8, seed=env.rank)
    out = {}
    for v in variants:
        pipeline, convert = build_variant(v, cfg, env)
        if dist.is_initialized():
            dist.barrier()
        out[v] = profile_variant(pipeline, map(convert, itertools.cycle(fixed)), steps, warmup)
        del pipeline
    return out


def format_breakdown(result: Dict, base: str = "equal") -> str:
    """One column per variant (us per step), rows sorted by the largest difference to `base`."""
    names = list(result)
    rows = sorted({r for v in result.values() for r in v["rows"]})

    def us(v, r, part=None):
        x = result[v]["rows"].get(r, {"ops": 0.0, "python": 0.0})
        return x["ops"] + x["python"] if part is None else x[part]
    ref = base if base in result else names[0]
    rows.sort(key=lambda r: -max(abs(us(v, r) - us(ref, r)) for v in names))
    head = f"{'us per step (profiled)':<38}" + "".join(f"{v:>24}" for v in names)
    lines = [head, f"{'':<38}" + "".join(f"{'total (Python)':>24}" for _ in names)]
    for r in rows:
        lines.append(f"{r:<38}" + "".join(f"{us(v, r):>14.1f} ({us(v, r, 'python'):>7.1f})" for v in names))
    for key, label in (("profiled_step_us", "profiled step (sum of rows)"), ("check_us", "rows - profiled step"),
                       ("step_us", "step without profiler (median)")):
        lines.append(f"{label:<38}" + "".join(f"{result[v][key]:>24.1f}" for v in names))
    return "\n".join(lines)

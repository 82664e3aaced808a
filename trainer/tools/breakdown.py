"""`mbrec bench --breakdown`: where one training step's time goes, per variant.

The variants run one step each in turn (DMP + the train pipeline, as in training; the machine's
speed drifts by tens of percent over a minute here, so variants timed one after the other
would not compare), `steps` times without and `steps` times with torch.profiler (CPU
activities). Every profiled event inside a step belongs to the innermost
named range around it: the train pipeline's own (`## forward ##`, `## backward ##`,
`## optimizer ##`, ...) or the balancer's (`mbrec.local_gram`, `mbrec.host_step`, ..., see
`balancing.base.scope`), and its self time (its time minus its children's) is added to that
range's row. A row's "Python" is the self time of the named range itself: interpreter time
between the torch ops it calls. The rows therefore add up to the profiled step time exactly;
`check` says so, and the table prints the same step timed without the profiler beside it (the
profiler adds about a microsecond per op, so profiled times rank and difference the parts,
while the unprofiled step time is the one that counts). On an accelerator both see the host
only: CPU activities, and timers around work the device runs later.
"""
from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from collections import defaultdict
from typing import Dict, List, Tuple

import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

from balancing.base import SCOPE_TIMES, profile_scopes

STEP = "mbrec.step"
TOP = "pipeline (between ranges)"  # the step's own row: time in none of the pipeline's ranges
# the train pipeline's ranges, by their first word (`## forward 3 ##` -> forward)
PIPELINE = ("forward", "backward", "optimizer", "zero_grad", "wait_for_batch", "next_batch", "start_sparse_data_dist",
            "wait_sparse_data_dist", "copy_batch_to_gpu", "load_batch")
# events recognised by name wherever they run: the fan-out's autograd node and the collectives
BY_NAME = (("_FanOutBackward", "autograd node _FanOutBackward"), ("all_reduce", "all-reduce (DDP, Gram)"),
           ("allreduce", "all-reduce (DDP, Gram)"))


def _label(name: str, row: str) -> Tuple[str, bool]:
    """(the row of an event inside `row`, whether it is a named range). A named range nested in
    the pipeline's (torchrec's own, `## All2All_Pooled_bwd ##`) stays in its parent's row."""
    if name.startswith("mbrec."):
        return "balancer " + name[len("mbrec."):], True
    if name.startswith("## "):
        word = name[3:].split(" ")[0]
        return ("pipeline " + word if word in PIPELINE and row == TOP else row), True
    for key, label in BY_NAME:
        if key in name:
            return label, True
    return row, False


def attribute(events, root: str = STEP) -> Tuple[Dict[str, Dict[str, float]], float, int]:
    """profiler events -> ({row: {"ops": us, "python": us}}, summed step time in us, steps), over
    the ranges named `root`.

    Walks the tree under each `root` range: an event with a label starts its row and its
    self time is that row's Python; an unlabelled op's self time goes to the row it runs in."""
    rows: Dict[str, Dict[str, float]] = defaultdict(lambda: {"ops": 0.0, "python": 0.0})
    total, steps = 0.0, 0
    for top in events:
        if top.name != root or top.cpu_parent is not None:
            continue
        steps += 1
        total += top.cpu_time_total
        stack = [(top, TOP, True)]
        while stack:
            e, row, named = stack.pop()
            rows[row]["python" if named else "ops"] += e.self_cpu_time_total
            stack.extend((child, *_label(child.name, row)) for child in e.cpu_children)
    return dict(rows), total, steps


def check(rows: Dict[str, Dict[str, float]], total: float) -> float:
    """The rows' sum minus the profiled step time (us): 0 up to rounding, or the table is wrong."""
    return sum(r["ops"] + r["python"] for r in rows.values()) - total


_NULL = contextlib.nullcontext()


def interleaved(pipelines: Dict[str, Tuple], steps: int, wrap=None) -> Dict[str, List[float]]:
    """One step of each variant in turn, `steps` times (the order reversed every other time):
    the variants see the same moments of a noisy machine, as the bench's rounds do. `wrap(v)`:
    a context around each step (the profiler's range). -> per variant, each step's seconds."""
    names = list(pipelines)
    times: Dict[str, List[float]] = {v: [] for v in names}
    for i in range(steps):
        for v in names if i % 2 == 0 else names[::-1]:
            pipeline, batches = pipelines[v]
            t0 = time.perf_counter()
            with wrap(v) if wrap else _NULL:
                pipeline.progress(batches)
            times[v].append(time.perf_counter() - t0)
    return times


def run_breakdown(cfg, variants: List[str], steps: int, warmup: int, env) -> Dict:
    """{variant: {"rows", "profiled_step_us", "step_us", "check_us", "timers_us", "timed_step_us"}}
    on this rank (every rank runs the same steps): `steps` interleaved steps timed plain, `steps`
    with the balancer's timers, then `steps` profiled."""
    from trainer.tools.bench import build_variant, pin_cpu, random_batches
    pin_cpu(env)
    fixed = random_batches(cfg, 8, seed=env.rank)
    pipelines = {}
    for v in variants:
        pipeline, convert = build_variant(v, cfg, env)
        pipelines[v] = (pipeline, map(convert, itertools.cycle(fixed)))
        for _ in range(warmup):
            pipeline.progress(pipelines[v][1])
    if dist.is_initialized():
        dist.barrier()
    timed = interleaved(pipelines, steps)
    timers: Dict[str, Dict[str, float]] = {v: defaultdict(float) for v in variants}

    @contextlib.contextmanager
    def timing(v):  # the balancer's timers of this step, to its variant
        SCOPE_TIMES.clear()
        yield
        for name, (secs, _) in SCOPE_TIMES.items():
            timers[v][name] += secs
    try:
        profile_scopes("timer")
        with_timers = interleaved(pipelines, steps, timing)
        profile_scopes("profiler")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            interleaved(pipelines, steps, lambda v: record_function(f"{STEP}:{v}"))
    finally:
        profile_scopes(None)
    events = prof.events()
    out = {}
    for v in variants:
        rows, total, n = attribute(events, f"{STEP}:{v}")
        out[v] = {"rows": {k: {"ops": x["ops"] / n, "python": x["python"] / n} for k, x in rows.items()},
                  "profiled_step_us": total / n, "step_us": 1e6 * statistics.median(timed[v]),
                  "check_us": check(rows, total) / n,
                  "timers_us": {k: 1e6 * x / steps for k, x in timers[v].items()},
                  "timed_step_us": 1e6 * statistics.median(with_timers[v])}
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
    timers = sorted({k for v in names for k in result[v].get("timers_us", {})})
    if timers:
        lines += ["", f"{'balancer ranges, timers, no profiler':<38}" + "".join(f"{v:>24}" for v in names),
                  "(us per step, inclusive: a range contains its inner ones)"]
        lines += [f"{k:<38}" + "".join(f"{result[v]['timers_us'].get(k, 0.0):>24.1f}" for v in names) for k in timers]
        lines.append(f"{'step with timers (median)':<38}" + "".join(f"{result[v]['timed_step_us']:>24.1f}" for v in names))
    return "\n".join(lines)

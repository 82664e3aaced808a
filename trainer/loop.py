"""The training loop: build, (resume), train in segments that end at eval/checkpoint
boundaries, evaluate across ranks, save. Entry point: `train(cfg)` in every rank."""
from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from data.batch import COUNTERS
from data.footers import Footers, read_footers
from data.reader import NO_GROUP, DataSource, base_rates, fit_transforms, id_health, sample_table
from data.transforms import FittedTransforms

from trainer import checkpoint, identity, start
from trainer.build import build_train_module, build_training, head_bias, init_distributed
from trainer.checkpoint import CheckpointDir
from trainer.errors import AlreadyFinished, RunError
from trainer.guard import NonFiniteGuard
from trainer.metrics import Evaluator
from trainer.preflight import agreed, check_data, check_disk, check_memory, check_id_kinds, check_writable, on_main
from trainer.precision import precision_context
from trainer.run_log import RunLog

log = logging.getLogger(__name__)
STATS_FILE = start.STATS_FILE


def _per_task(prefix: str, values: torch.Tensor, tasks: List[str]) -> Dict[str, float]:
    return {f"{prefix}/{t}": float(v) for t, v in zip(tasks, values.tolist())}


def scored(pipeline, dmp, src: DataSource) -> Iterator[Tuple[torch.Tensor, ...]]:
    """(predictions, labels, weights [B, M], group ids [B] or None) of every batch of one epoch
    of `src`, padding batches included (at the end of a rank's epoch), in eval mode: no
    backward, no step. The pipeline returns outputs in the order it takes batches, so each
    batch's host-side group ids wait in a queue for its output."""
    groups: collections.deque = collections.deque()

    def feed(it):
        for batch in it:
            groups.append(batch.group)
            yield batch

    dmp.eval()
    try:
        with torch.no_grad():
            it = feed(itertools.islice(src.epoch(), src.steps_per_epoch))
            while True:
                try:
                    _, probs, labels, mask = pipeline.progress(it)
                except StopIteration:
                    return
                yield probs, labels, mask, groups.popleft()
    finally:
        dmp.train()


def evaluate(pipeline, dmp, src: DataSource, env, tasks: List[str], save_to: Path | None = None) -> Dict:
    evaluator = Evaluator(tasks, env.world_size, env.rank, src.cfg.batch_size, max(src.rank_rows),
                          src.steps_per_epoch, env.device, [t.kind == "regression" for t in src.cfg.tasks],
                          grouped=bool(src.group))
    kept, kept_groups = [], []
    for probs, labels, mask, group in scored(pipeline, dmp, src):
        evaluator.update(probs, labels, mask, group)
        if save_to is not None:
            kept.append(torch.cat([probs, labels, mask], 1).cpu())
            if src.group:  # padding rows: no group
                kept_groups.append(group if group is not None else torch.full((probs.shape[0],), NO_GROUP))
    if save_to is not None:  # for offline checks of the metrics; [rows, 3M] (and the groups [rows])
        np.save(save_to, torch.cat(kept).numpy())
        if src.group:
            np.save(save_to.with_name(save_to.name.replace("predictions", "groups")), torch.cat(kept_groups).numpy())
    return evaluator.compute()


def _all_reduce_counters(src: DataSource, device: torch.device) -> Dict[str, int]:
    t = src.counters.clone().to(device)  # (a copy: on CPU .to() is the tensor itself, reduced in place)
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(COUNTERS, t.tolist()))


@dataclass
class Run:
    """What one training run works with, once checked, built and started (trainer.start)."""
    out: Path
    tasks: List[str]
    ckpts: CheckpointDir
    train_src: DataSource
    eval_src: DataSource
    total: int  # steps
    dmp: object
    optimizer: object
    pipeline: object
    step: int  # the step training starts from (a resumed checkpoint's)
    timeline: start.Timeline  # the data position of every step
    start: dict  # where it started from, for summary.json
    carried: torch.Tensor  # a resumed run's counters and seconds before this attempt, float64 [C + 1]


def train(cfg) -> Dict:
    if not cfg.trainer.out_dir:
        raise RunError("trainer.out_dir is not set: name this run's own directory")
    env = init_distributed(cfg.trainer.pg_timeout_s, cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    try:
        run = _prepare(cfg, env)
    except AlreadyFinished as e:
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            raise
        # torchrun restarted a job that had finished (a rank failed on its way out): done
        log.warning("restart attempt of a finished run: %s; its summary stands", e)
        return json.loads((Path(cfg.trainer.out_dir) / "summary.json").read_text())
    runlog = RunLog(run.out, env.is_main)
    balancer = run.dmp.module.balancer
    with precision_context(cfg.trainer.precision, env.device):
        step, t_train = _train_steps(run, cfg.trainer, env, runlog, desc=f"train {cfg.balancer.method}")
        save_preds = run.out / f"eval_predictions.rank{env.rank}.npy" if cfg.trainer.save_predictions else None
        final = evaluate(run.pipeline, run.dmp, run.eval_src, env, run.tasks, save_preds)
    run.ckpts.wait()  # (trainer.async_checkpoint: the final checkpoint, written during the eval)
    summary = _summary(cfg, env, step, final, run, t_train + float(run.carried[-1]), balancer)
    summary["start"] = run.start
    runlog.write("eval", step, _flat(final))
    runlog.write("summary", step, {"summary": summary})
    if env.is_main:
        identity.write_atomic(run.out / "summary.json", json.dumps(summary, indent=2))
        log.info("final eval: %s", json.dumps(final))
    runlog.close()
    return summary


def _prepare(cfg, env) -> Run:
    """Checks (agreed across ranks) -> where the run starts from -> data sources -> model, DMP,
    pipeline -> the start (checked against this run) -> the checkpoint's parts loaded."""
    out, tasks, tcfg = Path(cfg.trainer.out_dir), cfg.data.task_names, cfg.trainer
    ckpts = CheckpointDir(tcfg.checkpoint_dir or out / "checkpoints", tcfg.keep_checkpoints, tcfg.storage_timeout_s,
                          tcfg.async_checkpoint)
    origin = on_main(lambda: start.find_origin(cfg, out, ckpts))
    train_src, eval_src = _sources(cfg, env, origin.transforms)
    agreed(lambda: (check_writable(out), ckpts.prepare(), check_data(train_src, eval_src, tasks)))
    module = build_train_module(cfg.data, cfg.model, cfg.balancer, env.device, tcfg.loss_normalization,
                                tcfg.precision)
    if not (origin.checkpoint is not None and "model" in origin.parts):
        # a resume or a warm start of the model loads its checkpoint's biases: nothing to set or say here
        bias = head_bias(cfg.model.head_bias_init, train_src.base_rates, cfg.data.tasks)
        if bias is not None:
            module.model.heads.set_output_bias(bias)
        if env.is_main:
            _log_head_bias(cfg, train_src.base_rates, bias)
    loads_model = origin.checkpoint is not None and "model" in origin.parts
    dmp, optimizer, pipeline = build_training(module, cfg, env, tables_loaded=loads_model)
    ident = identity.identity(cfg, env.world_size, train_src.files, train_src.unit_rows)
    begin = agreed(lambda: start.plan(cfg, origin, ident, train_src, out, ckpts))
    if env.is_main:  # after every rank has read the old one (agreed() gathers)
        stats = json.dumps(train_src.transforms.to_dict(), indent=1)
        identity.save(out, begin.record)
        identity.write_atomic(out / STATS_FILE, stats)
        ckpts.put(identity.RUN_FILE, identity.dumps(begin.record))  # a checkpoint directory says what trained it
        ckpts.put(STATS_FILE, stats)
    carried = torch.zeros(len(COUNTERS) + 1, dtype=torch.float64)
    if origin.checkpoint is not None:
        loaded = checkpoint.load(origin.checkpoint, dmp, optimizer, origin.parts, tcfg.storage_timeout_s)
        if env.is_main:
            origin.release()  # (a parent's checkpoint, pinned since it was picked: every rank has read it)
        if origin.kind == "resume" and loaded.totals is not None:
            carried = loaded.totals
        log.info("%s %s", "resumed from" if origin.kind == "resume" else "warm start from", origin.checkpoint)
    if tcfg.checkpoint_every or tcfg.checkpoint_at_end:
        shard_bytes, largest = checkpoint.state_bytes(dmp, optimizer)
        agreed(lambda: check_memory(largest + (shard_bytes if tcfg.async_checkpoint else 0), env.local_world_size,
                                    tcfg.async_checkpoint))
        if not ckpts.remote:
            agreed(lambda: check_disk(Path(ckpts.root), shard_bytes, env.local_world_size, tcfg.keep_checkpoints))
    return Run(out, tasks, ckpts, train_src, eval_src, begin.total, dmp, optimizer, pipeline, begin.step,
               begin.timeline, begin.summary, carried)


def _log_head_bias(cfg, rates, bias: Optional[torch.Tensor]) -> None:
    parts = []
    for m, (task, rate) in enumerate(zip(cfg.data.tasks, rates)):
        what = "rate" if task.kind == "binary" else "mean"
        parts.append(f"{task.name} {what} {'unknown' if rate is None else f'{rate:.6g}'}"
                     + ("" if bias is None else f" -> {float(bias[m]):.4f}"))
    log.info("head output biases (model.head_bias_init = %r): %s", cfg.model.head_bias_init, ", ".join(parts))


def _train_steps(run: Run, tcfg, env, runlog: RunLog, desc: str) -> Tuple[int, float]:
    """Trains from run.step to run.total in segments that end at eval and checkpoint steps;
    the final checkpoint is written here, before the final eval (which may fail). Returns the
    step reached and the seconds spent training."""
    step, saved, balancer = run.step, run.step, run.dmp.module.balancer
    guard = NonFiniteGuard(env.device, run.train_src.steps_per_epoch, run.tasks)
    dense = [p for _, p in in_backward_optimizer_filter(run.dmp.named_parameters())]
    stream = run.timeline.stream(step)
    bar = tqdm(total=run.total, initial=step, disable=not (env.is_main and tcfg.progress_bar), desc=desc,
               mininterval=2.0)
    boundaries = [b for b in (tcfg.eval_every, tcfg.checkpoint_every) if b > 0]
    checks = Checks(tcfg.log_every, tcfg.check_every or tcfg.log_every, guard, balancer, run.tasks, runlog)
    t_train = 0.0
    while step < run.total:
        seg_end = min([run.total] + [(step // b + 1) * b for b in boundaries])
        t0 = time.perf_counter()
        step = _train_segment(run.pipeline, itertools.islice(stream, seg_end - step), step, checks, bar)
        t_train += time.perf_counter() - t0
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step < run.total:
            runlog.write("eval", step, _flat(evaluate(run.pipeline, run.dmp, run.eval_src, env, run.tasks)))
        if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < run.total:
            guard.check(step, balancer.stats(), dense)
            run.ckpts.save(run.dmp, run.optimizer, step, run.timeline.record(step), _totals(run, env, t_train))
            saved = step
    bar.close()
    guard.check(step, balancer.stats(), dense)  # before the final checkpoint and eval
    guard.check_trained(step, run.step)
    if tcfg.checkpoint_at_end and saved != step:  # (a resumed finished run has it already)
        run.ckpts.save(run.dmp, run.optimizer, step, run.timeline.record(step), _totals(run, env, t_train))
    return step, t_train


def _totals(run: Run, env, t_train: float) -> torch.Tensor:
    """The run's reader counters (every rank) and training seconds so far, this attempt and the
    ones before it: float64 [C + 1]."""
    counters = torch.tensor(list(_all_reduce_counters(run.train_src, env.device).values()), dtype=torch.float64)
    return run.carried + torch.cat([counters, torch.tensor([t_train], dtype=torch.float64)])


def _sources(cfg, env, saved: Optional[dict]) -> Tuple[DataSource, DataSource]:
    """Both splits' footers and the dense transforms, read and fitted on rank 0 only and
    broadcast; `saved`: the transforms to reuse (a resumed run's own, a warm start's parent's)."""
    def read() -> Tuple[Footers, Footers, FittedTransforms, Dict]:
        train = read_footers(cfg.data.train, cfg.data)
        # one sample for the transforms' statistics, the id health and the heads' base rates
        labels = [c for t in cfg.data.labelled_tasks for c in (t.column, t.weight) if c]
        columns = list(dict.fromkeys([*cfg.data.dense, *(f.column for f in cfg.data.sparse), *labels]))
        sample = sample_table(train, cfg.data, columns)
        transforms = FittedTransforms(**saved) if saved is not None else fit_transforms(train, cfg.data, sample)
        group = [(cfg.data.eval_group, "data.eval_group")] if cfg.data.eval_group else []
        ev = read_footers(cfg.data.eval, cfg.data, extra=group)
        check_id_kinds(train.string_ids, ev, sorted({f.column for f in cfg.data.sparse}), "data.eval")
        return train, ev, transforms, id_health(train, cfg.data, sample), base_rates(sample, cfg.data)

    train, ev, transforms, health, rates = on_main(read)
    if env.is_main:
        log.info("dense transforms%s: %s", " (reused)" if saved is not None else "", transforms.describe())
    pin = env.device.type == "cuda"
    train_src = DataSource(cfg.data.train, cfg.data, env.rank, env.world_size, pin, train, transforms,
                           cfg.data.shuffle)
    train_src.id_health, train_src.base_rates = health, rates
    return train_src, DataSource(cfg.data.eval, cfg.data, env.rank, env.world_size, pin, ev, transforms,
                                 group=cfg.data.eval_group)


def _summary(cfg, env, step: int, final: Dict, run: Run, t_train: float, balancer) -> Dict:
    """What summary.json holds (identical on every rank: counters and metrics are reduced; a
    resumed run's counters and seconds include its earlier attempts')."""
    train_src, eval_src = run.train_src, run.eval_src
    now = _all_reduce_counters(train_src, env.device)
    counters = {k: v + int(c) for (k, v), c in zip(now.items(), run.carried[:-1].tolist())}
    return {"method": cfg.balancer.method, "steps": step, "world_size": env.world_size,
            "tasks": [{"name": t.name, "column": t.column, "kind": t.kind, "weight": t.weight} for t in cfg.data.tasks],
            "eval_files": eval_src.files, "eval": final, "train_reader": counters,
            "eval_reader": _all_reduce_counters(eval_src, env.device), "id_health": train_src.id_health,
            "train_seconds": t_train, "train_rows_per_s": counters["rows"] / max(t_train, 1e-9),
            "final_weights": balancer.stats()["weight"].tolist(),
            "head_bias": {"init": cfg.model.head_bias_init, "base_rates": train_src.base_rates}}


def _flat(metrics: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    return {f"{k}/{t}": v for t, d in metrics.items() for k, v in d.items()}


class Checks:
    """What runs every few steps: the log record (log_every) and the non-finite check
    (check_every); the only host syncs of the training loop."""

    def __init__(self, log_every: int, check_every: int, guard: NonFiniteGuard, balancer, tasks, runlog: RunLog):
        self.log_every, self.check_every, self.guard = log_every, check_every, guard
        self.balancer, self.tasks, self.runlog = balancer, tasks, runlog

    def after(self, step: int, losses: torch.Tensor, weights: torch.Tensor, bar) -> None:
        self.guard.observe(losses, weights)  # device ops, no sync
        if self.check_every and step % self.check_every == 0:
            self.guard.check(step, self.balancer.stats())
        if self.log_every and step % self.log_every == 0:
            record = _per_task("loss", losses, self.tasks)
            for name, values in self.balancer.stats().items():
                record.update(_per_task(name, values, self.tasks))
            self.runlog.write("train", step, record)
            bar.set_postfix(loss=f"{float(losses.sum()):.4f}", refresh=False)


def _train_segment(pipeline, it, step: int, checks: Checks, bar) -> int:
    while True:
        try:
            losses, _, _, weights = pipeline.progress(it)
        except StopIteration:
            return step
        step += 1
        bar.update(1)
        checks.after(step, losses, weights, bar)

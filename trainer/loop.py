"""The training loop: build, (resume), train in segments that end at eval/checkpoint
boundaries, evaluate across ranks, save. Entry point: `train(cfg)` in every rank."""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data.batch import COUNTERS, Batch
from data.reader import DataSource
from trainer import checkpoint
from trainer.build import build_train_module, build_training, init_distributed
from trainer.metrics import Evaluator
from trainer.precision import precision_context
from trainer.run_log import RunLog

log = logging.getLogger(__name__)


def batch_stream(src: DataSource, start_step: int) -> Iterator[Batch]:
    """Batches across epochs from the data position of `start_step` (every epoch has exactly
    src.steps_per_epoch batches on every rank, so the position follows from the step)."""
    epoch, skip = divmod(start_step, src.steps_per_epoch)
    for e in itertools.count(epoch):
        it = src.epoch()
        yield from itertools.islice(it, skip if e == epoch else 0, None)


def _per_task(prefix: str, values: torch.Tensor, tasks: List[str]) -> Dict[str, float]:
    return {f"{prefix}/{t}": float(v) for t, v in zip(tasks, values.tolist())}


def evaluate(pipeline, dmp, src: DataSource, env, tasks: List[str], save_to: Path | None = None) -> Dict:
    evaluator = Evaluator(tasks, env.world_size, env.rank, src.cfg.batch_size, src.rows, env.device)
    kept = []
    dmp.eval()
    with torch.no_grad():
        it = itertools.islice(src.epoch(), src.steps_per_epoch)
        while True:
            try:
                _, probs, labels, mask = pipeline.progress(it)
            except StopIteration:
                break
            evaluator.update(probs, labels, mask)
            if save_to is not None:
                kept.append(torch.cat([probs, labels, mask], 1).cpu())
    dmp.train()
    if save_to is not None:  # for offline checks of the metrics; [rows, 3M]
        np.save(save_to, torch.cat(kept).numpy())
    return evaluator.compute()


def _all_reduce_counters(src: DataSource, device: torch.device) -> Dict[str, int]:
    t = src.counters.to(device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(COUNTERS, t.tolist()))


def train(cfg) -> Dict:
    env = init_distributed()
    torch.manual_seed(cfg.trainer.seed)
    out = Path(cfg.trainer.out_dir)
    tasks = cfg.data.task_names
    pin = env.device.type == "cuda"
    train_src = DataSource(cfg.data.train, cfg.data, env.rank, env.world_size, pin)
    eval_src = DataSource(cfg.data.eval, cfg.data, env.rank, env.world_size, pin)
    module = build_train_module(cfg.data, cfg.model, cfg.balancer, env.device, cfg.trainer.loss_normalization,
                                cfg.trainer.precision)
    dmp, optimizer, pipeline = build_training(module, cfg, env)
    balancer = dmp.module.balancer
    runlog = RunLog(out, env.is_main)

    step = 0
    ckpt = checkpoint.latest(out / "checkpoints") if cfg.trainer.resume else None
    if ckpt is not None:
        step = checkpoint.load(ckpt, dmp, optimizer)
    total = cfg.trainer.max_steps or cfg.trainer.epochs * train_src.steps_per_epoch
    stream = batch_stream(train_src, step)
    bar = tqdm(total=total, initial=step, disable=not (env.is_main and cfg.trainer.progress_bar),
               desc=f"train {cfg.balancer.method}", mininterval=2.0)
    boundaries = [b for b in (cfg.trainer.eval_every, cfg.trainer.checkpoint_every) if b > 0]
    t_train = 0.0
    with precision_context(cfg.trainer.precision, env.device):
        while step < total:
            seg_end = min([total] + [(step // b + 1) * b for b in boundaries])
            t0 = time.perf_counter()
            step = _train_segment(pipeline, itertools.islice(stream, seg_end - step), step,
                                  cfg.trainer.log_every, balancer, tasks, runlog, bar)
            t_train += time.perf_counter() - t0
            if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0 and step < total:
                runlog.write("eval", step, _flat(evaluate(pipeline, dmp, eval_src, env, tasks)))
            if cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0 and step < total:
                checkpoint.save(out / "checkpoints", dmp, optimizer, step)
        bar.close()
        save_preds = out / f"eval_predictions.rank{env.rank}.npy" if cfg.trainer.save_predictions else None
        final = evaluate(pipeline, dmp, eval_src, env, tasks, save_preds)
    if cfg.trainer.checkpoint_at_end:
        checkpoint.save(out / "checkpoints", dmp, optimizer, step)
    summary = _summary(cfg, env, step, final, train_src, eval_src, t_train, balancer)
    runlog.write("eval", step, _flat(final))
    runlog.write("summary", step, {"summary": summary})
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("final eval: %s", json.dumps(final))
    runlog.close()
    return summary


def _summary(cfg, env, step: int, final: Dict, train_src: DataSource, eval_src: DataSource,
             t_train: float, balancer) -> Dict:
    """What summary.json holds (identical on every rank: counters and metrics are reduced)."""
    counters = _all_reduce_counters(train_src, env.device)
    return {"method": cfg.balancer.method, "steps": step, "world_size": env.world_size,
            "tasks": [{"name": t.name, "column": t.column} for t in cfg.data.tasks],
            "eval_files": eval_src.files, "eval": final, "train_reader": counters,
            "eval_reader": _all_reduce_counters(eval_src, env.device),
            "train_seconds": t_train, "train_rows_per_s": counters["rows"] / max(t_train, 1e-9),
            "final_weights": balancer.stats()["weight"].tolist()}


def _flat(metrics: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    return {f"{k}/{t}": v for t, d in metrics.items() for k, v in d.items()}


def _train_segment(pipeline, it, step: int, log_every: int, balancer, tasks, runlog: RunLog, bar) -> int:
    while True:
        try:
            losses, _, _, _ = pipeline.progress(it)
        except StopIteration:
            return step
        step += 1
        bar.update(1)
        if log_every and step % log_every == 0:  # the only host syncs of the loop
            record = _per_task("loss", losses, tasks)
            for name, values in balancer.stats().items():
                record.update(_per_task(name, values, tasks))
            runlog.write("train", step, record)
            bar.set_postfix(loss=f"{float(losses.sum()):.4f}", refresh=False)

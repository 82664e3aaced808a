"""Batch scoring: a trained checkpoint over Parquet rows, on the ranks and readers of training.

    mbrec predict CONFIG --from RUN_DIR|CHECKPOINT --data PATHS --out URI [--keep COLS] [-j 1x2]

The checkpoint (a run directory, a checkpoint directory or one step-N checkpoint, local or a
URI; resolved as a warm start's parent is) must fit CONFIG's model; its run's dense transforms
(`dense_stats.json`), id hashing (the table sizes) and data policies (`data.id_policy`,
`data.nonfinite`) are applied, so a row scores as it would have in that run's eval. Labels
are not needed (a task whose label column the files lack is scored all the same).

Output, under URI (a directory, or a prefix on object storage): `part-RRRRR.parquet`, one per
rank, with the `--keep` columns and one column `pred_TASK` per task (a probability, or the
value of a regression task), and `_summary.json` (rows scored, time, checkpoint). Order: part
R holds the (file, row group) units dealt to rank R (units R, R + world, R + 2 world, ... of
the files' sorted (file, row group) list), in that order, each unit's rows in file order. Every
input row is scored exactly once (checked). Bad input fails as in training: an error naming
the file, row group, column and row, or the configured fill, counted in the summary.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import ExitStack
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from data.errors import DataError, detailed
from data.footers import read_footers
from data.position import assign_units
from data.reader import DataSource
from data.storage import open_parquet, resolve_files, split
from data.transforms import FittedTransforms
from trainer import checkpoint, identity, start
from trainer.build import build_train_module, build_training, init_distributed
from trainer.errors import RunError
from trainer.loop import scored
from trainer.preflight import agreed, check_id_kinds, on_main

log = logging.getLogger(__name__)
SUMMARY = "_summary.json"  # (a leading "_": Parquet dataset readers of the directory skip it)


def predict(cfg, source: str, data: Sequence[str], out: str, keep: Sequence[str] = ()) -> Dict:
    """Scores every row of `data` with the checkpoint of `source`; returns the summary (every
    rank alike)."""
    t0 = time.perf_counter()
    env = init_distributed(cfg.trainer.pg_timeout_s, cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    hold = start.pin_holder()  # rank 0's pin of the checkpoint, until every rank has loaded it
    ckpt, record, stats = on_main(lambda: _trained(cfg, source, hold))
    dcfg, footers = on_main(lambda: _scoring_data(cfg, record, list(data), list(keep)))
    agreed(lambda: _check_out(out, env.rank, env.is_main))
    src = DataSource(dcfg.train, dcfg, env.rank, env.world_size, env.device.type == "cuda", footers,
                     FittedTransforms(**stats))
    cfg = dataclasses.replace(cfg, data=dcfg)
    module = build_train_module(dcfg, cfg.model, cfg.balancer, env.device, cfg.trainer.loss_normalization,
                                cfg.trainer.precision)
    dmp, optimizer, pipeline = build_training(module, cfg, env, tables_loaded=True)
    step = checkpoint.load(ckpt, dmp, optimizer, ("model", "balancer"), cfg.trainer.storage_timeout_s).step
    hold.close()
    t_score = time.perf_counter()
    preds = _predictions(pipeline, dmp, src)  # [rows of this rank, M]
    t_score = time.perf_counter() - t_score
    table = _with_kept(preds, src, list(keep), dcfg.task_names)
    fs, root = split(out)
    pq.write_table(table, f"{root}/part-{env.rank:05d}.parquet", filesystem=fs)
    summary = _summary(src, env, ckpt, step, out, time.perf_counter() - t0, t_score, list(table.column_names))
    if env.is_main:
        with fs.open_output_stream(f"{root}/{SUMMARY}") as f:
            f.write(json.dumps(summary, indent=2).encode())
        log.info("scored %d rows into %s: %.1f s in all, %.1f s scoring (%.0f rows/s)", summary["rows"], out,
                 summary["seconds"], summary["scoring_seconds"], summary["rows_per_s"])
    return summary


def _trained(cfg, source: str, hold: ExitStack) -> Tuple[str, dict, dict]:
    """(checkpoint, its run.json, its dense transforms), checked against cfg's architecture; the
    checkpoint pinned in `hold`."""
    ckpt, record, stats = start.trained_run(source, "--from", hold=hold)
    if "architecture" in record:
        changes = identity.architecture_changes(record["architecture"], identity.architecture(cfg))
        if changes:
            raise RunError(detailed(f"--from {source!r}: checkpoint {ckpt} was trained with another model than "
                                    f"this config ({len(changes)} difference(s) below)", changes))
    return ckpt, record, stats


def _scoring_data(cfg, record: dict, data: List[str], keep: List[str]):
    """The [data] of scoring: `data` read in order by one reader per rank (no shuffle), the
    trained run's data policies, tasks without label columns in the files marked unlabelled;
    and the footers. Kept columns must exist and not clash with a prediction's name."""
    first = resolve_files(data)[0]
    schema = open_parquet(first).schema_arrow
    unlabelled = [t.name for t in cfg.data.tasks if t.column not in schema.names
                  or (t.weight and t.weight not in schema.names)]
    dcfg = dataclasses.replace(cfg.data, train=data, eval=[], shuffle=False, num_workers=min(cfg.data.num_workers, 1),
                               unlabelled=unlabelled, id_policy=record.get("data.id_policy", cfg.data.id_policy),
                               nonfinite=record.get("data.nonfinite", cfg.data.nonfinite))
    missing = [c for c in keep if c not in schema.names]
    if missing:
        raise DataError(f"{first}: --keep column(s) {', '.join(map(repr, missing))} not in the file "
                        f"(it has: {', '.join(schema.names)})")
    clash = sorted(set(keep) & {f"pred_{t}" for t in dcfg.task_names})
    if clash:
        raise RunError(f"--keep {', '.join(clash)}: the name of a prediction column")
    if unlabelled:
        log.info("scoring data without labels for task(s) %s", ", ".join(unlabelled))
    footers = read_footers(data, dcfg)
    if sum(footers.unit_rows) == 0:  # as training refuses an empty data.train: an empty output is no result
        raise DataError(f"--data {', '.join(data[:3])}{' ...' if len(data) > 3 else ''}: no rows to score "
                        f"({len(footers.files)} file(s), {len(footers.unit_rows)} row group(s)); nothing written")
    if "string_ids" in record:
        check_id_kinds(record["string_ids"], footers, sorted({f.column for f in dcfg.sparse}), "--data")
    return dcfg, footers


def _check_out(out: str, rank: int, main: bool) -> None:
    """`out` takes a file (every rank writes its part), and holds no earlier output (parts of a
    run on more ranks would otherwise stay beside the new ones)."""
    fs, root = split(out)
    try:
        if main:
            import pyarrow.fs as pafs
            old = [i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                   if i.base_name.startswith("part-") or i.base_name == SUMMARY]
            if old:
                raise RunError(f"--out {out} already holds scoring output ({len(old)} file(s), e.g. {old[0]}): "
                               f"use a new --out, or remove them")
        fs.create_dir(root, recursive=True)
        probe = f"{root}/.probe-{rank}"
        with fs.open_output_stream(probe) as f:
            f.write(b"0")
        fs.delete_file(probe)
    except (OSError, pa.ArrowException) as e:
        raise RunError(f"--out {out} is not writable: {e}") from e


def _predictions(pipeline, dmp, src: DataSource) -> np.ndarray:
    """This rank's predictions [rows, M], padding rows dropped (they come last)."""
    parts = [probs.float().cpu() for probs, *_ in scored(pipeline, dmp, src)]
    preds = torch.cat(parts).numpy() if parts else np.zeros((0, len(src.cfg.tasks)), np.float32)
    rows = src.rank_rows[src.rank]
    padding = src.steps_per_epoch - src.rank_batches[src.rank]
    if preds.shape[0] != rows + padding:
        raise RunError(f"rank {src.rank} scored {preds.shape[0] - padding} rows, expected {rows}")
    return preds[:rows]


def _with_kept(preds: np.ndarray, src: DataSource, keep: List[str], tasks: List[str]) -> pa.Table:
    """The kept columns of this rank's units, in its reading order, beside the predictions."""
    # one reader per rank (num_workers <= 1): reader g = rank reads its dealt units in order
    mine = [src.footers.units[u] for u in assign_units(len(src.footers.units), src.world_size, 1)[src.rank]]
    if keep:
        tables, handles = [], {}
        for path, rg in mine:
            if path not in handles:
                handles = {path: open_parquet(path)}
            tables.append(handles[path].read_row_group(rg, columns=keep))
        kept = pa.concat_tables(tables) if tables else pa.table({c: pa.array([]) for c in keep})
        if kept.num_rows != preds.shape[0]:
            raise RunError(f"rank {src.rank}: {kept.num_rows} kept rows for {preds.shape[0]} predictions")
        columns = {c: kept.column(c) for c in keep}
    else:
        columns = {}
    columns.update({f"pred_{t}": pa.array(preds[:, m]) for m, t in enumerate(tasks)})
    return pa.table(columns)


def _summary(src: DataSource, env, ckpt: str, step: int, out: str, seconds: float, score_s: float,
             columns: List[str]) -> Dict:
    counts = torch.tensor([src.rank_rows[src.rank], *src.counters.tolist()], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    if int(counts[0]) != src.rows:
        raise RunError(f"scored {int(counts[0])} rows of {src.rows}")
    from data.batch import COUNTERS
    return {"checkpoint": ckpt, "step": step, "out": out, "rows": src.rows,
            "rows_per_rank": src.rank_rows, "files": src.files, "world_size": env.world_size, "columns": columns,
            "unlabelled_tasks": src.cfg.unlabelled, "reader": dict(zip(COUNTERS, counts[1:].tolist())),
            "seconds": seconds, "scoring_seconds": score_s, "rows_per_s": src.rows / max(score_s, 1e-9)}

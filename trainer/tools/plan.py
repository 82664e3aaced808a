"""`mbrec plan`: the sharding plan and memory per GPU of a config on a simulated topology
(nodes x GPUs per node, HBM per GPU), on any machine: torchrec's planner with the trainer's
own planner settings (`trainer.build.plan_tables`), the model on the meta device.

Memory per rank, from the plan's shard sizes:
- tables: the rows and columns of each shard on the rank x the table precision;
- fused optimizer state: rowwise_adagrad one float per row, adagrad one per weight, adam two
  per weight, sgd none;
- dense: the replicated dense parameters x (weight + gradient + the dense optimizer's states);
- activations (an estimate): the pooled embeddings [B, F, D] three times (output, gradient,
  the all-to-all buffer) and every dense layer's output [B, width] twice (output, gradient),
  at the per-rank batch size, in fp32; and each sharded table's lookup output on the ranks that
  hold it, for the global batch (B x world, their columns; and its gradient) before it is
  exchanged: small table-wise on few GPUs, gigabytes row-wise on many.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torchrec.distributed.planner.types import PlannerError

from trainer.build import HBM_RESERVE, build_train_module, fuse_sparse_optimizer, plan_tables, usable_hbm
from trainer.errors import RunError

OPTIMIZER_FLOATS_PER_ROW = {"rowwise_adagrad": 1}  # per row; the others per weight:
OPTIMIZER_FLOATS_PER_WEIGHT = {"adagrad": 1, "adam": 2, "sgd": 0, "rowwise_adagrad": 0}
DENSE_STATES = {"adam": 2, "adagrad": 1, "sgd": 0}
GIB = 2**30


@dataclass
class PlanReport:
    world_size: int
    hbm_bytes: int
    tables: List[Dict]  # name, rows, dim, sharding_type, ranks
    per_rank: List[Dict[str, float]]  # bytes: tables, optimizer, dense, activations, total

    @property
    def largest(self) -> int:
        return max(range(self.world_size), key=lambda r: self.per_rank[r]["total"])

    @property
    def imbalance(self) -> float:
        """The largest rank's tables and optimizer state over the ranks' mean (1: even)."""
        held = [r["tables"] + r["optimizer"] for r in self.per_rank]
        return max(held) / (sum(held) / len(held)) if sum(held) else 1.0

    @property
    def idle(self) -> int:
        """Ranks holding no table shard."""
        return sum(1 for r in self.per_rank if r["tables"] == 0)


def simulate(cfg, nodes: int, gpus_per_node: int, hbm_gb: float) -> PlanReport:
    if nodes < 1 or gpus_per_node < 1 or not hbm_gb > 0:
        raise RunError(f"--nodes ({nodes}) and --gpus-per-node ({gpus_per_node}) must be >= 1 and --hbm-gb "
                       f"({hbm_gb:g}) > 0")
    world, hbm = nodes * gpus_per_node, usable_hbm(int(hbm_gb * 1e9))  # 80 GB = 80e9 bytes
    module = build_train_module(cfg.data, cfg.model, cfg.balancer, torch.device("meta"),
                                cfg.trainer.loss_normalization, cfg.trainer.precision)
    fuse_sparse_optimizer(module.model.ebc, cfg.optim)
    try:
        plan = plan_tables(module, module.model.ebc, cfg.trainer.sharding_types, "cuda", world, gpus_per_node,
                           cfg.data.batch_size, hbm)
    except PlannerError as e:
        raise RunError(f"the model does not fit on {nodes} x {gpus_per_node} GPUs of {hbm_gb:g} GB: "
                       f"{str(e).splitlines()[0]}") from e
    report = PlanReport(world, hbm, [], [dict.fromkeys(("tables", "optimizer", "dense", "activations"), 0.0)
                                         for _ in range(world)])
    _tables(report, plan.plan["model.ebc"], module.model.ebc, cfg)
    _dense_and_activations(report, module, cfg)
    for r in report.per_rank:
        r["total"] = r["tables"] + r["optimizer"] + r["dense"] + r["activations"]
    if report.per_rank[report.largest]["total"] > hbm:
        raise RunError(f"the model does not fit on {nodes} x {gpus_per_node} GPUs of {hbm_gb:g} GB: rank "
                       f"{report.largest} needs about {report.per_rank[report.largest]['total'] / GIB:.1f} GiB, "
                       f"{hbm / GIB:.1f} GiB usable (less {HBM_RESERVE / GIB:.0f} GiB for CUDA, NCCL and fbgemm)")
    return report


def _tables(report: PlanReport, shardings, ebc, cfg) -> None:
    elem = 2 if cfg.model.embedding_precision == "fp16" else 4
    row_floats = OPTIMIZER_FLOATS_PER_ROW.get(cfg.optim.sparse, 0)
    weight_floats = OPTIMIZER_FLOATS_PER_WEIGHT[cfg.optim.sparse]
    for t in ebc.embedding_bag_configs():
        ps = shardings[t.name]
        report.tables.append({"name": t.name, "rows": t.num_embeddings, "dim": t.embedding_dim,
                              "sharding_type": ps.sharding_type, "ranks": len(set(ps.ranks or []))})
        if ps.sharding_spec is None:  # data parallel: the whole table on every rank
            shards = [((t.num_embeddings, t.embedding_dim), r) for r in range(report.world_size)]
        else:
            shards = [(s.shard_sizes, s.placement.rank()) for s in ps.sharding_spec.shards]
        served = cfg.data.batch_size * (report.world_size if ps.sharding_spec is not None else 1)
        for (rows, cols), rank in shards:
            report.per_rank[rank]["tables"] += rows * cols * elem
            report.per_rank[rank]["optimizer"] += 4 * (rows * row_floats + rows * cols * weight_floats)
            report.per_rank[rank]["activations"] += 2 * 4 * served * cols


def _dense_and_activations(report: PlanReport, module, cfg) -> None:
    dense = sum(p.numel() for n, p in module.named_parameters() if not n.startswith("model.ebc"))
    dense_bytes = 4 * dense * (2 + DENSE_STATES[cfg.optim.dense])
    b, m = cfg.data.batch_size, cfg.model
    fd = sum((t.dim or m.embedding_dim) * len(t.features) for t in cfg.data.table_specs())  # pooled width
    widths = list(m.dense_arch) + [fd + m.dense_arch[-1]] * m.cross_layers + list(m.shared_arch)
    widths += list(m.head_arch) * len(cfg.data.tasks)
    act = 4 * b * (3 * fd + 2 * sum(widths))
    for r in report.per_rank:
        r["dense"], r["activations"] = float(dense_bytes), r["activations"] + float(act)


def format_report(report: PlanReport, nodes: int, gpus_per_node: int) -> str:
    lines = [f"plan: {nodes} node(s) x {gpus_per_node} GPU(s) = {report.world_size} ranks, "
             f"{report.hbm_bytes / GIB:.1f} GiB usable HBM each (less {HBM_RESERVE / GIB:.0f} GiB for CUDA, NCCL "
             f"and fbgemm)", f"tables and optimizer state: largest rank / mean = {report.imbalance:.2f}; "
             f"ranks without a table: {report.idle}", "", "table | rows | dim | sharding | ranks",
             "---|---|---|---|---"]
    lines += [f"{t['name']} | {t['rows']:,} | {t['dim']} | {t['sharding_type']} | {t['ranks']}" for t in report.tables]
    lines += ["", "GiB per rank | tables | fused optimizer | dense (+grad, states) | activations (est.) | total",
              "---|---|---|---|---|---"]
    shown = sorted(set(range(min(report.world_size, 8))) | {report.largest})
    for r in shown:
        v = report.per_rank[r]
        mark = " (largest)" if r == report.largest else ""
        lines.append(f"rank {r}{mark} | " + " | ".join(f"{v[k] / GIB:.2f}" for k in
                                                       ("tables", "optimizer", "dense", "activations", "total")))
    if report.world_size > len(shown):
        totals = sorted(v["total"] for v in report.per_rank)
        lines.append(f"... {report.world_size - len(shown)} more ranks; total GiB min {totals[0] / GIB:.2f}, "
                     f"median {totals[len(totals) // 2] / GIB:.2f}, max {totals[-1] / GIB:.2f}")
    return "\n".join(lines)

"""A serving artifact: the trained model unsharded onto one device, its embedding tables
quantized with TorchRec's inference quantization, as TorchScript, with a manifest.

    mbrec export RUN_DIR|CHECKPOINT --out DIR [--dtype int8|fp16|fp32]

DIR holds:
- `model.pt`: TorchScript (torchrec.fx trace, then `torch.jit.script`), loadable with
  `torch.jit.load` where torch and torchrec (for fbgemm's kernels) are installed, no mbrec.
  `model(dense, values, lengths) -> [B, M]`: `dense` [B, D] float32, the raw dense columns in
  the manifest's order (NaN for a null; a non-finite value is filled as a null is); `values`
  [L] int64, the table rows of every sparse feature's ids, feature-major in the manifest's
  order, already mapped into [0, rows) (see `hashing.py`); `lengths` [F * B] int32, ids per
  (feature, row), feature-major. Output: per task a probability (binary) or a value (regression).
  The dense transforms (clip, log1p, standardize, fill) are inside the model, with the run's
  fitted numbers.
- `manifest.json`: features (name, column, table, rows, id kind and mapping), dense columns
  with their transforms' numbers, tasks (name, kind, output), the checkpoint, step, the parent
  run's identity digest, the embedding dtype, the library versions.
- `hashing.py`: the id mapping the reader applies (a copy of data/hashing.py: numpy and
  pyarrow only), so a serving process maps ids exactly as training did.
"""
# No `from __future__ import annotations`: torchrec.fx keeps the annotations of Served.forward,
# which TorchScript must be able to read as types, not strings.
import dataclasses
import json
import logging
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data import hashing
from data.schema import DataConfig
from models.mtl import ModelConfig, MultiTaskDCN, build_ebc
from trainer import checkpoint, identity, start
from trainer.config import from_dict
from trainer.deadline import deadline
from trainer.errors import RunError

log = logging.getLogger(__name__)
DTYPES = {"int8": torch.qint8, "fp16": torch.half, "fp32": None}


class Served(nn.Module):
    """The scoring path of `MultiTaskDCN` (the balancer's fan-out is the identity at inference)
    with the dense transforms in front: raw dense [B, D], values [L], lengths [F * B] -> [B, M]."""

    def __init__(self, model: MultiTaskDCN, keys: List[str], stats: Dict, regression: List[bool]):
        super().__init__()
        self.model = model
        self.keys = keys
        clip = [c or [float("-inf"), float("inf")] for c in stats["clip"]]
        std = ["standardize" in k for k in stats["kinds"]]
        f32 = dict(dtype=torch.float32)
        self.register_buffer("lo", torch.tensor([c[0] for c in clip], **f32))  # [D]
        self.register_buffer("hi", torch.tensor([c[1] for c in clip], **f32))
        self.register_buffer("log", torch.tensor(["log1p" in k for k in stats["kinds"]], dtype=torch.bool))
        self.register_buffer("shift", torch.tensor([m if s else 0.0 for m, s in zip(stats["mean"], std)], **f32))
        self.register_buffer("scale", torch.tensor([1.0 / sd if s else 1.0 for sd, s in zip(stats["std"], std)], **f32))
        self.register_buffer("fill", torch.tensor(stats["fill"], **f32).reshape(1, -1))  # [1, D]
        self.register_buffer("regression", torch.tensor(regression, dtype=torch.bool))  # [M]
        self.num_tasks = len(regression)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # data.transforms, in its order: clip, signed log1p, standardize; nulls filled after
        x = torch.minimum(torch.maximum(dense, self.lo), self.hi)
        x = torch.where(self.log, torch.sign(x) * torch.log1p(torch.abs(x)), x)
        x = (x - self.shift) * self.scale
        x = torch.where(torch.isfinite(dense), x, self.fill.expand_as(x))  # [B, D]
        kjt = KeyedJaggedTensor.from_lengths_sync(self.keys, values, lengths)
        h = self.model.representation(x, kjt)  # [B, n']
        logits = self.model.task_logits(h.unsqueeze(0).expand(self.num_tasks, h.shape[0], h.shape[1]))  # [B, M]
        return torch.where(self.regression, logits, torch.sigmoid(logits))


def config_of(record: Dict) -> Dict:
    """The [data] and [model] sections of a run, rebuilt from its run.json."""
    out: Dict[str, Dict] = {"data": {}, "model": {}}
    names = {"data": {f.name for f in dataclasses.fields(DataConfig)},
             "model": {f.name for f in dataclasses.fields(ModelConfig)}}
    for key, value in record.items():
        section, _, name = key.partition(".")
        if section in out and name in names[section]:
            out[section][name] = value
    return out


def export(source: str, out: str, dtype: str = "int8") -> Dict:
    """Writes the artifact to `out`; returns its manifest."""
    if dtype not in DTYPES:
        raise RunError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    with ExitStack() as hold:  # the checkpoint pinned against its run's clean-up while it is read
        ckpt, record, stats = start.trained_run(source, "export", hold=hold)
        sections = config_of(record)
        dcfg, mcfg = from_dict(DataConfig, sections["data"]), from_dict(ModelConfig, sections["model"])
        model = MultiTaskDCN(build_ebc(dcfg.table_specs(), mcfg.embedding_dim, torch.device("cpu"),
                                       mcfg.embedding_precision), len(dcfg.dense), len(dcfg.tasks), mcfg,
                             torch.device("cpu"))
        _load(ckpt, model)
    served = Served(model, [f.name for f in dcfg.sparse], stats, [t.kind == "regression" for t in dcfg.tasks]).eval()
    scripted = _script(served, DTYPES[dtype])
    folder = _prepare_out(out)
    scripted.save(str(folder / "model.pt"))
    shutil.copy(hashing.__file__, folder / "hashing.py")
    manifest = _manifest(dcfg, stats, record, ckpt, dtype)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in folder.iterdir())
    log.info("exported %s (%s tables) to %s: %.1f MB in %.1f s", ckpt, dtype, out, size / 2**20, time.perf_counter() - t0)
    return {**manifest, "bytes": size}


def _load(ckpt: str, model: MultiTaskDCN) -> None:
    """The checkpoint's model tensors, whole, into `model` (DCP gathers the shards), checked to
    fit and to be finite; its files first checked against their digests."""
    with deadline("reading checkpoint", ckpt, checkpoint.STORAGE_TIMEOUT_S):
        _load_bounded(ckpt, model)


def _load_bounded(ckpt: str, model: MultiTaskDCN) -> None:
    state = {f"model.model.{k}": v for k, v in model.state_dict().items()}
    meta = checkpoint.read_metadata(ckpt)
    checkpoint.check_fits(ckpt, meta, state, ("model",), set(state))
    nested = {"model": {k[len("model."):]: v for k, v in state.items()}}
    try:
        dcp.load(nested, storage_reader=checkpoint.storage_reader(ckpt, warn=True), no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP's failures, named with the checkpoint
        raise checkpoint.load_failure(ckpt, e) from e
    checkpoint.check_finite(ckpt, nested)
    model.load_state_dict({k[len("model.model."):]: v for k, v in state.items()})


def _script(served: Served, dtype) -> torch.jit.ScriptModule:
    """Quantized tables (TorchRec's inference quantization), torchrec.fx trace, TorchScript."""
    import torchrec.fx
    from torchrec.inference.modules import quantize_embeddings
    if dtype is not None:
        served = quantize_embeddings(served, dtype=dtype, inplace=True)
    return torch.jit.script(torchrec.fx.symbolic_trace(served))


def _prepare_out(out: str) -> Path:
    folder = Path(out)
    if (folder / "model.pt").exists():
        raise RunError(f"--out {out} already holds an export (model.pt): use a new --out, or remove it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".probe").write_bytes(b"0")
        (folder / ".probe").unlink()
    except OSError as e:
        raise RunError(f"--out {out} is not writable: {e}") from e
    return folder


def _manifest(dcfg: DataConfig, stats: Dict, record: Dict, ckpt: str, dtype: str) -> Dict:
    import torchrec
    tables = {t.name: t for t in dcfg.table_specs()}
    features = []
    for f in dcfg.sparse:
        table = tables[f.table or f.name]
        features.append({"name": f.name, "column": f.column, "table": table.name, "rows": table.num_embeddings,
                         "pooling": table.pooling, "mapping": {
                             "string": "hashing.hash_strings(ids, rows) (mbrec-hash64)",
                             "integer": "as is in [0, rows); outside it hashing.hash_ids(ids, rows)"
                             if dcfg.id_policy == "hash" else "as is in [0, rows); outside it an error"}})
    return {"format": "mbrec-served/1", "model": "model.pt", "embedding_dtype": dtype,
            "inputs": {"dense": {"columns": list(dcfg.dense), "transforms": stats, "dtype": "float32 [B, D]"},
                       "values": "int64 [L]: table rows, feature-major in sparse order",
                       "lengths": "int32 [F * B]: ids per (feature, row), feature-major",
                       "sparse": features},
            "outputs": [{"task": t.name, "kind": t.kind, "output": "value" if t.kind == "regression" else "probability"}
                        for t in dcfg.tasks],
            "checkpoint": ckpt, "step": checkpoint.read_progress(ckpt)[0], "run_identity": identity.digest(record),
            "versions": {"torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", "unknown")}}

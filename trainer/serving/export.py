"""A serving artifact: the trained model unsharded onto one device, its embedding tables
quantized with TorchRec's inference quantization, as TorchScript, with a manifest; or, for a
model larger than a host, its dense part as TorchScript and its tables as row-range shards.

    mbrec export RUN_DIR|CHECKPOINT --out DIR [--dtype int8|fp16|fp32] [--layout single|sharded]

The checkpoint's tables are read one at a time (`Tables`): each is quantized into TorchRec's
inference tables (`write_single`) or written as shards (`write_sharded`) before the next is
read, so the float model is never in memory (but for `--dtype fp32 --layout single`, whose file
is the float model).

DIR holds (`--layout single`):
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

`--layout sharded`: `dense.pt`, `tables/<table>/*.npy`, `manifest.json` (with the tables'
shards), `hashing.py` and `load_sharded.py`, the reference loader (its docstring and
docs/serving.md give the format).
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
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data import hashing
from data.schema import DataConfig
from models.mtl import ModelConfig, MultiTaskDCN, build_ebc
from trainer import checkpoint, identity, start
from trainer.config import from_dict
from trainer.deadline import deadline
from trainer.errors import RunError

log = logging.getLogger(__name__)
DTYPES = ("int8", "fp16", "fp32")
QUANT_TYPES = {"int8": DataType.INT8, "fp16": DataType.FP16}
LAYOUTS = ("single", "sharded")
TABLE_PREFIX = "model.model.ebc.embedding_bags."  # a table's key in a checkpoint: PREFIX<table>.weight
TABLE_NAME_PREFIX = "t_"  # models.mtl.build_ebc's table names: t_<data table>
SHARD_BYTES = 256 * 2**20  # a sharded artifact's table shards hold at most this many bytes


class DenseTransforms(nn.Module):
    """data.transforms with the run's fitted numbers: raw dense [B, D] (NaN for a null) -> [B, D]."""

    def __init__(self, stats: Dict):
        super().__init__()
        clip = [c or [float("-inf"), float("inf")] for c in stats["clip"]]
        std = ["standardize" in k for k in stats["kinds"]]
        f32 = dict(dtype=torch.float32)
        self.register_buffer("lo", torch.tensor([c[0] for c in clip], **f32))  # [D]
        self.register_buffer("hi", torch.tensor([c[1] for c in clip], **f32))
        self.register_buffer("log", torch.tensor(["log1p" in k for k in stats["kinds"]], dtype=torch.bool))
        self.register_buffer("shift", torch.tensor([m if s else 0.0 for m, s in zip(stats["mean"], std)], **f32))
        self.register_buffer("scale", torch.tensor([1.0 / sd if s else 1.0 for sd, s in zip(stats["std"], std)], **f32))
        self.register_buffer("fill", torch.tensor(stats["fill"], **f32).reshape(1, -1))  # [1, D]

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        # data.transforms, in its order: clip, signed log1p, standardize; nulls filled after
        x = torch.minimum(torch.maximum(dense, self.lo), self.hi)
        x = torch.where(self.log, torch.sign(x) * torch.log1p(torch.abs(x)), x)
        x = (x - self.shift) * self.scale
        return torch.where(torch.isfinite(dense), x, self.fill.expand_as(x))  # [B, D]


class Served(nn.Module):
    """The scoring path of `MultiTaskDCN` (the balancer's fan-out is the identity at inference)
    with the dense transforms in front: raw dense [B, D], values [L], lengths [F * B] -> [B, M]."""

    def __init__(self, model: MultiTaskDCN, keys: List[str], stats: Dict, regression: List[bool]):
        super().__init__()
        self.model = model
        self.keys = keys
        self.transforms = DenseTransforms(stats)
        self.register_buffer("regression", torch.tensor(regression, dtype=torch.bool))  # [M]
        self.num_tasks = len(regression)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor.from_lengths_sync(self.keys, values, lengths)
        return self.outputs(self.model.representation(self.transforms(dense), kjt))

    def outputs(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, n'] -> per task a probability (binary) or a value (regression) [B, M]."""
        logits = self.model.task_logits(h.unsqueeze(0).expand(self.num_tasks, h.shape[0], h.shape[1]))  # [B, M]
        return torch.where(self.regression, logits, torch.sigmoid(logits))


class DenseServed(nn.Module):
    """A sharded artifact's dense part: raw dense [B, D] and the features' pooled embeddings
    [B, F * d] (in the manifest's `embedding_order`) -> [B, M]. Traced, it holds no table."""

    def __init__(self, served: Served):
        super().__init__()
        self.served = served

    def forward(self, dense: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.served.outputs(self.served.model.interaction(emb, self.served.transforms(dense)))


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


def export(source: str, out: str, dtype: str = "int8", layout: str = "single") -> Dict:
    """Writes the artifact to `out` (`layout`: "single", one TorchScript file; "sharded", the
    dense part as TorchScript and the tables as row-range shards); returns its manifest."""
    if dtype not in DTYPES:
        raise RunError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise RunError(f"--layout must be one of {list(LAYOUTS)}, got {layout!r}")
    t0 = time.perf_counter()
    with ExitStack() as hold:  # the checkpoint pinned against its run's clean-up while it is read
        ckpt, record, stats = start.trained_run(source, "export", hold=hold)
        sections = config_of(record)
        dcfg, mcfg = from_dict(DataConfig, sections["data"]), from_dict(ModelConfig, sections["model"])
        folder = _prepare_out(out)
        with deadline("reading checkpoint", ckpt, checkpoint.STORAGE_TIMEOUT_S):
            # the tables on meta: each is read (and quantized, or written) when its turn comes
            model = MultiTaskDCN(build_ebc(dcfg.table_specs(), mcfg.embedding_dim, torch.device("meta"),
                                           mcfg.embedding_precision), len(dcfg.dense), len(dcfg.tasks), mcfg,
                                 torch.device("cpu"))
            tables = Tables(ckpt, model)
            served = Served(model, [f.name for f in dcfg.sparse], stats, [t.kind == "regression" for t in dcfg.tasks])
            extra = (write_single if layout == "single" else write_sharded)(served.eval(), tables, dtype, folder)
    shutil.copy(hashing.__file__, folder / "hashing.py")
    manifest = {**_manifest(dcfg, stats, record, ckpt, dtype), **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    log.info("exported %s (%s tables, %s) to %s: %.1f MB in %.1f s", ckpt, dtype, layout, out, size / 2**20,
             time.perf_counter() - t0)
    return {**manifest, "bytes": size}


class Tables:
    """A checkpoint's model, read a part at a time (digest-checked, shapes checked against the
    model first, finite): the dense part at once, each table on its own when asked for."""

    def __init__(self, ckpt: str, model: MultiTaskDCN):
        self.ckpt = ckpt
        state = {f"model.model.{k}": v for k, v in model.state_dict().items()}
        checkpoint.check_fits(ckpt, checkpoint.read_metadata(ckpt), state, ("model",), set(state))
        self.configs = list(model.ebc.embedding_bag_configs())
        dense = {k: v for k, v in state.items() if not k.startswith(TABLE_PREFIX)}
        self._read(dense)
        model.load_state_dict({k[len("model.model."):]: v for k, v in dense.items()}, strict=False)

    def weight(self, name: str, dtype: torch.dtype, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Table `name` [rows, dim] (into `into`, else a new tensor of `dtype`)."""
        cfg = next(c for c in self.configs if c.name == name)
        t = into if into is not None else torch.empty(cfg.num_embeddings, cfg.embedding_dim, dtype=dtype)
        self._read({f"{TABLE_PREFIX}{name}.weight": t})
        return t

    def _read(self, flat: Dict[str, torch.Tensor]) -> None:
        try:
            dcp.load(flat, storage_reader=checkpoint.storage_reader(self.ckpt, warn=not hasattr(self, "_warned")),
                     no_dist=True)
        except (Exception, CheckpointException) as e:  # DCP's failures, named with the checkpoint
            raise checkpoint.load_failure(self.ckpt, e) from e
        self._warned = True
        checkpoint.check_finite(self.ckpt, flat)


def write_single(served: Served, tables: Tables, dtype: str, folder: Path) -> Dict:
    """model.pt: the whole model as TorchScript. fp32: the tables read into the model one by
    one; int8 / fp16: TorchRec's inference tables (QuantEBC) allocated once, and each table read,
    quantized (fbgemm's row-wise quantization, as TorchRec's `quantize_embeddings`) and copied
    into them before the next: the peak is the quantized model plus one float table."""
    import torchrec.fx
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    ebc = served.model.ebc
    if dtype == "fp32":
        ebc.to_empty(device=torch.device("cpu"))  # (no init: every table is read next)
        for name, bag in ebc.embedding_bags.items():
            tables.weight(name, bag.weight.dtype, into=bag.weight.data)
    else:
        configs = [dataclasses.replace(c, data_type=QUANT_TYPES[dtype]) for c in ebc.embedding_bag_configs()]
        quant = QuantEBC(configs, ebc.is_weighted(), torch.device("cpu"), output_dtype=torch.float,
                         quant_state_dict_split_scale_bias=True)
        state = quant.state_dict()  # views of its kernels' weights: codes, and int8's scale and bias
        for c in configs:
            _quantize_into(state, f"embedding_bags.{c.name}.", tables.weight(c.name, torch.float32), dtype)
        served.model.ebc = quant
    torch.jit.script(torchrec.fx.symbolic_trace(served)).save(str(folder / "model.pt"))
    return {"layout": "single", "model": "model.pt"}


def _quantize_into(state: Dict[str, torch.Tensor], prefix: str, weight: torch.Tensor, dtype: str) -> None:
    """One float table [rows, dim] into a QuantEBC's state (split scale and bias)."""
    dim = weight.shape[1]
    if dtype == "fp16":
        state[prefix + "weight"].copy_(weight.half().view(torch.uint8))
        return
    fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(weight, 8)  # [rows, dim + 4]
    state[prefix + "weight"].copy_(fused[:, :dim])
    state[prefix + "weight_qscale"].copy_(fused[:, dim:dim + 2].contiguous().view(torch.float16))
    state[prefix + "weight_qbias"].copy_(fused[:, dim + 2:].contiguous().view(torch.float16))


def write_sharded(served: Served, tables: Tables, dtype: str, folder: Path) -> Dict:
    """dense.pt (TorchScript of DenseServed) and each table, read one at a time, as row-range
    shards under tables/<table>/ (docs/serving.md has the format); the manifest's part."""
    import torchrec.fx
    torch.jit.script(torchrec.fx.symbolic_trace(DenseServed(served).eval())).save(str(folder / "dense.pt"))
    out = {}
    for c in tables.configs:
        name = c.name[len(TABLE_NAME_PREFIX):]
        out[name] = _write_table(folder / "tables" / name, tables.weight(c.name, torch.float32), dtype,
                                 c.pooling.name.lower())
    loader = Path(__file__).with_name("load_sharded.py")
    shutil.copy(loader, folder / loader.name)
    return {"format": "mbrec-served-sharded/1", "layout": "sharded", "dense_model": "dense.pt",
            "loader": loader.name, "embedding_order": list(served.model.emb_order), "tables": out}


def _write_table(where: Path, weight: torch.Tensor, dtype: str, pooling: str) -> Dict:
    """weight [rows, dim] float32 -> shards of at most SHARD_BYTES: int8 as `codes` uint8
    [n, dim] and `scale_bias` float16 [n, 2] (value = code * scale + bias: fbgemm's row-wise
    8-bit quantization, as the single file's); fp16 / fp32 as `values` [n, dim]."""
    where.mkdir(parents=True)
    rows, dim = weight.shape
    per = max(1, SHARD_BYTES // (dim * {"int8": 1, "fp16": 2, "fp32": 4}[dtype]))
    shards = []
    for begin in range(0, rows, per):
        part, stem = weight[begin:begin + per].contiguous(), f"{begin:012d}-{min(rows, begin + per):012d}"
        if dtype == "int8":
            fused = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(part, 8)  # [n, dim + 4] uint8
            arrays = {"codes": fused[:, :dim], "scale_bias": fused[:, dim:].contiguous().view(torch.float16)}
        else:
            arrays = {"values": part.half() if dtype == "fp16" else part}
        files = {}
        for kind, array in arrays.items():
            files[kind] = f"tables/{where.name}/{stem}.{kind}.npy"
            np.save(where / f"{stem}.{kind}.npy", array.contiguous().numpy())
        shards.append({"rows": [begin, min(rows, begin + per)], "files": files})
    return {"rows": rows, "dim": dim, "dtype": dtype, "pooling": pooling, "shards": shards}


def _prepare_out(out: str) -> Path:
    folder = Path(out)
    if (folder / "manifest.json").exists() or (folder / "model.pt").exists():
        raise RunError(f"--out {out} already holds an export: use a new --out, or remove it")
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
    return {"format": "mbrec-served/1", "embedding_dtype": dtype,
            "inputs": {"dense": {"columns": list(dcfg.dense), "transforms": stats, "dtype": "float32 [B, D]"},
                       "values": "int64 [L]: table rows, feature-major in sparse order",
                       "lengths": "int32 [F * B]: ids per (feature, row), feature-major",
                       "sparse": features},
            "outputs": [{"task": t.name, "kind": t.kind, "output": "value" if t.kind == "regression" else "probability"}
                        for t in dcfg.tasks],
            "checkpoint": ckpt, "step": checkpoint.read_progress(ckpt)[0], "run_identity": identity.digest(record),
            "versions": {"torch": torch.__version__, "torchrec": getattr(torchrec, "__version__", "unknown")}}

"""The reference loader of a sharded artifact (`mbrec export --layout sharded`), copied into
it: numpy and torch only (no torchrec, no mbrec). It memory-maps the table shards (a table
need not fit in memory: only the rows a batch looks up are read), pools each feature's rows
as the trained EmbeddingBagCollection did, and runs the dense part (`dense.pt`).

    import sys; sys.path.insert(0, ARTIFACT)
    from load_sharded import ShardedModel
    model = ShardedModel(ARTIFACT)
    scores = model(dense, values, lengths)  # the inputs model.pt takes: see manifest.json

The format (manifest.json, "format": "mbrec-served-sharded/1"): `tables[name]` has `rows`,
`dim`, `dtype` (int8 | fp16 | fp32), `pooling` (sum | mean) and `shards`, each with its row
range [begin, end) and its files (.npy): int8 `codes` uint8 [n, dim] and `scale_bias` float16
[n, 2], a row's values being code * scale + bias; fp16 / fp32 `values` [n, dim].
`embedding_order` is the order of the features' pooled embeddings in dense.pt's input.
"""
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch


class Table:
    """One table's shards, memory-mapped."""

    def __init__(self, folder: Path, spec: Dict):
        self.dim, self.dtype, self.pooling = spec["dim"], spec["dtype"], spec["pooling"]
        self.begins = np.array([s["rows"][0] for s in spec["shards"]], dtype=np.int64)
        self.shards = [{k: np.load(folder / f, mmap_mode="r") for k, f in s["files"].items()} for s in spec["shards"]]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """ids [L] int64 (table rows) -> their values [L, dim] float32."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        which = np.searchsorted(self.begins, ids, side="right") - 1
        for k in np.unique(which):
            sel = which == k
            local = ids[sel] - self.begins[k]
            shard = self.shards[k]
            if self.dtype == "int8":
                sb = shard["scale_bias"][local].astype(np.float32)  # [n, 2]
                out[sel] = shard["codes"][local].astype(np.float32) * sb[:, :1] + sb[:, 1:]
            else:
                out[sel] = shard["values"][local].astype(np.float32)
        return out

    def pooled(self, ids: np.ndarray, lengths: torch.Tensor) -> torch.Tensor:
        """ids [L] of B bags of `lengths` [B] ids each -> [B, dim] (sum, or mean; 0 for an empty bag)."""
        bags = torch.repeat_interleave(torch.arange(len(lengths)), lengths.long())
        out = torch.zeros(len(lengths), self.dim).index_add_(0, bags, torch.from_numpy(self.rows(ids)))
        if self.pooling == "mean":
            out /= lengths.clamp(min=1).unsqueeze(1).float()
        return out


class ShardedModel:
    """model(dense [B, D] float32, values [L] int64, lengths [F * B] int32) -> [B, M], as the
    single-file artifact's model.pt."""

    def __init__(self, artifact: str):
        folder = Path(artifact)
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.dense = torch.jit.load(str(folder / self.manifest["dense_model"]))
        self.tables = {name: Table(folder, spec) for name, spec in self.manifest["tables"].items()}
        self.features: List[Dict] = self.manifest["inputs"]["sparse"]

    def __call__(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        per_feature = lengths.reshape(len(self.features), -1)  # [F, B], feature-major
        ids, pooled, at = values.numpy(), {}, 0
        for f, n in zip(self.features, per_feature):
            count = int(n.sum())
            pooled[f["name"]] = self.tables[f["table"]].pooled(ids[at:at + count], n)
            at += count
        emb = torch.cat([pooled[name] for name in self.manifest["embedding_order"]], dim=1)  # [B, F * d]
        return self.dense(dense, emb)

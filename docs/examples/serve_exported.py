"""Scoring with an artifact of `mbrec export`, without mbrec: torch, torchrec (fbgemm's kernels;
a sharded artifact needs none), numpy and pyarrow only.

    python docs/examples/serve_exported.py ARTIFACT_DIR rows.parquet [--out preds.npy]

`score(artifact, table)` is what a Python server would call per request batch: it turns a
table of raw rows (the manifest's columns) into the model's three inputs, as mbrec's reader
does, and returns [rows, tasks] probabilities (or values for regression tasks).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torchrec  # noqa: F401  (registers fbgemm's operators, which the TorchScript model calls)


def load(artifact: str):
    """(model, manifest, the artifact's id mapping): a single file's model.pt, or a sharded
    artifact's reference loader (its load_sharded.py), which take the same inputs."""
    folder = Path(artifact)
    sys.path.insert(0, str(folder))  # the artifact's hashing.py: ids mapped as in training
    import hashing
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("layout") == "sharded":
        from load_sharded import ShardedModel
        return ShardedModel(str(folder)), manifest, hashing
    return torch.jit.load(str(folder / manifest["model"])), manifest, hashing


def _ids(col: pa.ChunkedArray, rows: int, mapping: str, hashing):
    """One sparse column -> (lengths [R] int32, table rows [L] int64)."""
    arr = col.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = arr.value_lengths().fill_null(0).to_numpy().astype(np.int32)
        flat = arr.flatten()
    else:
        lengths = arr.is_valid().to_numpy(zero_copy_only=False).astype(np.int32)
        flat = arr.drop_null()
    if pa.types.is_dictionary(flat.type):
        flat = flat.dictionary_decode()
    if pa.types.is_string(flat.type) or pa.types.is_binary(flat.type) or pa.types.is_large_string(flat.type):
        return lengths, hashing.hash_strings(flat, rows)
    ids = flat.to_numpy(zero_copy_only=False).astype(np.int64)
    out = (ids < 0) | (ids >= rows)
    if out.any():
        if "hash_ids" not in mapping:
            raise ValueError(f"id {ids[out][0]} outside [0, {rows})")
        ids = ids.copy()
        ids[out] = hashing.hash_ids(ids[out], rows)
    return lengths, ids


def score(model, manifest: dict, hashing, table: pa.Table) -> np.ndarray:
    inputs = manifest["inputs"]
    dense = np.stack([pc.cast(table.column(c), pa.float32()).to_numpy(zero_copy_only=False)
                      for c in inputs["dense"]["columns"]], 1).astype(np.float32)  # [R, D], NaN for nulls
    lengths, values = [], []
    for f in inputs["sparse"]:  # feature-major
        n, v = _ids(table.column(f["column"]), f["rows"], f["mapping"]["integer"], hashing)
        lengths.append(n)
        values.append(v)
    with torch.no_grad():
        out = model(torch.from_numpy(dense), torch.from_numpy(np.concatenate(values)),
                    torch.from_numpy(np.concatenate(lengths)))
    return out.numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("rows")
    p.add_argument("--out", default="")
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args()
    model, manifest, hashing = load(args.artifact)
    table = pq.read_table(args.rows)
    t0 = time.perf_counter()
    preds = np.concatenate([score(model, manifest, hashing, table.slice(i, args.batch))
                            for i in range(0, table.num_rows, args.batch)])
    seconds = time.perf_counter() - t0
    if args.out:
        np.save(args.out, preds)
    mbrec = sorted({m.split(".")[0] for m in sys.modules} & {"trainer", "data", "models", "balancing", "launch"})
    print(json.dumps({"rows": int(preds.shape[0]), "rows_per_s": preds.shape[0] / seconds,
                      "tasks": [o["task"] for o in manifest["outputs"]], "mbrec_modules_loaded": mbrec}))


if __name__ == "__main__":
    main()

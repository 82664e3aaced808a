import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.storage import resolve_files


def test_synthetic_dataset_structure(tiny_synth):
    files = resolve_files([f"{tiny_synth.out_dir}/train"])
    assert len(files) == 2 and pq.ParquetFile(files[0]).num_row_groups == 4
    t = pq.read_table(files[0])
    click = t["ctr"].to_numpy().astype(bool)
    # CVR is labelled exactly on clicked rows; conversions only happen after clicks
    assert (t["cvr"].is_valid().to_numpy(zero_copy_only=False) == click).all()
    assert (t["conv"].to_numpy()[~click] == 0).all()
    np.testing.assert_allclose(t["p_conv"].to_numpy(), t["p_ctr"].to_numpy() * t["p_cvr"].to_numpy(), rtol=1e-5)
    assert t["d0"].null_count > 0 and t["d7"].null_count == 0
    hist = t.schema.field("user_history").type
    assert pa.types.is_list(hist) and hist.value_type == pa.int64()
    # power law: the most frequent user id is far more frequent than the median one
    counts = np.bincount(t["user_id"].to_numpy())
    assert counts.max() > 20 * np.median(counts[counts > 0])
    # the labels follow the stored probabilities
    assert abs(click.mean() - t["p_ctr"].to_numpy().mean()) < 0.02

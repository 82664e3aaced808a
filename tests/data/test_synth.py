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


def test_feeds_scenario(tmp_path):
    """Six tasks on every row, base rates from 0.1 % to 30 % as specified, labels that follow the
    stored truth, history ids drawn from the item table, tasks driven by shared factors."""
    from data.scenarios import feeds
    from data.synth import SynthConfig, data_section, write_dataset
    cfg = SynthConfig(out_dir=str(tmp_path), scenario="feeds", train_files=1, eval_files=1,
                      rows_per_file=100_000, row_group_size=50_000, cardinality=4_000, seed=1)
    write_dataset(cfg)
    section = data_section(cfg)
    tasks = [t["name"] for t in section["tasks"]]
    assert tasks == [t[0] for t in feeds.TASKS] and len(tasks) >= 6
    t = pq.read_table(resolve_files(section["train"])[0])
    sizes = {s["name"]: s["num_embeddings"] for s in section["sparse"]}
    assert pc_max(t["user_history"].combine_chunks().flatten()) < sizes["item_id"] == sizes["user_history"]
    logits = []
    for name, rate, *_ in feeds.TASKS:
        y, p = t[name].to_numpy(), t[f"p_{name}"].to_numpy().astype(np.float64)
        assert t[name].null_count == 0
        assert abs(p.mean() - rate) < 0.1 * rate + 2e-4, name  # the biases were solved on another sample
        assert abs(y.mean() - p.mean()) < 4 * np.sqrt(rate / len(y)) + 1e-4, name
        logits.append(np.log(p / (1 - p)))
    corr = np.corrcoef(np.array(logits))
    assert corr[np.triu_indices(len(tasks), 1)].min() > 0.3  # shared knowledge: every pair related
    assert corr[np.triu_indices(len(tasks), 1)].max() < 0.9  # ... and each task its own


def test_unknown_scenario_is_a_config_error():
    import pytest
    from data.synth import SynthConfig
    with pytest.raises(ValueError, match="synth.scenario"):
        SynthConfig(scenario="video")


def pc_max(arr):
    import pyarrow.compute as pc
    return pc.max(arr).as_py()

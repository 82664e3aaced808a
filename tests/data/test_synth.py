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


def test_funnel_feeds_scenario():
    """The funnel: deep actions only on long-viewed or clicked impressions; labels correlated
    given the row (the engagement factor), base rates and stored marginals as specified."""
    from data.scenarios import feeds, feeds_funnel as f
    from data.synth import SynthConfig, table_sizes
    cfg = SynthConfig(scenario="feeds_funnel", cardinality=4_000, seed=1)
    lat = f.latents(cfg, table_sizes(cfg))
    t = f.generate_rows(cfg, 100_000, np.random.default_rng(3), lat)
    y = np.stack([t[n].to_numpy() for n in f.TASK_NAMES], 1).astype(bool)  # [n, T]
    p = np.stack([t[f"p_{n}"].to_numpy() for n in f.TASK_NAMES], 1).astype(np.float64)
    for j, (name, rate, *_) in enumerate(feeds.TASKS):
        assert abs(p[:, j].mean() - rate) < 0.1 * rate + 2e-4, name
        assert abs(y[:, j].mean() - p[:, j].mean()) < 4 * np.sqrt(rate / len(y)) + 1e-4, name
    engaged = y[:, f.FIRST].any(axis=1)
    assert not y[~engaged][:, f.DEEP].any()  # the funnel
    # given the row, labels move together: the residuals' correlation (zero if independent)
    r = (y - p) / np.sqrt(p * (1 - p))
    corr = np.corrcoef(r.T)
    lv, click, like = (f.TASK_NAMES.index(n) for n in ("long_view", "click", "like"))
    assert corr[lv, click] > 0.05 and corr[lv, like] > 0.1, corr  # (independent labels: |corr| < 0.02)
    # the stored truth is the marginal given the row: a model of it is calibrated in deciles
    order = np.argsort(p[:, like])
    for chunk in np.array_split(order, 5):
        assert abs(y[chunk, like].mean() - p[chunk, like].mean()) < 4 * np.sqrt(p[chunk, like].mean() / len(chunk))


def test_unknown_scenario_is_a_config_error():
    import pytest
    from data.synth import SynthConfig
    with pytest.raises(ValueError, match="synth.scenario"):
        SynthConfig(scenario="video")


def pc_max(arr):
    import pyarrow.compute as pc
    return pc.max(arr).as_py()

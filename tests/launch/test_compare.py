import json

import pytest

from launch.compare import ALL_METHODS, gains_by_seed, plan, variants, write_compare_report

TASKS = ["ctr", "cvr"]


def test_variants_cover_methods_ablation_sweep_and_single_task():
    names = [v.name for v in variants(ALL_METHODS, [0.5, 2.0], TASKS, True)]
    assert "multibalance_noema" in names and "multibalance_beta0.5" in names and "single_cvr" in names
    assert len(names) == len(ALL_METHODS) + 2 + 2
    noema = next(v for v in variants(["multibalance_noema"], [], TASKS, False))
    assert "balancer.multibalance.ema=false" in noema.overrides


def test_every_variant_is_a_valid_config():
    """Each ablation and each beta / step-rule variant loads (e.g. magnitude rescaling is only
    valid in the exact form) and sets what its name says."""
    from launch.config import load_config
    vs = variants(ALL_METHODS, [0.5, 5.0], TASKS, False, ("paper", "capped"))
    names = [v.name for v in vs]
    assert {"multibalance_beta5", "multibalance_capped_beta5", "multibalance_capped_beta0.5"} <= set(names)
    cfgs = {v.name: load_config("launch/configs/demo.toml", v.overrides) for v in vs}
    mb = {n: c.balancer.multibalance for n, c in cfgs.items() if c.balancer.method == "multibalance"}
    assert (mb["multibalance_magnitude"].rescale, mb["multibalance_magnitude"].deferred) == ("magnitude", False)
    default, paper = mb["multibalance"], mb["multibalance_paper"]
    assert (default.rescale, default.step, default.gram_ema, default.deferred) == ("paper", "capped", 0.05, True)
    assert (paper.step, paper.gram_ema) == ("paper", 0.0) and mb["multibalance_capped"].gram_ema == 0.0
    assert mb["multibalance_capped_beta5"].step == "capped" and mb["multibalance_capped_beta5"].beta == 5.0
    assert mb["multibalance_beta5"].gram_ema == 0.0  # Table 4: the paper's form at each beta
    assert mb["multibalance_beta5"].step == "paper" and not mb["multibalance_exact"].deferred


def test_plan_is_seed_major_with_distinct_output_dirs(tmp_path):
    entries = plan("launch/configs/demo.toml", [], ["equal", "multibalance"], [2.0], 2, True, tmp_path)
    dirs = [next(o for o in e[2] if o.startswith("trainer.out_dir=")) for e in entries]
    assert len(set(dirs)) == len(entries) == 2 * (2 + 1 + 3)
    assert [e[1] for e in entries[:6]] == [0] * 6


def fake_run(out, name, seed, ne, qps):
    d = out / name / f"seed{seed}"
    d.mkdir(parents=True)
    tasks = [{"name": t, "column": t} for t in TASKS]
    (d / "summary.json").write_text(json.dumps({
        "method": name, "steps": 10, "world_size": 2, "tasks": tasks, "eval_files": [],
        "eval": {t: {"ne": v, "auc": 0.7} for t, v in zip(TASKS, ne)}, "train_rows_per_s": qps,
        "final_weights": [0.5, 0.5], "train_reader": {}}))
    return d


def test_report_gains_are_per_seed_against_equal(tmp_path):
    fake_run(tmp_path, "equal", 0, [0.80, 0.90], 100.0)
    fake_run(tmp_path, "equal", 1, [0.82, 0.92], 100.0)
    fake_run(tmp_path, "multibalance", 0, [0.80, 0.891], 98.0)
    fake_run(tmp_path, "multibalance", 1, [0.82, 0.9108], 96.0)
    fake_run(tmp_path, "single_ctr", 0, [0.79, 0.0], 50.0)
    fake_run(tmp_path, "single_cvr", 0, [0.0, 0.95], 50.0)
    runs = {"equal": [], "multibalance": []}
    for name in runs:
        for s in (0, 1):
            r = json.loads((tmp_path / name / f"seed{s}" / "summary.json").read_text())
            r["seed"] = s
            runs[name].append(r)
    g = gains_by_seed(runs, "multibalance", TASKS)
    assert g["cvr"] == pytest.approx([1.0, 1.0])
    assert g["ctr"] == pytest.approx([0.0, 0.0])
    assert g["average"] == pytest.approx([0.5, 0.5])
    text = write_compare_report(tmp_path)
    assert "**+0.500 ± 0.000**" in text  # best average gain, beyond its interval: in bold
    assert "**+0.000" not in text  # ctr: the best (the only) method, but no gain beyond the noise: not bold
    assert "0.970 ± 0.127" in text  # QPS ratios 0.98 and 0.96, paired by seed: t(1) = 12.706 x 0.01414 / sqrt(2)
    assert "drop" not in text
    assert "mean ± 95 % interval" in text and "mean ± seed std" in text  # every ± says what it is
    assert "Seed-to-seed std of MultiBalance" in text
    assert "| ctr | 0.81000 ± 0.01414 | 0.79000 ± 0.00000 |" in text  # joint vs single-task
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 6 * 2


def test_intervals_detectable_effect_and_transfer_verdicts():
    from launch.compare import _transfer_verdict, interval
    m, h, mde = interval([0.1, 0.3, 0.2])  # sd 0.1, n 3: t = 4.303
    assert m == pytest.approx(0.2) and h == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    assert mde == pytest.approx((4.303 + 1.061) * 0.1 / 3 ** 0.5, rel=1e-3)
    assert _transfer_verdict([-1.0, -1.2, -0.9]) == "yes"  # the joint model is worse, beyond noise
    assert _transfer_verdict([-0.1, 0.2, 0.05]) == "within noise"
    assert _transfer_verdict([0.5, 0.6, 0.4]) == "no"
    assert _transfer_verdict([-1.0]) == "undecided (1 seed)"


def test_report_flags_weights_that_never_moved_and_says_what_ran(tmp_path):
    fake_run(tmp_path, "equal", 0, [0.80, 0.90], 100.0)
    fake_run(tmp_path, "moco", 0, [0.80, 0.90], 100.0)  # final weights [0.5, 0.5]: never left uniform
    text = write_compare_report(tmp_path)
    assert "moco (weights never left uniform: the equal-weights model)" in text
    # uniform weights but another model (gradient surgery: GradDrop, PCGrad) is not flagged
    fake_run(tmp_path, "graddrop", 0, [0.81, 0.90], 100.0)
    assert "graddrop (weights never" not in write_compare_report(tmp_path)
    assert "What ran: 2 variants x 1 seed(s), 10 training steps per run, 2 rank(s)" in text
    assert "## AUC" in text and "indicative" in text
    assert "MultiBalance" not in text.split("## MultiBalance by beta")[0]  # no MultiBalance line: it did not run


def test_compare_writes_no_dataset_for_a_config_without_synth(tmp_path):
    from launch.cli import _has_section
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ntrain = ["x"]\n')
    assert not _has_section(str(cfg), "synth") and _has_section("launch/configs/demo.toml", "synth")


def test_beta_table_reads_each_runs_settings_and_reversals(tmp_path):
    """Table 4: rows by beta, columns by step rule, from run.json (not from variant names), with
    the mean logged reversal share; other MultiBalance forms (exact, no EMA) are not in it."""
    mb = "balancer.multibalance"
    settings = {"multibalance": (1.0, "paper", True), "multibalance_capped_beta5": (5.0, "capped", True),
                "multibalance_beta5": (5.0, "paper", True), "multibalance_exact": (1.0, "paper", False),
                "multibalance_tracked": (1.0, "capped", True)}
    fake_run(tmp_path, "equal", 0, [0.80, 0.90], 100.0)
    fake_run(tmp_path, "equal", 1, [0.80, 0.90], 100.0)
    for i, (name, (beta, step, deferred)) in enumerate(settings.items()):
        for seed in (0, 1):
            d = fake_run(tmp_path, name, seed, [0.80 - 0.001 * i, 0.90], 100.0)
            (d / "run.json").write_text(json.dumps({
                "balancer.method": "multibalance", f"{mb}.beta": beta, f"{mb}.step": step, f"{mb}.ema": True,
                f"{mb}.deferred": deferred, f"{mb}.rescale": "paper",
                f"{mb}.gram_ema": 0.05 if name == "multibalance_tracked" else 0.0}))
            rev = 0.9 if name == "multibalance_beta5" else 0.1
            (d / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "lambda_reversal/ctr": rev,
                                                                  "lambda_reversal/cvr": rev}) + "\n" for s in (20, 40)))
    text = write_compare_report(tmp_path)
    assert "| 1 | +0.000 ± 0.000 (0.10) | - |" in text
    assert "| 5 | +0.125 ± 0.000 (0.90) | +0.063 ± 0.000 (0.10) |" in text
    assert text.count("| 1 |") == 1  # the exact form is not a Table 4 row, nor the tracked Gram's


def test_demo_prints_its_single_seed_gain_with_the_calibrated_noise(tmp_path):
    from launch.demo import PAIRED_SD, T95, noise_line
    fake_run(tmp_path, "equal", 0, [0.80, 0.90], 100.0)
    fake_run(tmp_path, "multibalance", 0, [0.796, 0.90], 100.0)  # ctr +0.5 %, cvr 0: average +0.25 %
    line = noise_line([tmp_path / "equal" / "seed0", tmp_path / "multibalance" / "seed0"])
    assert "+0.250 % from ONE seed" in line and f"+-{T95 * PAIRED_SD:.2f} %" in line and "--seeds 8" in line


def test_a_rerun_into_the_same_out_reuses_only_runs_of_the_same_settings(tmp_path):
    from launch.compare import SETTINGS, _check_same_settings, _settings
    from launch.config import RunConfig
    from trainer.errors import RunError
    a, b = RunConfig(), RunConfig()
    b.trainer.max_steps = 7  # another --steps
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(RunError, match="whose settings are unknown"):
        _check_same_settings(tmp_path, a)
    (tmp_path / SETTINGS).write_text(json.dumps({"settings": _settings(a)}))
    _check_same_settings(tmp_path, a)
    with pytest.raises(RunError, match="of other settings .*use a new --out"):
        _check_same_settings(tmp_path, b)


def test_a_seed_varies_the_data_order_where_shuffling_is_on(tmp_path):
    off = plan("launch/configs/demo.toml", [], ["equal"], [], 2, False, tmp_path)
    on = plan("launch/configs/demo.toml", ["data.shuffle=true"], ["equal"], [], 2, False, tmp_path)
    assert not any(o.startswith("data.shuffle_seed") for e in off for o in e[2])
    assert [next(o for o in e[2] if o.startswith("data.shuffle_seed")) for e in on] == [
        "data.shuffle_seed=0", "data.shuffle_seed=1"]


def test_dynamics_table_splits_rare_and_frequent_tasks(tmp_path):
    from launch.compare import dynamics_table, _load
    mb = "balancer.multibalance"
    for seed in (0, 1):
        e = fake_run(tmp_path, "equal", seed, [0.80, 0.90], 100.0)
        summary = json.loads((e / "summary.json").read_text())
        summary["head_bias"] = {"init": "base_rate", "base_rates": [0.2, 0.005]}  # cvr is rare
        (e / "summary.json").write_text(json.dumps(summary))
        d = fake_run(tmp_path, "multibalance_tracked", seed, [0.808, 0.891], 100.0)  # ctr -1 %, cvr +1 %
        (d / "run.json").write_text(json.dumps({"balancer.method": "multibalance", f"{mb}.gram_ema": 0.05}))
        (d / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 20, "lambda_reversal/ctr": 0.2,
                                                     "grad_cosine/ctr": 0.3, "grad_cosine/cvr": 0.1}) + "\n")
    table = dynamics_table(_load(tmp_path), TASKS)
    assert "| multibalance_tracked | 0.20 | +0.200 | 0.50 0.50 | +1.000 ± 0.000 | -1.000 ± 0.000 |" in table, table
    assert "rare (< 1 %: cvr)" in table


def test_a_best_inside_the_noise_is_not_bold(tmp_path):
    for seed, (eq, mb) in enumerate(((0.90, 0.899), (0.90, 0.903), (0.90, 0.898))):
        fake_run(tmp_path, "equal", seed, [0.8, eq], 100.0)
        fake_run(tmp_path, "multibalance", seed, [0.8, mb], 100.0)
    text = write_compare_report(tmp_path)
    assert "**" not in text.split("## NE gain vs equal weights")[1].split("##")[0]

"""`mbrec validate`: every row group decoded as training decodes it, every error listed."""
from tests.trainer.test_checks import _dataset


def test_validate_reports_every_bad_row_group(tmp_path):
    from data.footers import read_footers
    from data.reader import fit_transforms
    from data.validate import problems, scan
    d0 = [0.5] * 200
    d0[10] = float("inf")  # row group 0
    labels = [0] * 200
    labels[120] = 7  # row group 2
    cfg = _dataset(tmp_path, d0, labels)
    result = scan(cfg, cfg.train, workers=2, transforms=fit_transforms(read_footers(cfg.train, cfg), cfg))
    assert result["row_groups"] == 4 and len(result["errors"]) == 2
    assert "row group 0" in result["errors"][0] and "'d0'" in result["errors"][0]
    assert "has value 7 (row 20 of row group 2)" in result["errors"][1]
    assert result["tasks"]["y"] == {"labelled": 100, "positive": 0}  # the two good row groups
    assert problems(result) == ["task 'y': every label is 0 (100 rows)"]


def test_validate_cli_exits_2_and_lists_the_errors(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    labels = [0, 1] * 100
    labels[5], labels[160] = 2, 9  # row groups 0 and 3
    _dataset(tmp_path, [0.5] * 200, labels)
    cfg = tmp_path / "v.toml"
    cfg.write_text(f'[data]\ntrain = ["{tmp_path}"]\neval = ["{tmp_path}"]\ndense = ["d0"]\n'
                   f'sparse = [{{name = "id", num_embeddings = 7}}]\ntasks = [{{name = "y"}}]\n')
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "validate", str(cfg), "--workers", "2"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 4  # 2 bad row groups, in each split (the same files)
    assert "has value 2 (row 5 of row group 0)" in errors[0] and "has value 9 (row 10 of row group 3)" in errors[1]
    assert "4 bad row group(s)" in proc.stdout

"""`mbrec validate`: every row group decoded as training decodes it, every error listed."""
from tests.trainer.test_checks import _dataset


def test_validate_reports_every_bad_row_group(tmp_path):
    from data.validate import problems, scan
    d0 = [0.5] * 200
    d0[10] = float("inf")  # row group 0
    labels = [0] * 200
    labels[120] = 7  # row group 2
    cfg = _dataset(tmp_path, d0, labels)
    result = scan(cfg, cfg.train, workers=2)
    assert result["row_groups"] == 4 and len(result["errors"]) == 2
    assert "row group 0" in result["errors"][0] and "'d0'" in result["errors"][0]
    assert "has value 7 (row 20 of row group 2)" in result["errors"][1]
    assert result["tasks"]["y"] == {"labelled": 100, "positive": 0}  # the two good row groups
    assert problems(result) == ["task 'y': every label is 0 (100 rows)"]

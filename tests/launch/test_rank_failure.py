"""A rank that fails on its own (here a data error) leaves its first error line for the others: a
rank whose collective then fails names that rank and its error, not gloo's words (2 gloo ranks)."""
import datetime
import logging
import os

import torch.distributed as dist

from data.errors import DataError
from tests.dist_utils import run_ranks


def _rank(logs: str):
    from launch.cli import run_rank
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("mbrec").addHandler(handler)

    def work():
        if dist.get_rank() == 1:
            raise DataError("part-7.parquet: row group 3: column 'u' has a null id inside a list")
        dist.barrier()  # waits for rank 1, which has gone

    try:
        return run_rank(work, __import__("pathlib").Path(logs), 60.0), lines
    except DataError as e:
        dist.destroy_process_group()  # what its exit does: the peer's collective fails
        return "raised", [str(e)]


def test_the_other_rank_names_the_failed_rank_and_its_error(tmp_path):
    (r0, lines0), (r1, _) = run_ranks(_rank, (str(tmp_path),))
    assert r1 == "raised" and r0 == 3
    assert (tmp_path / "failed-rank1.txt").read_text().startswith("part-7.parquet: row group 3")
    assert len(lines0) == 1 and lines0[0].startswith("rank 1 failed: see its first error"), lines0
    assert "part-7.parquet: row group 3: column 'u'" in lines0[0] and f"{os.sep}rank1.log" in lines0[0]


def test_a_peers_note_left_before_this_rank_started_is_found_and_an_own_old_one_removed(tmp_path, monkeypatch,
                                                                                       caplog):
    """Ranks start seconds apart: the failed peer's note may be older than this rank's start
    (what made the test above flaky on a loaded machine). This rank's own note from an earlier
    run is removed at its start, so it is never taken for a peer's."""
    from launch import cli
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "failed-rank1.txt").write_text("part-7.parquet: row group 3: bad\n")
    (tmp_path / "failed-rank0.txt").write_text("an old error of this rank\n")

    def collective_fails():
        raise RuntimeError("[gloo] Connection reset by peer")
    with caplog.at_level(logging.ERROR, logger="mbrec"):
        assert cli.run_rank(collective_fails, tmp_path, 60.0) == 3
    assert "rank 1 failed: see its first error" in caplog.text and "row group 3: bad" in caplog.text
    assert not (tmp_path / "failed-rank0.txt").exists()

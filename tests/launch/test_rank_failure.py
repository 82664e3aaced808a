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

"""`agreed`: one rank's failure, of any kind, stops every rank at the same point (2 gloo ranks)."""
import torch.distributed as dist

from tests.dist_utils import init_gloo, run_ranks


def _outcomes():
    from trainer.errors import CheckpointError
    from trainer.preflight import agreed
    init_gloo()
    rank = dist.get_rank()

    def fails_on(r, exc):
        def fn():
            if rank == r:
                raise exc
            return "fine"
        return fn

    out = []
    for fn in (fails_on(1, ValueError("torn file")), fails_on(0, CheckpointError("no space")), fails_on(9, None)):
        try:
            out.append(("ok", agreed(fn)))
        except Exception as e:
            out.append((type(e).__name__, str(e)))
    dist.barrier()  # the ranks are still paired: no collective was left behind
    return out


def test_agreed_fails_every_rank_alike():
    r0, r1 = run_ranks(_outcomes)
    assert r1[0] == ("ValueError", "torn file")  # the failing rank keeps its own exception
    assert r0[0] == ("RunError", "torn file (rank 1)")  # an unknown kind arrives as a RunError
    assert r0[1] == ("CheckpointError", "no space") and r1[1] == ("CheckpointError", "no space (rank 0)")
    assert r0[2] == r1[2] == ("ok", "fine")

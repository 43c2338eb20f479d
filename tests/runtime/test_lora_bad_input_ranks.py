"""Bad input under torchrun (2 gloo ranks): one `error:` line from rank 0, exit 2 on every rank, no traceback.
Rank 0 raised before broadcasting the plan, so rank 1 died in the broadcast ("Connection closed by peer") with a
traceback and torchrun exited 1."""
from __future__ import annotations

import os
import sys

from lora_ranks import launch_two_ranks, rank_main


def _rank_with_stderr(rank, world, port, argv, rcs):
    out_dir = argv[-1]
    with open(os.path.join(out_dir, f"stderr{rank}.txt"), "w") as f:
        os.dup2(f.fileno(), 2)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        rank_main(rank, world, port, argv[:-1], rcs)
        sys.stderr.flush()


def test_bad_jobs_on_two_ranks_is_one_line_exit_2(tmp_path):
    rcs = launch_two_ranks(["--jobs", "nosuch", "--out", str(tmp_path / "out"), str(tmp_path)],
                           worker=_rank_with_stderr)
    assert rcs == {0: 2, 1: 2}, rcs
    err0 = (tmp_path / "stderr0.txt").read_text()
    err1 = (tmp_path / "stderr1.txt").read_text()
    assert err0 == "error: nosuch: no such file (and not a preset: mix, het, tiny)\n", err0
    assert "Traceback" not in err1 and "error:" not in err1, err1
    assert not (tmp_path / "out").exists()

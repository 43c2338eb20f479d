"""plan sp checks only the sequences its batches draw (a 2026-12-03 README walk-through: one 107k-token sequence of
the 20k-line packaged sample, in none of the 4 planned batches, refused the whole run on 2 GPUs; so did
`--seqlens lognormal:1024,1.6` at its defaults). A longer sequence left in the file is named in a note."""
import json

import numpy as np

from adasched.planner.cli import main
from adasched.planner.flexsp.batching import draw_batches, draw_indices


def test_the_draw_is_the_recorded_one():
    """Fixed-seed draws (a plan's batches and its inputs_digest depend on them; the same as before draw_indices),
    one wrapping around the file (12 > 10), and draw_batches takes those positions."""
    assert [x.tolist() for x in draw_indices(10, 4, 3, 5)] == [[7, 6, 1, 3], [2, 4, 0, 9], [5, 8, 7, 6]]
    assert [x.tolist() for x in draw_indices(7, 3, 2, 0)] == [[2, 4, 3], [6, 5, 0]]
    lens = np.array([11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
    assert [b.tolist() for b in draw_batches(lens, 4, 3, 5)] == [[18, 17, 12, 14], [13, 15, 11, 20], [16, 19, 18, 17]]


def _file(tmp_path, long_at_end: bool):
    rng = np.random.default_rng()
    lens = rng.integers(500, 4000, size=40)
    # 900k tokens of gpt-7b cannot fit even on 64 A100-40GB; find a seed whose 2 batches of 4 skip (or draw) it
    seed = next(s for s in range(1000)
                if (40 in np.concatenate(draw_indices(41, 4, 2, s))) == long_at_end)
    f = tmp_path / "lens.txt"
    f.write_text("\n".join(map(str, [*lens, 900_000])) + "\n")
    return f, seed


def _plan(tmp_path, capsys, long_drawn: bool):
    f, seed = _file(tmp_path, long_at_end=long_drawn)
    out = tmp_path / "plan.json"
    rc = main(["plan", "sp", "--profile", "a100-64-flexsp-paper", "--model", "gpt-7b", "--seqlens", str(f),
               "--gpus", "64", "--global-batch", "4", "--steps", "2", "--seed", str(seed), "--no-milp",
               "--out", str(out)])
    return f, out, rc, capsys.readouterr().err


def test_a_too_long_sequence_not_drawn_is_noted_not_refused(tmp_path, capsys):
    f, out, rc, err = _plan(tmp_path, capsys, long_drawn=False)
    assert rc == 0, err
    assert (f"note: {f}: 1 sequence(s) of up to 900000 tokens cannot fit even on all 64 GPUs; none is in the 2 "
            f"planned global batch(es)") in err
    plan = json.loads(out.read_text())
    drawn = [n for step in plan["steps"] for n in step["seqlens"]]
    assert len(drawn) == 8 and max(drawn) < 900_000
    assert main(["show", str(out)]) == 0  # (show validates the plan)


def test_a_too_long_sequence_drawn_is_refused_naming_the_file(tmp_path, capsys):
    f, out, rc, err = _plan(tmp_path, capsys, long_drawn=True)
    assert rc == 2 and err.startswith(f"error: {f}: the longest sequence drawn (length number 41 of 41 listed) has "
                                      f"900000 tokens"), err
    assert err.count("\n") == 1 and not out.exists()


def test_plan_sp_refuses_no_lengths():
    import pytest

    from adasched.planner.flexsp.api import plan_sp
    from adasched.profiler.io import InputError
    from adasched.profiler.profile import load_profile

    with pytest.raises(InputError, match="no sequence lengths"):
        plan_sp(load_profile("a100-64-flexsp-paper"), "gpt-7b", np.array([], dtype=np.int64), gpus=64,
                global_batch=2, steps=1)

"""FlexSP runtime fixes from a bug hunt (each failed before):
- ranks that read different plan contents (no shared file system, a plan rewritten during the launch) trained in
  silence on mismatched batches: one line, exit 2, on every rank now;
- with --check-reference the other ranks waited for rank 0's reference inside the step's all-to-all, bounded by
  --timeout: a reference slower than it crashed the run;
- `--check-plan-only` without --backend (what launch/train_sp.sh runs) imported torch (tested in
  test_train_sp_model.py);
- a plan step without sequences failed with "max() arg is an empty sequence";
- reference_packed_attention took cu_seqlens that do not cover q (a garbage mask), and a rank outside an SP group
  calling ulysses_attention with it read "degree: -1 must be >= 1"."""
from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from adasched.launch.proc import run_tree
from adasched.planner.plan import load_plan, save_plan
from adasched.profiler.io import InputError
from adasched.runtime.dist import spawn_gloo
from adasched.runtime.ulysses import reference_packed_attention, ulysses_attention

from test_train_sp import _env, _plan  # (tests/runtime is on sys.path: rootdir-relative imports)


def _torchrun(script, *args, timeout_s=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(script), *args]
    return run_tree(cmd, env=_env(), timeout_s=timeout_s, capture_output=True)


def test_ranks_reading_different_plans_stop_with_one_line(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    save_plan(_plan(), a)
    data = json.loads(a.read_text())
    st = data["steps"][1]  # sequence 3 of step 1 one token longer in rank 3's copy
    st["seqlens"][3] += 1
    for mb in st["micro_batches"]:
        for g in mb["groups"]:
            g["seqlens"] = [st["seqlens"][i] for i in g["seq_ids"]]
    b.write_text(json.dumps(data))
    load_plan(b)  # a valid plan on its own
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(textwrap.dedent("""
        import os, sys
        from adasched.launch.train_sp import main
        plan = sys.argv[2] if os.environ["RANK"] == "3" else sys.argv[1]
        sys.exit(main(["--plan", plan, *sys.argv[3:]]))
    """))
    r = _torchrun(wrapper, str(a), str(b), "--steps", "1", "--max-len", "96", "--timeout", "60")
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: {a}: rank(s) [3] run another plan or options than rank 0 (different: batches, plan): "
                     "every rank must read the same plan file and arguments"], r.stderr
    assert "step 0:" not in r.stdout  # nothing trained


def test_check_reference_slower_than_the_collective_timeout(tmp_path):
    plan = tmp_path / "plan.json"
    save_plan(_plan(), plan)
    wrapper = tmp_path / "slow_ref.py"
    wrapper.write_text(textwrap.dedent("""
        import sys, time
        import adasched.launch.train_sp as t
        fast = t._reference
        def slow(*a, **k):  # a reference that takes longer than --timeout (a big model on rank 0)
            time.sleep(12)
            return fast(*a, **k)
        t._reference = slow
        sys.exit(t.main(["--plan", sys.argv[1], *sys.argv[2:]]))
    """))
    # --timeout 6: far below the reference's 12 s, far above what a step's collectives wait on a loaded host
    r = _torchrun(wrapper, str(plan), "--steps", "1", "--check-reference", "--max-len", "96", "--timeout", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "check-reference: 1 step" in r.stdout and ": OK" in r.stdout, r.stdout


def test_a_step_without_sequences_is_refused_naming_it(tmp_path):
    plan = tmp_path / "plan.json"
    save_plan(_plan(), plan)
    data = json.loads(plan.read_text())
    data["predicted_ms"] -= data["steps"][1]["predicted_ms"]
    data["steps"][1].update(seqlens=[], micro_batches=[], predicted_ms=0.0)
    plan.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"steps\.1\.seqlens: empty \(a step trains at least one sequence\)"):
        load_plan(plan)


def test_reference_attention_refuses_bounds_that_do_not_cover_q():
    q = torch.randn(6, 2, 3)
    for cu in ([0, 4], [0, 8], [0, 2, 5]):
        with pytest.raises(ValueError, match=f"cu_seqlens ends at {cu[-1]} but q has 6 tokens"):
            reference_packed_attention(q, q, q, cu)


def _non_member_worker(rank, world):
    from adasched.runtime.pg_pool import get_pool

    pool = get_pool(timeout_s=30)
    group = pool.group([0, 1])
    q = torch.randn(2, 2, 4)
    if rank in (0, 1):
        return None
    try:
        ulysses_attention(q, q, q, [0, 4], group)
    except ValueError as err:
        return str(err)
    return "no error"


def test_a_rank_outside_the_group_is_named():
    out = spawn_gloo(_non_member_worker, 4, timeout_s=60)
    assert out[2] == "group: rank 2 is not a member of this SP group (only its members call ulysses_attention with it)"
    assert out[3] == out[2].replace("rank 2", "rank 3")


@pytest.mark.parametrize("launcher", ["train_sp", "train_moe", "train_lora"])
def test_the_first_rank_of_another_node_reports_its_own_error(launcher, tmp_path, monkeypatch, capsys):
    """Hunt finding: an error seen before any process group by ranks of another node only (no shared file system:
    its own copy of a plan or a save) was printed by nobody - rank 0 prints, the failing ranks did not, torchrun
    stopped every rank. The first rank of each other node prints its line now; the other ranks stay quiet."""
    import importlib

    main = importlib.import_module(f"adasched.launch.{launcher}").main
    missing = tmp_path / f"gone-{np.random.default_rng().integers(10 ** 6)}.json"
    argv = ["--plan", str(missing)]
    if launcher == "train_lora":  # (its plan is read on rank 0 once the group exists): a checkpoint folder that
        missing.write_text("a file")  # is a file is one of its checks before any process group
        argv = ["--jobs", "tiny", "--out", str(tmp_path / "o"), "--checkpoint-dir", str(missing)]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never reached: every case fails before any process group
    for rank, local, node, says in ((3, 1, 1, False), (2, 0, 1, True), (1, 1, 0, False)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setenv("GROUP_RANK", str(node))
        assert main(argv) == 2
        err = capsys.readouterr().err
        if says:
            assert err.count("\n") == 1 and err.startswith("error: ") and str(missing) in err, err
        else:
            assert err == "", (rank, err)


def _options_worker(rank: int, world: int, plan: str, extra: list):
    from adasched.launch.train_sp import main

    return main(["--plan", plan, "--steps", "1", "--max-len", "64", "--timeout", "20", "--backend", "gloo",
                 *extra[rank]])


@pytest.mark.parametrize("mode", ["async", "dir"])
def test_ranks_given_other_checkpoint_options_stop_with_one_line(tmp_path, capfd, mode, two_rank_sp_plan):
    """(33rd session's hunt) the checkpoint options decide collectives (the async saves' own group, resume, periodic
    saves) but were not compared across ranks: rank 0 with --checkpoint-async alone waited in new_group until
    --timeout (a DistStoreError traceback); --checkpoint-dir on rank 0 only met rank 1's first all-to-all."""
    plan = tmp_path / "plan.json"
    save_plan(two_rank_sp_plan, plan)
    ck = str(tmp_path / "ck")
    extra = {"async": [["--checkpoint-dir", ck, "--checkpoint-async"], ["--checkpoint-dir", ck]],
             "dir": [["--checkpoint-dir", ck], []]}[mode]
    assert spawn_gloo(_options_worker, 2, str(plan), extra, timeout_s=60) == [2, 2]
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: {plan}: rank(s) [1] run another plan or options than rank 0 (different: checkpoint): "
                     f"every rank must read the same plan file and arguments"], lines
    assert not (tmp_path / "ck").exists()

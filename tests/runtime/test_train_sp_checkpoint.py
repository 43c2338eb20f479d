"""launch/train_sp checkpoints and lr schedules on 2 gloo ranks under torchrun: a run resumed from a save continues
bit for bit (losses printed with repr, every saved tensor and value of the final save), --checkpoint-every and
--checkpoint-keep leave the right step folders, --lr-schedule sets the lr the optimizer uses at every step to
get_schedule's closed form, --check-reference works on a resumed run, and bad input is one error line, exit 2,
before any process group and with nothing written.

Five launches (about 7 s each on an idle machine) run once for the module (fixture ``runs``):
  A1  rex schedule, warmup 1, 4 steps, --checkpoint-every 2 --checkpoint-keep 0 (saves 2, 4)
  A2  the same command with --load-step 2 --checkpoint-every 1 --checkpoint-keep 2 --check-reference (a run
      killed after step 2's save and restarted; saves 3 and 4 again, keeps 2)
  S   constant lr, 4 steps, --checkpoint-every 1 --checkpoint-keep 2 (the uninterrupted run)
  B1  constant lr, --steps 2 into a new folder; B2 the same folder with --steps 4 (the run extended)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from adasched.launch.train_sp import launch_local, main
from adasched.planner.flexsp.plan import SPGroup, SPMicroBatch, SPPlan, SPStep
from adasched.planner.plan import SolverRecord, save_plan
from adasched.runtime.checkpoint import committed_steps, step_folder
from adasched.schedules import get_schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_sp import _plan as _plan4  # noqa: E402  (the hand-written 4-rank plan)

LR = 3e-3  # train_sp's default --lr
MODEL = ["--heads", "2", "--head-dim", "4", "--max-len", "32", "--seed", "5", "--timeout", "60"]
REX = ["--lr-schedule", "rex", "--warmup-steps", "1", "--steps", "4"]
STEP_RE = re.compile(r"^step (\d+): plan step \d+, .* micro-batches, lr ([^,]+), loss ([^ ,]+)", re.M)


def _group(ranks, ids, lens):
    return SPGroup(degree=len(ranks), ranks=ranks, seq_ids=ids, seqlens=[lens[i] for i in ids], predicted_ms=1.0)


def _plan2() -> SPPlan:
    """2 ranks; the SP degree changes between steps (2 + idle rank -> 1 + 1)."""
    l0, l1 = [13, 4, 9], [7, 3, 10, 5]
    steps = [
        SPStep(step=0, seqlens=l0, predicted_ms=2.0, micro_batches=[
            SPMicroBatch(groups=[_group([0, 1], [0, 1], l0)], predicted_ms=1.0),
            SPMicroBatch(groups=[_group([1], [2], l0)], predicted_ms=1.0)]),
        SPStep(step=1, seqlens=l1, predicted_ms=1.0, micro_batches=[
            SPMicroBatch(groups=[_group([0], [0, 3], l1), _group([1], [1, 2], l1)], predicted_ms=1.0)]),
    ]
    return SPPlan(world_size=2, model="tiny-gpt", inputs_digest="test", predicted_ms=3.0, steps=steps,
                  solver=SolverRecord(backend="hand", status="heuristic", solve_seconds=0.0))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(plan: Path, args: list[str]) -> str:
    """What launch_local starts (torchrun --standalone, 2 ranks, this interpreter); its stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "adasched.launch.train_sp", "--plan", str(plan), *MODEL, *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=plan.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _steps(out: str) -> dict[int, tuple[str, str]]:
    """step -> (lr, loss) as printed (repr: the exact floats)."""
    return {int(s): (lr, loss) for s, lr, loss in STEP_RE.findall(out)}


def _saved(folder: Path, step: int, world: int = 2) -> dict:
    """Every entry of a save (all ranks: model, Adam state, scheduler, RNG, counters), flattened."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = str(step_folder(folder, step))
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    assert {k.split("/")[0] for k in meta} == {f"rank{r}" for r in range(world)}
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
             for k, m in meta.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return state


def _assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _tree(folder: Path) -> dict:
    # files with their mtimes, folders by name only (the up-front write probe touches a folder's mtime)
    return {str(p): p.stat().st_mtime_ns if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_sp_ckpt")
    plan = root / "plan.json"
    save_plan(_plan2(), plan)
    r = {"root": root, "plan": plan, "dirA": root / "A", "dirS": root / "S", "dirB": root / "B"}
    r["A1"] = _torchrun(plan, [*REX, "--checkpoint-dir", "A", "--checkpoint-every", "2", "--checkpoint-keep", "0"])
    r["A1_steps"] = committed_steps(r["dirA"])
    r["A1_final"] = _saved(r["dirA"], 4)
    r["A2"] = _torchrun(plan, [*REX, "--checkpoint-dir", "A", "--checkpoint-every", "1", "--checkpoint-keep", "2",
                               "--load-step", "2", "--check-reference"])
    r["S"] = _torchrun(plan, ["--steps", "4", "--checkpoint-dir", "S", "--checkpoint-every", "1",
                              "--checkpoint-keep", "2"])
    r["B1"] = _torchrun(plan, ["--steps", "2", "--checkpoint-dir", "B"])
    r["B1_steps"] = committed_steps(r["dirB"])
    r["B2"] = _torchrun(plan, ["--steps", "4", "--checkpoint-dir", "B"])
    return r


def test_scheduled_run_restarted_from_a_periodic_save_is_bit_for_bit(runs):
    straight, resumed = _steps(runs["A1"]), _steps(runs["A2"])
    assert sorted(straight) == [0, 1, 2, 3] and sorted(resumed) == [2, 3], runs["A2"]
    assert "resumed from A at step 2" in runs["A2"].splitlines()
    assert "resharded" not in runs["A2"]  # the same plan and world: the saved per-rank state, not rank 0's copy
    assert resumed == {k: straight[k] for k in (2, 3)}  # lr and loss, exactly
    # the final save of the restarted run holds exactly the uninterrupted run's state (weights, Adam moments and
    # steps, the scheduler, the generators, the counter) on both ranks; the restarted run did write it (else the
    # comparison would be of A1's save with itself)
    assert "checkpoint: step 4 saved to A/step-00000004" in runs["A2"].splitlines(), runs["A2"]
    _assert_same_state(runs["A1_final"], _saved(runs["dirA"], 4))
    # --check-reference on a resumed run: the reference starts from the resumed weights (it would differ from the
    # distributed loss by far more than 1e-5 if it started from the initial weights)
    diffs = re.findall(r"rel\. diff loss ([\d.e+-]+), grads ([\d.e+-]+)\)", runs["A2"])
    assert len(diffs) == 2 and all(float(dl) <= 1e-5 and float(dg) <= 1e-5 for dl, dg in diffs), runs["A2"]
    assert "check-reference: 2 steps (from step 2)" in runs["A2"] and ": OK" in runs["A2"]


def test_constant_lr_run_extended_is_bit_for_bit(runs):
    straight, first, second = _steps(runs["S"]), _steps(runs["B1"]), _steps(runs["B2"])
    assert sorted(first) == [0, 1] and sorted(second) == [2, 3]
    assert first == {k: straight[k] for k in (0, 1)} and second == {k: straight[k] for k in (2, 3)}
    assert "resumed from B at step 2" in runs["B2"].splitlines()
    _assert_same_state(_saved(runs["dirS"], 4), _saved(runs["dirB"], 4))
    # the losses moved (the comparison above is not of an untrained model)
    assert len({loss for _, loss in straight.values()}) == 4


def test_checkpoint_every_and_keep_leave_the_right_saves(runs):
    assert runs["A1_steps"] == [2, 4]  # every 2, keep all
    assert committed_steps(runs["dirA"]) == [3, 4]  # restarted at 2: saved 3, 4 again, kept the newest 2
    assert committed_steps(runs["dirS"]) == [3, 4]  # every 1, keep 2
    assert runs["B1_steps"] == [2] and committed_steps(runs["dirB"]) == [2, 4]  # only at the end; default keep 2
    for folder in (runs["dirA"], runs["dirS"], runs["dirB"]):
        assert not [p for p in folder.iterdir() if p.name.endswith(".partial")]
    assert "checkpoint: step 3 saved to A/step-00000003" in runs["A2"]


def test_lr_schedule_sets_the_optimizer_lr_of_every_step(runs):
    """The printed lr is the optimizer's param-group lr that opt.step() applies; it follows get_schedule's closed
    form over the run's 4 steps (warmup 1: 0 at step 0), and the constant default keeps --lr."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], lr=LR)
    want = [get_schedule("rex", opt, num_warmup_steps=1, num_training_steps=4).lr_at(s)[0] for s in range(4)]
    got = [float(lr) for lr, _ in (_steps(runs["A1"])[s] for s in range(4))]
    assert got == want and got[0] == 0.0 and got[1] == LR and LR > got[2] > got[3] > 0, (got, want)
    assert [float(lr) for lr, _ in _steps(runs["S"]).values()] == [LR] * 4
    # and it changes the training: step 1 of the rex run (lr 0 at step 0: no update yet) is step 0's loss on other
    # data, while the constant run's step 1 already moved
    assert _steps(runs["A1"])[0][1] == _steps(runs["S"])[0][1] and _steps(runs["A1"])[1] != _steps(runs["S"])[1]


@pytest.mark.parametrize("case", ["identity-steps", "identity-seed", "world", "load-step", "no-dir", "dir-is-file",
                                  "dir-under-file", "launch-local"])
def test_bad_checkpoint_input_is_one_line_exit_2_nothing_written(runs, monkeypatch, capsys, case):
    root, plan = runs["root"], runs["plan"]
    monkeypatch.chdir(root)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    (root / "file").write_text("x")
    before = _tree(root)
    argv = ["--plan", str(plan), *MODEL]
    if case == "identity-steps":  # the rex schedule's horizon is part of the run
        argv += [*REX[:-1], "5", "--checkpoint-dir", "A"]
        want = ("error: A/step-00000004/adasched-checkpoint.json: saved by a different run (total_steps: saved 4, "
                "now 5); use the same settings or a new --checkpoint-dir")
    elif case == "identity-seed":
        argv = ["--plan", str(plan), *MODEL[:-4], "--seed", "6", "--timeout", "60", "--checkpoint-dir", "B"]
        want = ("error: B/step-00000004/adasched-checkpoint.json: saved by a different run (seed: saved 5, now 6); "
                "use the same settings or a new --checkpoint-dir")
    elif case == "world":  # a 4-rank plan of other batches on 4 ranks pointed at the 2-rank run's folder
        from adasched.launch.train_sp import batches_digest

        save_plan(_plan4(), root / "plan4.json")
        before = _tree(root)
        monkeypatch.setenv("WORLD_SIZE", "4")
        argv = ["--plan", str(root / "plan4.json"), *MODEL[2:], "--heads", "4", "--checkpoint-dir", "B"]
        want = (f"error: B/step-00000004/adasched-checkpoint.json: saved by a different run (batches: saved "
                f"{batches_digest(_plan2())!r}, now {batches_digest(_plan4())!r}; heads: saved 2, now 4) with 2 ranks "
                f"(this run: 4; another world size alone would reshard); use the same settings or a new "
                f"--checkpoint-dir")
    elif case == "load-step":
        argv += ["--steps", "4", "--checkpoint-dir", "B", "--load-step", "3"]
        want = "error: --load-step: 3 was not saved in B (committed steps: 2, 4)"
    elif case == "no-dir":
        argv += ["--checkpoint-every", "2"]
        want = "error: --checkpoint-every: needs --checkpoint-dir"
    elif case == "dir-is-file":
        argv += ["--checkpoint-dir", "file"]
        want = "error: --checkpoint-dir: file exists and is not a folder"
    elif case == "dir-under-file":  # no save could be written there: refused before training, not at the save
        argv += ["--checkpoint-dir", "file/sub"]
        want = "error: --checkpoint-dir: file/sub: file is not a directory"
    else:  # launch_local (and train_sp.sh) check before torchrun starts a worker
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("RANK")
        assert launch_local(plan, 2, [*MODEL, *REX[:-1], "3", "--checkpoint-dir", "A"]) == 2
        out = capsys.readouterr()
        assert out.out == "" and out.err.count("\n") == 1 and "total_steps: saved 4, now 3" in out.err, out.err
        assert _tree(root) == before
        return
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [want] and out.out == "", out.err
    assert _tree(root) == before


def test_save_at_or_past_the_steps_leaves_nothing_to_train(runs):
    before = _tree(runs["root"])
    out = _torchrun(runs["plan"], ["--steps", "3", "--checkpoint-dir", "B"])
    assert ("train_sp: B/step-00000004 is at step 4 and the run has 3 steps (--steps): nothing left to train\n"
            in out) and "step 0:" not in out
    assert _tree(runs["root"]) == before


WRAPPER = """import os, runpy, sys
os.chdir(os.path.join(sys.argv[1], "node" + os.environ["LOCAL_RANK"]))  # each rank its own disk
sys.argv = ["train_sp", *sys.argv[2:]]
runpy.run_module("adasched.launch.train_sp", run_name="__main__")
"""


def test_finished_run_on_ranks_that_see_different_saves_is_one_line_not_a_hang(runs, tmp_path):
    """Hunt finding: on nodes without a shared file system (only rank 0's node holds the saves), relaunching a
    finished run made rank 0 print 'nothing left to train' and exit before any process group, while the other
    ranks waited for it in init_process_group until --timeout and died with a DistStoreError traceback. The
    decision is now taken after the ranks compare their saves: the documented one-line refusal, at once."""
    import shutil
    import time

    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    shutil.copytree(runs["dirB"], tmp_path / "node0" / "B")  # rank 0 sees step 4, rank 1 nothing
    script = tmp_path / "per_rank_cwd.py"
    script.write_text(WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path), "--plan", str(runs["plan"]), *MODEL[:-2], "--timeout", "120", "--steps", "3",
           "--checkpoint-dir", "B"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    took = time.monotonic() - t0
    assert r.returncode != 0 and "nothing left to train" not in r.stdout, r.stdout + r.stderr
    assert "error: B: the ranks see different saves there (rank 0: step 4, rank 1: none)" in r.stderr, r.stderr
    # the hang waited for --timeout (120 s); a launch of 2 ranks took 20-32 s under load (the bound was 30 s)
    assert "DistStoreError" not in r.stderr and took < 90, took


@pytest.mark.parametrize("argv, want", [
    (["--lr-schedule", "rex", "--warmup-steps", "-1"], "error: --warmup-steps: -1 must be >= 0"),
    (["--lr-schedule", "cosine", "--warmup-steps", "4", "--steps", "4"],
     "error: --warmup-steps: 4 must be < the run's 4 steps (--steps): the schedule would never leave its warmup"),
    (["--lr-schedule", "uba", "--warmup-steps", "2"],  # the plan's 2 steps when --steps is not given
     "error: --warmup-steps: 2 must be < the run's 2 steps (--steps): the schedule would never leave its warmup"),
    (["--warmup-steps", "1"],
     "error: --warmup-steps: 1 needs a decaying --lr-schedule (linear, cosine, rex, uba); constant keeps --lr from "
     "the first step"),
    (["--lr-schedule", "step"], "error: argument --lr-schedule: invalid choice: 'step' (choose from "),
])
def test_bad_schedule_options(tmp_path, monkeypatch, capsys, argv, want):
    plan = tmp_path / "plan.json"
    save_plan(_plan2(), plan)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    try:
        rc = main(["--plan", str(plan), "--check-plan-only", *argv])
    except SystemExit as exc:  # argparse's choices
        rc = exc.code
    assert rc == 2
    out = capsys.readouterr()
    err = out.err.splitlines()
    if argv[0] == "--lr-schedule" and argv[1] == "step":  # argparse quotes the choices in some Python versions
        assert len(err) == 1 and err[0].startswith(want) and "uba" in err[0], out.err
    else:
        assert err == [want], out.err
    assert out.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_run_identity_names_what_changes_the_run():
    """Every setting that changes the numbers of a run is in its identity; run-time settings (--timeout,
    --backend, --check-reference, the checkpoint options) are not, so a restart may change them."""
    from adasched.launch.train_sp import parse_args, run_identity

    plan = _plan2()
    base = ["--plan", "p.json", *MODEL, *REX]
    ident = run_identity(parse_args(base), plan)
    for extra in (["--timeout", "7"], ["--backend", "gloo"], ["--check-reference"],
                  ["--checkpoint-dir", "x", "--checkpoint-every", "1", "--checkpoint-keep", "0", "--load-step", "2"]):
        assert run_identity(parse_args(base + extra), plan) == ident, extra
    for extra in (["--seed", "6"], ["--max-len", "31"], ["--layers", "3"], ["--head-dim", "2"], ["--heads", "1"],
                  ["--lr", "1e-3"], ["--dtype", "float64"], ["--lr-schedule", "cosine"], ["--warmup-steps", "2"],
                  ["--steps", "5"]):
        assert run_identity(parse_args(base + extra), plan) != ident, extra
    other = _plan2()
    other.steps[1].micro_batches[0].groups[0].seq_ids.reverse()  # same lengths, other packing
    assert run_identity(parse_args(base), other) != ident
    # a constant lr may be extended: the step count is not part of the run then
    const = ["--plan", "p.json", *MODEL]
    assert (run_identity(parse_args(const + ["--steps", "2"]), plan)
            == run_identity(parse_args(const + ["--steps", "9"]), plan))


def test_async_saves_equal_the_synchronous_run(runs):
    """--checkpoint-async: the run A1 again (rex, 4 steps, a save every 2) with the saves written in the background:
    the same losses and lr, the same step-4 state on both ranks, both saves committed when the launch ends; a launch
    restarted from its step-2 save continues as A1 did."""
    out = _torchrun(runs["plan"], [*REX, "--checkpoint-dir", "AS", "--checkpoint-every", "2", "--checkpoint-keep", "0",
                                   "--checkpoint-async"])
    assert _steps(out) == _steps(runs["A1"])
    lines = out.splitlines()
    assert "checkpoint: step 2 saving (in the background) to AS/step-00000002" in lines, out
    assert "checkpoint: step 4 saved to AS/step-00000004" in lines, out
    folder = runs["root"] / "AS"
    assert committed_steps(folder) == [2, 4] and not list(folder.glob("*.partial"))
    _assert_same_state(runs["A1_final"], _saved(folder, 4))
    # restarted from the asynchronous step-2 save (its step-4 save gone, as after a crash): steps 2-3 and the final
    # state as the uninterrupted run's
    import shutil

    shutil.rmtree(step_folder(folder, 4))
    again = _torchrun(runs["plan"], [*REX, "--checkpoint-dir", "AS", "--load-step", "2", "--checkpoint-keep", "0",
                                     "--checkpoint-async"])
    assert _steps(again) == {k: _steps(runs["A1"])[k] for k in (2, 3)}
    assert committed_steps(folder) == [2, 4]
    _assert_same_state(runs["A1_final"], _saved(folder, 4))


def _plan2_on_4() -> SPPlan:
    """_plan2's batches (same lengths per step) laid out on 4 ranks, as `plan sp --gpus 4` would re-plan them."""
    l0, l1 = _plan2().steps[0].seqlens, _plan2().steps[1].seqlens
    steps = [
        SPStep(step=0, seqlens=l0, predicted_ms=1.0, micro_batches=[SPMicroBatch(groups=[
            _group([0, 1], [0], l0), _group([2], [1], l0), _group([3], [2], l0)], predicted_ms=1.0)]),
        SPStep(step=1, seqlens=l1, predicted_ms=2.0, micro_batches=[
            SPMicroBatch(groups=[_group([0, 1], [2], l1), _group([2, 3], [0], l1)], predicted_ms=1.0),
            SPMicroBatch(groups=[_group([0], [1], l1), _group([3], [3], l1)], predicted_ms=1.0)]),
    ]
    return SPPlan(world_size=4, model="tiny-gpt", inputs_digest="test", predicted_ms=3.0, steps=steps,
                  solver=SolverRecord(backend="hand", status="heuristic", solve_seconds=0.0))


def _close(a: dict, b: dict, steps) -> None:
    for k in steps:
        assert a[k][0] == b[k][0], k  # the lr: the same closed form
        assert abs(float(a[k][1]) - float(b[k][1])) <= 1e-5 * abs(float(b[k][1])), (k, a[k], b[k])


def test_resharded_resume_on_another_world_size(runs):
    """The same run re-planned for 4 ranks resumes the 2-rank save (B1's step 2, constant lr): every rank loads rank
    0's replicated state; steps 2-3 equal the uninterrupted 2-rank run S to float rounding (--check-reference
    passes on each), the saves are 4-rank ones, and a 2-rank launch resumes the 4-rank step-3 save in turn."""
    import shutil

    from adasched.launch.train_sp import plan_digest

    root = runs["root"]
    shutil.copytree(step_folder(runs["dirB"], 2), step_folder(root / "R", 2))
    plan4 = root / "plan2on4.json"
    save_plan(_plan2_on_4(), plan4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           "-m", "adasched.launch.train_sp", "--plan", str(plan4), *MODEL, "--steps", "4", "--checkpoint-dir", "R",
           "--checkpoint-every", "1", "--checkpoint-keep", "0", "--check-reference"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    want = (f"resharded: the save was made by 2 ranks with plan {plan_digest(_plan2())}; every rank loaded rank 0's "
            f"copy (this run: 4 ranks, plan {plan_digest(_plan2_on_4())})")
    assert want in r.stdout.splitlines(), r.stdout
    got, ref = _steps(r.stdout), _steps(runs["S"])
    assert sorted(got) == [2, 3]
    _close(got, ref, (2, 3))
    assert committed_steps(root / "R") == [2, 3, 4]
    assert json.loads((step_folder(root / "R", 3) / "adasched-checkpoint.json").read_text())["world_size"] == 4
    _saved(root / "R", 3, world=4)  # one file per rank of the 4
    # and back: 2 ranks resume the 4-rank step-3 save (its step-4 save then replaced)
    back = _torchrun(runs["plan"], ["--steps", "4", "--checkpoint-dir", "R", "--load-step", "3"])
    assert "resharded: the save was made by 4 ranks" in back, back
    _close(_steps(back), ref, (3,))
    assert sorted(_steps(back)) == [3]
    assert json.loads((step_folder(root / "R", 4) / "adasched-checkpoint.json").read_text())["world_size"] == 2


def test_save_from_before_the_batches_digest_resumes_on_its_own_plan(runs, tmp_path, monkeypatch, capsys):
    """A save whose identity has no "batches" entry (made before it existed) resumes with its own plan (whose digest
    covers the lengths) and stays another run for any other plan; a plan of the same batches whose default heads
    differ from the save's is refused naming --heads."""
    import shutil

    from adasched.launch.train_sp import plan_digest, saved_identity

    folder = tmp_path / "old"
    shutil.copytree(step_folder(runs["dirB"], 2), step_folder(folder, 2))
    meta_path = step_folder(folder, 2) / "adasched-checkpoint.json"
    meta = json.loads(meta_path.read_text())
    del meta["run"]["batches"]
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["--plan", str(runs["plan"]), *MODEL, "--check-plan-only", "--steps", "4", "--checkpoint-dir",
                 str(folder)]) == 0
    capsys.readouterr()
    upgrade = saved_identity(_plan2())
    assert upgrade(dict(meta["run"]))["batches"] == json.loads(
        (step_folder(runs["dirB"], 2) / "adasched-checkpoint.json").read_text())["run"]["batches"]
    assert "batches" not in upgrade({"plan": plan_digest(_plan2_on_4())})
    plan4 = tmp_path / "plan2on4.json"
    save_plan(_plan2_on_4(), plan4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--plan", str(plan4), *MODEL, "--check-plan-only", "--steps", "4", "--checkpoint-dir",
                 str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved by a different run (batches: saved None, now '" in err[0], err
    no_heads = [a for a in MODEL if a not in ("--heads", "2")]
    assert main(["--plan", str(plan4), *no_heads, "--check-plan-only", "--steps", "4", "--checkpoint-dir",
                 str(runs["dirB"])]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --heads: the save in {runs['dirB']} is of a model with 2 heads; without --heads this plan's model "
        f"has 4 (its largest SP degree, at least 4): pass --heads 2 to resume it on this plan"]
    # the hint only when the heads are all that differs: with another seed too, the full list
    other = [a if a != "5" else "6" for a in no_heads]
    assert main(["--plan", str(plan4), *other, "--check-plan-only", "--steps", "4", "--checkpoint-dir",
                 str(runs["dirB"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved by a different run (heads: saved 2, now 4; seed: saved 5, now 6)" in err[0], err


def test_an_error_found_while_training_is_one_line(tmp_path, monkeypatch, capsys):
    """Hunt finding: a ValueError raised once training runs (the resume's 'checkpoint holds the CUDA generators of
    2 devices, this process sees 4') was a traceback from every rank and exit 1 in train_sp; train_moe and
    train_lora print it as one line, exit 2."""
    import adasched.launch.train_sp as train_sp

    plan = tmp_path / "plan.json"
    save_plan(_plan2(), plan)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    msg = "checkpoint holds the CUDA generators of 2 devices, this process sees 4"

    def boom(*a, **k):
        raise ValueError(msg)

    monkeypatch.setattr(train_sp, "_train", boom)
    assert main(["--plan", str(plan), *MODEL]) == 2
    out = capsys.readouterr()
    assert out.err == f"error: {msg}\n" and out.out == ""

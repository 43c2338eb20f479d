"""launch/train_sp: a hand-written SP plan trained on 4 gloo ranks under torchrun with --check-reference,
and plans that do not fit the world rejected with one error line (exit 2) before any step."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adasched.launch.train_sp import check_plan, launch_local, main
from adasched.planner.flexsp.plan import SPGroup, SPMicroBatch, SPPlan, SPStep
from adasched.planner.plan import SolverRecord, save_plan
from adasched.profiler.io import InputError

REPO = Path(__file__).resolve().parents[2]


def _group(ranks, ids, lens):
    return SPGroup(degree=len(ranks), ranks=ranks, seq_ids=ids, seqlens=[lens[i] for i in ids], predicted_ms=1.0)


def _plan(world=4, groups_step0=None):
    lens0 = [900, 120, 50, 33, 400, 7]
    lens1 = [300, 301, 5, 64]
    mbs0 = groups_step0 or [
        [_group([0, 1, 2, 3], [0], lens0)],  # degree 4
        [_group([0, 1], [4], lens0), _group([2], [1, 3], lens0), _group([3], [2, 5], lens0)],  # 2 + 1 + 1
    ]
    steps = [
        SPStep(step=0, seqlens=lens0, predicted_ms=float(len(mbs0)),
               micro_batches=[SPMicroBatch(groups=g, predicted_ms=1.0) for g in mbs0]),
        SPStep(step=1, seqlens=lens1, predicted_ms=2.0, micro_batches=[
            SPMicroBatch(groups=[_group([0, 1], [0], lens1), _group([2, 3], [1, 2], lens1)], predicted_ms=1.0),
            SPMicroBatch(groups=[_group([2], [3], lens1)], predicted_ms=1.0),  # ranks 0, 1, 3 idle
        ]),
    ]
    return SPPlan(world_size=world, model="tiny-gpt", inputs_digest="test",
                  solver=SolverRecord(backend="hand", status="heuristic", solve_seconds=0.0),
                  predicted_ms=len(mbs0) + 2.0, steps=steps)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.parametrize("heads", [[], ["--heads", "3"]], ids=["default-heads", "heads3-uneven"])
def test_train_sp_matches_single_process_reference(tmp_path, monkeypatch, capfd, heads):
    """--heads 3: degree 4 splits them 1/1/1/0 (a rank without heads), degree 2 splits them 2/1."""
    plan = tmp_path / "plan.json"
    save_plan(_plan(), plan)
    monkeypatch.chdir(tmp_path)
    # launch_local = torchrun --standalone --nproc_per_node=4 -m adasched.launch.train_sp ... (this interpreter)
    rc = launch_local(plan, 4, ["--steps", "2", "--check-reference", "--max-len", "96", "--seed", "3",
                                "--timeout", "60", *heads], timeout_s=240)
    r = capfd.readouterr()
    assert rc == 0, r.out + r.err
    steps = re.findall(r"step (\d): plan step (\d), (\d+) seqs, (\d+) tokens, .*loss ([\d.]+) \(reference ([\d.]+); "
                       r"rel\. diff loss ([\d.e+-]+), grads ([\d.e+-]+)\)", r.out)
    assert [s[:3] for s in steps] == [("0", "0", "6"), ("1", "1", "4")], r.out
    # lengths scaled by 96/900 (rounded, >= 2): every token of the global batch is counted once
    assert [int(s[3]) for s in steps] == [96 + 13 + 5 + 4 + 43 + 2, 32 + 32 + 2 + 7]
    for s in steps:
        assert 4.0 < float(s[4]) < 7.0  # ~ln(256) at init
        assert float(s[6]) <= 1e-5 and float(s[7]) <= 1e-5  # float32: measured ~5e-8 (loss), ~6e-7 (grads)
    assert "check-reference: 2 steps" in r.out and ": OK" in r.out
    assert f"{heads[1] if heads else 4} heads" in r.out


def test_plan_world_mismatch_rejected_before_any_step(tmp_path, monkeypatch, capsys):
    plan = tmp_path / "plan.json"
    save_plan(_plan(world=4), plan)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["--plan", str(plan)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {plan}: world_size: plan is for 4 ranks but this run has 2 (torchrun --nproc_per_node=4)"]
    # the launch script checks the plan against NPROC before starting torchrun
    r = subprocess.run(["bash", str(REPO / "launch" / "train_sp.sh"), "--plan", str(plan)],
                       env=dict(_env(), NPROC="2"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == err, r.stderr
    assert "torch.distributed" not in r.stderr and r.stdout == ""
    # the same check in launch_local (used by `make demo`)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert launch_local(plan, nproc=2, args=["--steps", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == err


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.steps[1].micro_batches[1].groups.__setitem__(0, _group([1, 2], [3], p.steps[1].seqlens)),
     "steps.1.micro_batches.1.groups.0.ranks: [1, 2] is not an aligned power-of-two rank range of world size 4"),
    (lambda p: p.steps[1].micro_batches.pop(),
     "steps.1: sequences [3] are in no group (the loss is over the whole global batch)"),
    (lambda p: p.steps[1].micro_batches[1].groups[0].seq_ids.__setitem__(0, 0),
     "steps.1.micro_batches.1.groups.0.seqlens: sequence 0 has length 64 here but 300 in steps.1.seqlens"),
])
def test_bad_plan_rejected(tmp_path, monkeypatch, capsys, mutate, message):
    p = _plan()
    mutate(p)
    plan = tmp_path / "plan.json"
    save_plan(p, plan)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main(["--plan", str(plan)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # load_plan's SPPlan.verify refuses it, naming the field
    assert len(err) == 1 and err[0].startswith(f"error: {plan}: fails verification: {message}"), err
    with pytest.raises(InputError, match=re.escape(message)):  # and so does check_plan for an in-memory plan
        check_plan(p, 4, str(plan))


def test_rank_outside_world(tmp_path, monkeypatch, capsys):
    plan = tmp_path / "plan.json"
    data = _plan().model_dump(mode="json")
    data["steps"][0]["micro_batches"][1]["groups"][2]["ranks"] = [4]
    import json
    plan.write_text(json.dumps(data))
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--plan", str(plan)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {plan}: ") and "rank 4 outside world size 4" in err and "\n" not in err


@pytest.mark.parametrize("argv,needle", [(["--lr", "-1"], "error: --lr: -1.0 must be a positive number"),
                                         (["--backend", "nccl"], "error: --backend: nccl needs CUDA GPUs")])
def test_options_workers_tripped_over_fail_before_the_plan_check(tmp_path, monkeypatch, capsys, argv, needle):
    """Walk finding: both passed --check-plan-only, then raised a traceback on every rank."""
    plan = tmp_path / "plan.json"
    save_plan(_plan(), plan)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    if argv[0] == "--backend":
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["--plan", str(plan), "--check-plan-only"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(needle) and err.count("\n") == 1, err


def test_large_seeds(tmp_path, monkeypatch, capsys):
    """Review finding: make_sequence seeded torch's generator with (seed * 1_000_003 + step) * 1_000_033 + id,
    which overflowed it for --seed >= ~2**24 (e.g. 2**31): a ValueError traceback on every rank after the process
    group was up. Folded into the generator's range now; a seed torch.manual_seed cannot take is one error line."""
    import torch

    from adasched.launch.train_sp import make_sequence

    for seed in (2 ** 31, 2 ** 63 - 1, -2 ** 63):
        a = make_sequence(seed, 1, 2, 9, 256)
        assert torch.equal(a, make_sequence(seed, 1, 2, 9, 256)) and a.shape == (9,)
        assert not torch.equal(a, make_sequence(seed, 1, 3, 9, 256))  # another sequence, another stream
    g = torch.Generator().manual_seed((3 * 1_000_003 + 1) * 1_000_033 + 2)  # small seeds: the same data as before
    assert int(make_sequence(3, 1, 2, 4, 256)[0]) == int(torch.randint(0, 256, (1,), generator=g))
    plan = tmp_path / "plan.json"
    save_plan(_plan(), plan)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main(["--plan", str(plan), "--check-plan-only", "--seed", str(2 ** 64)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --seed: {2 ** 64} must be in [-2**63, 2**64)\n", err


_SET_BY_SCRIPT = "error: {}: set by this script (the world is NPROC=2)"
_UNKNOWN = "error: unrecognized arguments: {}"


@pytest.mark.parametrize("extra, want", [
    (["--world", "4"], _SET_BY_SCRIPT), (["--world=4"], _SET_BY_SCRIPT), (["--check-plan-only"], _SET_BY_SCRIPT),
    (["--wor", "2"], _UNKNOWN), (["--wo=4"], _UNKNOWN), (["--check-plan"], _UNKNOWN)])
def test_launch_script_refuses_options_it_sets_itself_and_their_abbreviations(tmp_path, extra, want):
    """train_sp.sh adds --world NPROC to its pre-check and passed the user's arguments on: a user's --world was
    checked instead of NPROC (argparse keeps the last), then every worker refused it - a torchrun traceback, exit 1.
    The script matched the full spellings only and argparse took abbreviations: --wor 2 started torchrun (every
    worker refused it), --wo=4 checked the plan against 4 ranks for a 2-rank run, --check-plan made every rank
    check the plan and exit 0 without training. Full spellings are refused by the script, abbreviations are
    unknown options (the launchers' parsers set allow_abbrev=False): one line, exit 2, no torchrun."""
    plan = tmp_path / "plan.json"
    save_plan(_plan(world=4), plan)
    r = subprocess.run(["bash", str(REPO / "launch" / "train_sp.sh"), "--plan", str(plan), *extra],
                       env=dict(_env(), NPROC="2"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(want.format(extra[0])), r.stderr


@pytest.mark.parametrize("where", ["step", "group"])
def test_a_plan_length_beyond_the_context_limit_is_one_error_line(tmp_path, capsys, monkeypatch, where):
    """A sequence length of 10**400 in a plan passed the plan model (positive only) and train_sp's length scaling
    raised OverflowError (int to float): a traceback, exit 1. Lengths are bounded by MAX_PLAN_CONTEXT now."""
    import json

    data = json.loads(_plan().model_dump_json())
    huge = 10 ** 400 if where == "step" else 2 ** 40 + 1
    if where == "step":
        data["steps"][0]["seqlens"][0] = huge
    data["steps"][0]["micro_batches"][0]["groups"][0]["seqlens"][0] = huge
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main(["--plan", str(path), "--check-plan-only"]) == 2
    err = capsys.readouterr().err
    want = "of 401 digits" if where == "step" else f"{huge}"
    assert err.startswith(f"error: {path}: ") and f"seqlens: length {want} is more than 1,099,511,627,776 tokens" \
        in err and err.count("\n") == 1, err


@pytest.mark.parametrize("timeout", ["1e-9", "0.0005", "0.5"])
def test_collective_timeout_under_a_second_is_refused(tmp_path, timeout, capsys):
    """--timeout 1e-9 passed the checks; timedelta(seconds=1e-9) is 0 ms and every rank's store timed out at once
    with a C++ traceback."""
    plan = tmp_path / "plan.json"
    save_plan(_plan(world=4), plan)
    assert main(["--plan", str(plan), "--check-plan-only", "--world", "4", "--timeout", timeout]) == 2
    assert capsys.readouterr().err == f"error: --timeout: must be >= 1 seconds, got {float(timeout):g}\n"


@pytest.mark.parametrize("backend,gpus,ranks", [([], 1, 4), (["--backend", "nccl"], 2, 4), ([], 0, 2)])
def test_more_ranks_than_gpus_with_nccl_is_one_line(tmp_path, monkeypatch, capsys, backend, gpus, ranks):
    """31st session (SP runtime hunt): with nccl each rank binds cuda:LOCAL_RANK; NPROC=4 on a 1-GPU host crashed
    ranks 1-3 with "invalid device ordinal" tracebacks while rank 0 waited until --timeout. Now one line from the
    pre-check, before any process group (CUDA faked here: this machine has none)."""
    import torch

    plan = tmp_path / "plan.json"
    save_plan(_plan(world=4), plan)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    ckpt = tmp_path / "ckpt"
    assert main(["--plan", str(plan), *backend, "--checkpoint-dir", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: NPROC: {ranks} ranks on this host but it has {gpus} GPU(s), one a rank with nccl "
                   f"(torchrun --nproc_per_node={gpus} with a plan for that many, or --backend gloo)"], err
    assert not ckpt.exists()
    # the plan check alone stays a plan check (a login node without the GPUs)
    assert main(["--plan", str(plan), "--check-plan-only", *backend]) == 0
    assert capsys.readouterr().out.strip() == f"{plan}: 2 steps fit world size 4"


@pytest.mark.parametrize("local,gpus,ok", [(0, 2, True), (1, 2, True), (3, 2, False), (0, 0, False)])
def test_without_local_world_size_each_rank_checks_its_own_gpu(tmp_path, monkeypatch, capsys, local, gpus, ok):
    """The session's review: without LOCAL_WORLD_SIZE (a launcher that sets LOCAL_RANK only, as SLURM's
    SLURM_LOCALID) the check took the whole world for this host's ranks and refused 2 nodes x 8 GPUs. Now such a
    rank checks its own cuda:LOCAL_RANK."""
    import torch

    from adasched.launch import train_sp

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", str(local))
    monkeypatch.setenv("LOCAL_RANK", str(local))
    args = train_sp.parse_args(["--plan", str(tmp_path / "p.json")])
    if ok:
        train_sp.check_gpus(args, 4)
    else:
        with pytest.raises(InputError, match=f"^LOCAL_RANK: {local}, but this host has {gpus} GPU"):
            train_sp.check_gpus(args, 4)

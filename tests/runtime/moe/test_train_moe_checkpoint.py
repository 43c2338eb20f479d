"""train_moe checkpoints and --lr-schedule.

- Real 2-rank torchrun launches (launch/train_moe.sh, gloo, EP over both ranks: each rank holds different experts;
  pipeline from an FSMoE --plan): an uninterrupted 4-step run equals a 2-step run resumed to 4 steps by a second
  launch, loss for loss (the exact floats of --json) and in the whole final state of both ranks (weights, the
  sigmoid_bias router's expert bias, AdamW, generators, progress); --checkpoint-every / --checkpoint-keep leave the
  right committed folders; the plan's inputs digest and configuration are part of the run's identity.
- A run whose --lr-schedule decays (so --steps is part of its identity) resumes with --load-step bit for bit
  (in-process, one rank): the scheduler is part of the state.
- The schedule changes the LR AdamW uses at every step (recorded inside AdamW.step), as get_schedule's closed form.
- Bad input (another run, also on another world size, an unsaved --load-step, checkpoint options without
  --checkpoint-dir, several runs, --compare-schedules, bad schedule options): one `error:` line, exit 2, nothing
  written.
- Resharded resumes (another world size or layout): the experts joined and re-cut element for element, the same
  ranks' losses to rounding, the LR schedule carried.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adasched.launch.train_moe import main
from adasched.runtime.checkpoint import committed_steps, step_folder

ROOT = Path(__file__).resolve().parents[3]
# tiny 2-layer model; sigmoid_bias: a router whose buffer (the expert bias) moves every step; ascending: k 1 then 3
TINY = ["--router", "sigmoid_bias", "--schedule", "ascending", "--layers", "2", "--hidden", "16", "--ffn", "16",
        "--seq", "8", "--batch", "2", "--seed", "3"]


def _launch(*argv: str, nproc: int = 2, base: list[str] = TINY) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, NPROC=str(nproc), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(ROOT / "launch" / "train_moe.sh"), *base, *argv], capture_output=True,
                          text=True, env=env, timeout=240, cwd=ROOT)


def _run_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (run,) = out["runs"]
    assert run["copies_max_diff"] == 0.0
    return run


def _saved(folder: Path) -> dict:
    """Every rank's saved state of one step folder, read back without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / (folder.name + ".pt")
    dcp_to_torch_save(str(folder), str(out))
    try:
        return torch.load(out, weights_only=False)
    finally:
        out.unlink()


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}/")
    else:
        yield prefix.rstrip("/"), tree


def _tree(folder: Path) -> list:
    # files with their mtimes, folders by name only (the up-front write probe touches a folder's mtime)
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns if p.is_file() else None)
                  for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    from adasched.planner.cli import main as cli

    base = tmp_path_factory.mktemp("moe_ckpt")
    plans = {}
    for config in ("mixtral-8x7b", "gshard-grid"):          # two plans for 2 GPUs (EP 2) with other inputs
        plans[config] = base / f"{config}.json"
        assert cli(["plan", "moe", "--config", config, "--gpus", "2", "--stages", "published", "--time-limit", "0.5",
                    "--out", str(plans[config]), "--json"]) in (0, None)
    planned = ["--plan", str(plans["mixtral-8x7b"])]
    straight, split = base / "straight", base / "split"
    # uninterrupted: 4 steps, a save every 2, all kept
    full = _run_json(_launch(*planned, "--steps", "4", "--checkpoint-dir", str(straight), "--checkpoint-every", "2",
                             "--checkpoint-keep", "0", "--json", "--router-stats-out", str(base / "full-stats.json")))
    # interrupted: 2 steps (saved at the end), then a second launch to 4 saving every step, keeping 2
    first = _run_json(_launch(*planned, "--steps", "2", "--checkpoint-dir", str(split), "--json"))
    steps_after_first = committed_steps(split)
    proc = _launch(*planned, "--steps", "4", "--checkpoint-dir", str(split), "--checkpoint-every", "1",
                   "--checkpoint-keep", "2", "--json", "--router-stats-out", str(base / "resumed-stats.json"))
    resumed = _run_json(proc)
    return {"base": base, "straight": straight, "split": split, "full": full, "first": first, "resumed": resumed,
            "resumed_stderr": proc.stderr, "steps_after_first": steps_after_first, "plans": plans,
            "planned": planned}


def test_resumed_launch_equals_uninterrupted_launch(launches):
    full, first, resumed = launches["full"], launches["first"], launches["resumed"]
    assert len(full["losses"]) == 4 and full["start_step"] == 0
    assert first["losses"] == full["losses"][:2]
    assert resumed["start_step"] == 2 and resumed["resumed_from"] == str(step_folder(launches["split"], 2))
    assert f"resumed from {step_folder(launches['split'], 2)} at step 2" in launches["resumed_stderr"]
    assert "resharded" not in launches["resumed_stderr"]      # same layout: each rank's own saved state
    assert resumed["losses"] == full["losses"][2:]           # exact floats (JSON keeps every bit)
    assert len(set(full["losses"])) == 4                     # the steps differ: equality is not trivial
    # the whole final state of both ranks: model, router buffers, AdamW, generators, progress
    a, b = _saved(step_folder(launches["straight"], 4)), _saved(step_folder(launches["split"], 4))
    fa, fb = dict(_flat(a)), dict(_flat(b))
    assert fa.keys() == fb.keys()
    for key, va in fa.items():
        vb = fb[key]
        assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), key
    for r in (0, 1):
        assert fa[f"rank{r}/progress/step"] == 4
        assert fa[f"rank{r}/model/model/blocks.1.moe.router.expert_bias"].abs().max() > 0   # the bias moved
    # expert parallel: each rank saved its own experts (and its own data generator)
    assert not torch.equal(fa["rank0/model/model/blocks.0.moe.w1"], fa["rank1/model/model/blocks.0.moe.w1"])
    assert not torch.equal(fa["rank0/rng/gen.data"], fa["rank1/rng/gen.data"])
    assert torch.equal(fa["rank0/model/model/tok.weight"], fa["rank1/model/model/tok.weight"])  # dense: replicas


def test_router_statistics_of_a_resumed_run_cover_the_whole_run(launches):
    """--router-stats-out of a resumed launch averaged only its own steps (2-3 here; 1.66/1.86 against the whole
    run's 1.56/1.71 in the review's case): the totals over every rank and step travel in the save's progress. The
    per-step assignments and tokens are whole numbers, so the sums are exact in any order."""
    full = json.loads((launches["base"] / "full-stats.json").read_text())
    resumed = json.loads((launches["base"] / "resumed-stats.json").read_text())
    assert resumed == full and resumed["mean_k_per_layer"] == launches["full"]["mean_k_per_layer"]
    assert launches["resumed"]["mean_k_per_layer"] == launches["full"]["mean_k_per_layer"]
    # ascending on 2 layers: k 1 then 3 - the second layer's mean is above the first's
    k = full["mean_k_per_layer"]
    assert len(k) == 2 and 0 < k[0] < k[1] <= 3
    saved = dict(_flat(_saved(step_folder(launches["split"], 4))))
    import pickle

    sums = pickle.loads(saved["rank0/progress/router_k_sums"])["sums"]
    assert [a / b for a, b in sums] == k and all(b == 4 * 2 * 2 * 8 for _, b in sums)  # 4 steps x 2 ranks x 2 x 8


def test_every_and_keep_leave_the_right_saves(launches):
    assert committed_steps(launches["straight"]) == [2, 4]  # every 2, keep 0 (all)
    assert launches["steps_after_first"] == [2]             # the end of the 2-step run
    assert committed_steps(launches["split"]) == [3, 4]     # every 1 from step 2 on, keep 2: step 2 pruned
    for folder in (launches["straight"], launches["split"]):
        assert not list(folder.glob("*.partial"))
        meta = json.loads((step_folder(folder, 4) / "adasched-checkpoint.json").read_text())
        assert meta["world_size"] == 2 and meta["run"]["router"] == "sigmoid_bias" and meta["run"]["ep_size"] == 2
        assert meta["run"]["plan_inputs_digest"] == json.loads(launches["plans"]["mixtral-8x7b"].read_text())[
            "inputs_digest"] and meta["run"]["plan_config"] == "mixtral-8x7b-L1024"
        assert sorted(p.name for p in step_folder(folder, 4).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_nothing_left_to_train(launches):
    """On 2 ranks: the ranks agree on the save first (decided before any process group, rank 0 of a finished run
    on nodes without a shared file system returned while the others waited in init_process_group)."""
    before = _tree(launches["split"])
    args = [*launches["planned"], "--steps", "4", "--checkpoint-dir", str(launches["split"])]
    note = f"nothing left to train: {step_folder(launches['split'], 4)} is step 4 and --steps is 4\n"
    proc = _launch(*args)
    assert proc.returncode == 0 and proc.stdout == note, proc.stdout + proc.stderr[-3000:]
    # --json: stdout is still one JSON object (no runs), the note goes to stderr
    proc = _launch(*args, "--json")
    assert proc.returncode == 0 and note in proc.stderr, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == {"world": 2, "ep_size": 2, "two_step": False, "exchange_gpus_per_node": None,
                                       "expert_shards": 1, "batch": 2, "global_batch": 4, "runs": [],
                                       "nothing_left": {"checkpoint": str(step_folder(launches["split"], 4)),
                                                        "step": 4, "steps": 4}}
    assert _tree(launches["split"]) == before
    # --router-stats-out with nothing trained: it returned 0 and wrote nothing (a stale file read as this run's)
    stats = launches["base"] / "nothing-stats.json"
    proc = _launch(*args, "--router-stats-out", str(stats))  # (refused by train_moe.sh's check, before torchrun)
    assert proc.returncode == 2 and not stats.exists() and proc.stdout == "", proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"error: --router-stats-out: nothing would be trained ({step_folder(launches['split'], 4)} is step 4, "
        f"--steps 4), so no statistics would be written to {stats}; raise --steps"), proc.stderr[-3000:]


def test_resolved_plan_pipeline_is_a_resharded_resume(launches, tmp_path, monkeypatch, capsys):
    """A plan re-solved from the same inputs keeps its inputs digest but may hold other dense-gradient slices (a
    time-limited solve) or backward choices (ties), which change the float sums: the identity names them, and
    resuming the save under the new plan is a resharded resume (a layout change), accepted before any process
    group; another setting of the run is still refused."""
    from adasched.launch.train_moe import LAYOUT_KEYS
    from adasched.runtime.moe.planned import load_pipeline

    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = json.loads(launches["plans"]["mixtral-8x7b"].read_text())
    slices = plan["configs"][0]["grad_slices"]
    # other slices for the 2 layers the run has: half of position 1's moved to the last position (the same total,
    # so the same exposed all-reduce; the prefix rule holds: earlier positions only reduce less)
    moved = slices[1] / 2
    slices[1] -= moved
    slices[-1] += moved
    # (every later gap of this plan is full: the moved part is past the last gap's capacity, which verify refuses in
    # plans written since 2026-12-05 - the file is dated before, its subject here is the run identity, not verify)
    plan["created"] = "2026-12-04T12:00:00+00:00"
    resolved = tmp_path / "resolved.json"
    resolved.write_text(json.dumps(plan))
    want = [load_pipeline(p, ep_size=2, num_layers=2, world=2).slice_fractions
            for p in (launches["plans"]["mixtral-8x7b"], resolved)]
    from adasched.planner.fsmoe.costmodel import MoEConfig

    c = plan["configs"][0]                                    # each gap's share of the planned model's gradient
    total = MoEConfig.model_validate(c["config"]).replicated_params * len(c["layers"])
    assert want[0] != want[1] and want[1] == pytest.approx([slices[0] / total, slices[1] / total], rel=1e-12)
    assert "grad_slices" in LAYOUT_KEYS
    ident = [_identity(["--plan", str(p)]) for p in (launches["plans"]["mixtral-8x7b"], resolved)]
    assert ident[0]["grad_slices"] == want[0] and ident[1]["grad_slices"] == want[1]
    before = _tree(launches["base"])
    args = [*TINY, "--plan", str(resolved), "--steps", "4", "--checkpoint-dir", str(launches["split"]),
            "--validate-only"]
    assert main(args) == 0
    assert main([*args, "--seed", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "saved by a different run (seed: saved 3, now 4); use the same settings or a new --checkpoint-dir"), err
    assert _tree(launches["base"]) == before


def _identity(argv, world=2):
    from adasched.launch.train_moe import ep_size_for, parse_args, run_identity

    args = parse_args([*TINY, "--steps", "4", *argv])
    return run_identity(args, args.router, args.schedule, ep_size_for(args, world), world)


@pytest.mark.parametrize("argv", [
    ["--layers", "3"], ["--experts", "4"], ["--hidden", "32"], ["--heads", "2"], ["--ffn", "8"], ["--vocab", "12"],
    ["--seq", "6"], ["--batch", "3"], ["--lr", "0.001"], ["--lr-schedule", "rex"], ["--seed", "4"],
    ["--capacity-factor", "1.5"], ["--shared-experts", "1"], ["--budget", "5"], ["--cap-hi", "3", "--budget", "6"],
    ["--cap-lo", "2", "--budget", "6"], ["--schedule", "uniform"], ["--router", "gshard"], ["--ep-size", "1"],
    ["--r-fwd", "1"], ["--r-bwd", "4"], ["--wgrad", "per-chunk"], ["--hierarchical", "--ep-size", "2"],
    ["--expert-shards", "2"],
])
def test_identity_changes_with_every_setting_of_the_run(argv):
    base = _identity([])
    other = _identity(argv)
    assert other != base, argv


def test_identity_ignores_what_does_not_change_the_run(tmp_path):
    base = _identity([])
    for argv in (["--json"], ["--router-stats-out", str(tmp_path / "s.json")], ["--validate-only"], ["--quick"],
                 ["--checkpoint-dir", str(tmp_path), "--checkpoint-every", "1", "--checkpoint-keep", "0",
                  "--load-step", "2"], ["--steps", "9"], ["--ep-size", "2"], ["--gpus-per-node", "1"]):
        assert _identity(argv) == base, argv
    # the node size matters only to a two-step exchange, which EP size 1 does not build
    assert _identity(["--hierarchical", "--ep-size", "1", "--gpus-per-node", "1"]) == _identity(["--ep-size", "1"])
    # a decaying schedule's horizon is --steps: then it is part of the run
    assert _identity(["--lr-schedule", "rex", "--steps", "9"]) != _identity(["--lr-schedule", "rex"])
    json.dumps(base)                                         # JSON values only


@pytest.mark.parametrize("world,argv,needle", [
    ("2", ["--lr", "0.001"], "saved by a different run (lr: saved 0.003, now 0.001)"),
    ("2", ["--lr-schedule", "linear"], "saved by a different run (lr_schedule: saved 'constant', now 'linear'; "
                                       "total_steps: saved None, now 4)"),
    ("2", ["--ep-size", "1"], "this run has 2 ranks with EP size 1"),     # the plan's check comes first
    ("4", ["--plan", None, "--seed", "4"],
     "saved by a different run (seed: saved 3, now 4) with 2 ranks (this run: 4; another world size alone would "
     "reshard)"),
    ("2", ["--load-step", "2"], "--load-step: 2 was not saved in"),
    ("2", ["--router", "sigmoid_bias,gshard"], "--checkpoint-dir: a checkpoint holds one run; give one --router and "
                                               "one --schedule (got 2 x 1 combinations)"),
    # another layout of the same run is a resharded resume, not a mismatch: the model's sizes still must match
    ("2", ["--plan", None, "--ffn", "8"], "saved by a different run (ffn: saved 16, now 8)"),
])
def test_mismatch_is_one_line_and_writes_nothing(launches, monkeypatch, capsys, world, argv, needle):
    monkeypatch.setenv("WORLD_SIZE", world)
    before = _tree(launches["base"])
    args = [*TINY, *launches["planned"], "--steps", "4", "--checkpoint-dir", str(launches["split"])]
    if argv[:1] in (["--router"], ["--plan"]):              # replace (or drop) the option's value
        i = args.index(argv[0])
        if argv[1] is None:
            del args[i:i + 2]
        else:
            args[i + 1] = argv[1] if argv[0] == "--router" else str(launches["plans"][argv[1]])
        argv = argv[2:]
    for extra in ([], ["--validate-only"]):                 # the launcher's check and the workers' own
        assert main([*args, *argv, *extra]) == 2
        cap = capsys.readouterr()
        err = cap.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], cap.err
        assert cap.out == ""
    assert _tree(launches["base"]) == before


def test_launcher_refuses_before_any_worker(launches):
    before = _tree(launches["base"])
    proc = _launch(*launches["planned"], "--steps", "4", "--checkpoint-dir", str(launches["split"]), "--seed", "4")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {step_folder(launches['split'], 4) / 'adasched-checkpoint.json'}: saved by a different run (seed: "
        f"saved 3, now 4); use the same settings or a new --checkpoint-dir"]
    assert "torch.distributed.run" not in proc.stderr and proc.stdout == ""
    assert _tree(launches["base"]) == before


@pytest.mark.parametrize("argv,needle", [
    (["--checkpoint-every", "2"], "error: --checkpoint-every: needs --checkpoint-dir"),
    (["--load-step", "2"], "error: --load-step: needs --checkpoint-dir"),
    (["--checkpoint-keep", "1"], "error: --checkpoint-keep: needs --checkpoint-dir"),
    (["--checkpoint-dir", "{new}", "--checkpoint-every", "-1"], "error: --checkpoint-every: -1 must be >= 0"),
    (["--checkpoint-dir", "{file}"], "file exists and is not a folder"),
    (["--checkpoint-dir", "{file}/sub"], "/file is not a directory"),        # not at the first save, mid-run
    (["--checkpoint-dir", "{new}", "--router", "all"], "error: --checkpoint-dir: a checkpoint holds one run"),
    (["--checkpoint-dir", "{new}", "--compare-schedules"], "error: --checkpoint-dir: not used by --compare-schedules"),
    (["--lr-schedule", "rex", "--compare-schedules"], "error: --lr-schedule: not used by --compare-schedules"),
    (["--warmup-steps", "-1", "--lr-schedule", "linear"], "error: --warmup-steps: -1 must be >= 0"),
    (["--warmup-steps", "5", "--lr-schedule", "linear", "--steps", "4"],
     "error: --warmup-steps: 5 must be < the run's 4 steps (--steps)"),
    (["--warmup-steps", "4", "--lr-schedule", "linear", "--steps", "4"],
     "error: --warmup-steps: 4 must be < the run's 4 steps (--steps)"),
    (["--warmup-steps", "2"], "error: --warmup-steps: 2 needs a decaying --lr-schedule"),
])
def test_bad_options_are_one_line(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "file").write_text("x")
    argv = [a.format(new=tmp_path / "new", file=tmp_path / "file") for a in argv]
    before = _tree(tmp_path)
    assert main([*argv, "--validate-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert _tree(tmp_path) == before


def test_unknown_lr_schedule_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--lr-schedule", "step", "--validate-only"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --lr-schedule: invalid choice: 'step'"), err


# ---- in-process, one rank: the LR schedule ------------------------------------------------------------------------
def _one_rank(capsys, argv) -> dict:
    rc = main([*TINY, "--json", *argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    (run,) = json.loads(cap.out.strip().splitlines()[-1])["runs"]
    return run


@pytest.fixture
def one_rank_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)   # leave the test process's threads alone


def test_lr_schedule_sets_the_lr_adamw_uses(one_rank_env, monkeypatch, capsys):
    from adasched.schedules import get_schedule

    used = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **kw):                                          # the LR inside the optimizer's own step
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    lr, steps = 0.01, 5
    probe = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))], lr=lr)
    for name in ("linear", "cosine", "rex", "uba"):
        used.clear()
        run = _one_rank(capsys, ["--steps", str(steps), "--lr", str(lr), "--lr-schedule", name, "--warmup-steps", "1"])
        ref = get_schedule(name, probe, num_warmup_steps=1, num_training_steps=steps)
        want = [ref.lr_at(s)[0] for s in range(steps)]
        assert used == pytest.approx(want, rel=1e-12, abs=0) and run["lrs"] == used, name
        assert used[0] == 0.0 and used[1] == pytest.approx(lr, rel=1e-12)      # warmup from 0, then the peak
        assert all(a > b for a, b in zip(used[1:], used[2:])), (name, used)     # then it decays every step
        if name == "linear":
            assert used == pytest.approx([0.0, lr, lr * 3 / 4, lr / 2, lr / 4], rel=1e-12)
            linear_losses = run["losses"]
    used.clear()
    const = _one_rank(capsys, ["--steps", str(steps), "--lr", str(lr)])
    assert used == [lr] * steps and const["lrs"] == used
    assert const["losses"][0] == linear_losses[0] and const["losses"][1] != linear_losses[1]


def test_lr_schedule_resumes_with_load_step(one_rank_env, tmp_path, capsys):
    ck = tmp_path / "ck"
    sched = ["--steps", "5", "--lr", "0.01", "--lr-schedule", "rex", "--warmup-steps", "1", "--checkpoint-dir",
             str(ck)]
    full = _one_rank(capsys, [*sched, "--checkpoint-every", "2", "--checkpoint-keep", "0"])
    assert committed_steps(ck) == [2, 4, 5]
    kept = tmp_path / "step5"
    shutil.copytree(step_folder(ck, 5), kept)
    resumed = _one_rank(capsys, [*sched, "--load-step", "2"])
    assert resumed["start_step"] == 2
    assert resumed["lrs"] == full["lrs"][2:] and resumed["losses"] == full["losses"][2:]
    a, b = dict(_flat(_saved(kept))), dict(_flat(_saved(step_folder(ck, 5))))
    assert a.keys() == b.keys() and any(k.startswith("rank0/lr_schedule/") for k in a)
    for key, va in a.items():
        assert (torch.equal(va, b[key]) if isinstance(va, torch.Tensor) else va == b[key]), key
    # the schedule's horizon is --steps: a longer run is another run
    assert main([*TINY, *sched[:-2], "--steps", "6", "--checkpoint-dir", str(ck), "--validate-only"]) == 2
    assert "total_steps: saved 5, now 6" in capsys.readouterr().err


def test_save_whose_metadata_disagrees_with_its_state_is_one_line(one_rank_env, tmp_path, capsys):
    """A step folder whose metadata names another step than the progress it holds (a copied or renamed save): one
    error line naming it, exit 2, nothing written - not a traceback after the process group exists."""
    ck = tmp_path / "ck"
    run = ["--steps", "2", "--checkpoint-dir", str(ck)]
    _one_rank(capsys, run)
    shutil.copytree(step_folder(ck, 2), step_folder(ck, 3))
    meta = step_folder(ck, 3) / "adasched-checkpoint.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "step": 3}))
    before = _tree(tmp_path)
    assert main([*TINY, *run[:1], "4", *run[2:]]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    # (named by the trainer once it has loaded the state; a metadata check before loading may name it first)
    assert len(err) == 1 and err[0].startswith(f"error: {step_folder(ck, 3)}") and "step 3" in err[0], cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    assert _tree(tmp_path) == before


def test_expert_sharded_run_resumes_bit_for_bit(tmp_path):
    """FSMoE's expert-sharded layout on 2 ranks (one node of 2 shards: each rank holds half of every expert's FFN
    width): 2 steps + a resumed launch to 4 equal 4 uninterrupted steps, loss for loss and in every saved tensor;
    the two ranks saved different halves of the same experts."""
    sharded = ["--expert-shards", "2", "--json"]
    full = _run_json(_launch(*sharded, "--steps", "4", "--checkpoint-dir", str(tmp_path / "a")))
    first = _run_json(_launch(*sharded, "--steps", "2", "--checkpoint-dir", str(tmp_path / "b")))
    resumed = _run_json(_launch(*sharded, "--steps", "4", "--checkpoint-dir", str(tmp_path / "b")))
    assert first["losses"] == full["losses"][:2] and resumed["losses"] == full["losses"][2:]
    assert resumed["start_step"] == 2 and len(set(full["losses"])) == 4
    fa, fb = dict(_flat(_saved(step_folder(tmp_path / "a", 4)))), dict(_flat(_saved(step_folder(tmp_path / "b", 4))))
    assert fa.keys() == fb.keys()
    for key, va in fa.items():
        assert (torch.equal(va, fb[key]) if isinstance(va, torch.Tensor) else va == fb[key]), key
    w0, w1 = fa["rank0/model/model/blocks.0.moe.w1"], fa["rank1/model/model/blocks.0.moe.w1"]
    assert w0.shape == w1.shape == (8, 16, 16) and not torch.equal(w0, w1)   # 8 experts, 2 x ffn/2 columns each
    meta = json.loads((step_folder(tmp_path / "a", 4) / "adasched-checkpoint.json").read_text())
    assert meta["run"]["expert_shards"] == 2 and meta["run"]["ep_size"] == 1


def test_async_saves_equal_the_synchronous_run(launches, tmp_path):
    """--checkpoint-async on 2 ranks: the same losses as the synchronous run, the same saves (every tensor of steps
    2 and 4 equal to the synchronous run's), all committed when the launch ends; a launch resumed from its step-2
    save with --checkpoint-async trains steps 3-4 as the uninterrupted run did."""
    folder = tmp_path / "async"
    run = _run_json(_launch(*launches["planned"], "--steps", "4", "--checkpoint-dir", str(folder),
                            "--checkpoint-every", "2", "--checkpoint-keep", "0", "--checkpoint-async", "--json"))
    assert run["losses"] == launches["full"]["losses"]
    assert committed_steps(folder) == [2, 4] and not list(folder.glob("*.partial"))
    for step in (2, 4):
        fa = dict(_flat(_saved(step_folder(launches["straight"], step))))
        fb = dict(_flat(_saved(step_folder(folder, step))))
        assert fa.keys() == fb.keys()
        for key, va in fa.items():
            assert (torch.equal(va, fb[key]) if isinstance(va, torch.Tensor) else va == fb[key]), (step, key)
    resumed = _run_json(_launch(*launches["planned"], "--steps", "4", "--checkpoint-dir", str(folder),
                                "--load-step", "2", "--checkpoint-async", "--json"))
    assert resumed["start_step"] == 2 and resumed["losses"] == launches["full"]["losses"][2:]
    assert committed_steps(folder) == [2, 4]


def test_resharder_joins_and_cuts_the_saved_experts_exactly(launches, tmp_path):
    """One process (no EP: every expert whole) resumes the 2-rank save (EP 2: experts 0-3 on rank 0, 4-7 on rank 1)
    through expert_resharder (this rank holds every expert: it reads every saved part): every expert weight and AdamW
    moment equals the saved ranks' parts joined, element for element; the dense weights, router buffers and their AdamW
    state are rank 0's; the data generator is rank 0's own (own_rank); progress and the identity's layout keys as
    saved."""
    from adasched.launch.train_moe import LAYOUT_KEYS, layer_routers, parse_args
    from adasched.runtime.checkpoint import (CheckpointConfig, Checkpointer, ModelState, RNGState, Values,
                                             find_checkpoint)
    from adasched.runtime.moe.lm import TinyMoELM
    from adasched.runtime.moe.reshard import expert_resharder

    folder = tmp_path / "ck"
    shutil.copytree(step_folder(launches["straight"], 2), step_folder(folder, 2))
    args = parse_args([*TINY, "--steps", "4"])
    routers, _ = layer_routers(args.router, args.schedule, args.layers, args.experts, ep_size=1)
    torch.manual_seed(11)                                      # weights unlike the saved ones
    model = TinyMoELM(args.vocab, args.d, args.heads, args.ffn, routers, max_len=args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen, progress = torch.Generator().manual_seed(5), Values(step=0)
    state = {"model": ModelState(model, [opt]), "rng": RNGState(data=gen), "progress": progress}
    info = find_checkpoint(folder)
    assert info.world_size == 2 and info.run["ep_size"] == 2
    ck = Checkpointer(CheckpointConfig(folder=folder), run=dict(info.run, ep_size=1), layout_keys=LAYOUT_KEYS,
                      replicated={"progress", "lr_schedule"}, own_rank={"rng"},
                      resharders={"model": expert_resharder(model, opt)})
    assert ck.resume(state) == 2 and progress["step"] == 2 and ck.resharded_from.path == info.path
    saved = dict(_flat(_saved(step_folder(folder, 2))))
    params = dict(model.named_parameters())
    checked = 0
    for name, p in params.items():
        pre = [f"rank{r}/model/model/{name}" for r in (0, 1)]
        moments = {m: [f"rank{r}/model/optim/state/{name}/{m}" for r in (0, 1)] for m in ("exp_avg", "exp_avg_sq")}
        if name.endswith((".moe.w1", ".moe.w2")):              # 8 experts: 4 per saved rank, joined in rank order
            assert not torch.equal(saved[pre[0]], saved[pre[1]])
            assert torch.equal(p.detach(), torch.cat([saved[k] for k in pre]))
            for m, keys in moments.items():
                assert torch.equal(opt.state[p][m], torch.cat([saved[k] for k in keys])), (name, m)
            checked += 1
        else:
            assert torch.equal(p.detach(), saved[pre[0]]), name
            for m, keys in moments.items():
                assert torch.equal(opt.state[p][m], saved[keys[0]]), (name, m)
        assert float(opt.state[p]["step"]) == 2
    assert checked == 2 * args.layers
    for l in range(args.layers):
        bias = model.blocks[l].moe.router.expert_bias
        assert bias.abs().max() > 0 and torch.equal(bias, saved[f"rank0/model/model/blocks.{l}.moe.router.expert_bias"])
    assert torch.equal(gen.get_state(), saved["rank0/rng/gen.data"])


def test_resharded_launches_continue_the_run(launches, tmp_path):
    """The 2-rank run's step-2 save (EP 2, the plan's pipeline) resumed by (a) 2 ranks in FSMoE's expert-sharded
    layout (EP 1 x 2 shards, the default pipeline): the same data, so steps 2-3 equal the uninterrupted run's to
    float rounding; (b) 4 ranks (EP 2 x 2 shards): rank 0 names both layouts, the run trains on (ranks 2-3 draw
    their own data) and saves as a 4-rank run."""
    a, b = tmp_path / "a", tmp_path / "b"
    for f in (a, b):
        shutil.copytree(step_folder(launches["straight"], 2), step_folder(f, 2))
    proc = _launch("--expert-shards", "2", "--steps", "4", "--checkpoint-dir", str(a), "--json")
    run = _run_json(proc)
    assert ("resharded: the save was made by 2 ranks (EP 2, expert shards 1); this run: 2 ranks (EP 1, expert "
            "shards 2); changed: ep_size, expert_shards, plan_inputs_digest, plan_config, r_fwd, r_bwd, wgrad, "
            "grad_slices") in proc.stderr, proc.stderr
    full = launches["full"]["losses"]
    assert run["start_step"] == 2 and len(run["losses"]) == 2
    for got, want in zip(run["losses"], full[2:]):
        assert abs(got - want) <= 1e-5 * abs(want), (run["losses"], full)
    proc = _launch("--expert-shards", "2", "--steps", "4", "--checkpoint-dir", str(b), "--json", nproc=4)
    run = _run_json(proc)
    assert ("resharded: the save was made by 2 ranks (EP 2, expert shards 1); this run: 4 ranks (EP 2, expert "
            "shards 2); changed: world size, expert_shards, plan_inputs_digest, plan_config") in proc.stderr, \
        proc.stderr
    assert run["start_step"] == 2 and len(run["losses"]) == 2 and all(math.isfinite(x) for x in run["losses"])
    meta = json.loads((step_folder(b, 4) / "adasched-checkpoint.json").read_text())
    assert meta["world_size"] == 4 and meta["run"]["expert_shards"] == 2 and meta["run"]["ep_size"] == 2


def test_expert_sharded_save_resumes_on_whole_experts_with_its_lr_schedule(tmp_path):
    """The other direction, with a decaying LR: a 2-rank expert-sharded run (1 node x 2 shards, rex with warmup)
    saved at step 2 resumes on 2 ranks of whole experts (EP 2): the shards of every expert joined (SwiGLU's gate and
    up halves), the scheduler and AdamW's param groups carried, so steps 2-3 use the uninterrupted run's LRs exactly
    and give its losses to float rounding."""
    rex = ["--lr-schedule", "rex", "--warmup-steps", "1", "--json"]
    full = _run_json(_launch("--expert-shards", "2", *rex, "--steps", "4", "--checkpoint-dir", str(tmp_path / "a"),
                             "--checkpoint-every", "2", "--checkpoint-keep", "0"))
    shutil.copytree(step_folder(tmp_path / "a", 2), step_folder(tmp_path / "b", 2))
    proc = _launch(*rex, "--steps", "4", "--checkpoint-dir", str(tmp_path / "b"))
    run = _run_json(proc)
    assert ("resharded: the save was made by 2 ranks (EP 1, expert shards 2); this run: 2 ranks (EP 2, expert "
            "shards 1); changed: ep_size, expert_shards") in proc.stderr, proc.stderr
    assert run["start_step"] == 2 and run["lrs"] == full["lrs"][2:] and len(set(full["lrs"])) == 4
    for got, want in zip(run["losses"], full["losses"][2:]):
        assert abs(got - want) <= 1e-5 * abs(want), (run["losses"], full["losses"])


def test_global_batch_resumes_on_another_world_size_with_the_same_batches(tmp_path, monkeypatch, capsys):
    """--global-batch: every rank replays one data generator and trains on its rows of the same batch, so a 2-rank
    run's step-2 save resumed by 4 ranks (EP 4) continues on the uninterrupted run's batches: steps 2-3 equal its
    losses to float rounding (with --batch, ranks 2-3 would draw batches of their own); one process trains the
    same run."""
    i = TINY.index("--batch")
    tiny = TINY[:i] + TINY[i + 2:] + ["--global-batch", "4", "--steps", "4", "--json"]
    full = _run_json(_launch(*tiny, "--checkpoint-dir", str(tmp_path / "a"), "--checkpoint-every", "2",
                             "--checkpoint-keep", "0", base=[]))
    assert len(set(full["losses"])) == 4
    # the same save with per-rank batches instead is another run (other data): refused
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = [a for a in tiny if a != "--json"]
    per_rank[per_rank.index("--global-batch"):per_rank.index("--global-batch") + 2] = ["--batch", "2"]
    assert main([*per_rank, "--checkpoint-dir", str(tmp_path / "a"), "--validate-only"]) == 2
    err = capsys.readouterr().err
    assert "saved by a different run (batch: saved None, now 2; global_batch: saved 4, now None)" in err, err
    shutil.copytree(step_folder(tmp_path / "a", 2), step_folder(tmp_path / "b", 2))
    proc = _launch(*tiny, "--checkpoint-dir", str(tmp_path / "b"), nproc=4, base=[])
    run = _run_json(proc)
    assert ("resharded: the save was made by 2 ranks (EP 2, expert shards 1); this run: 4 ranks (EP 4, expert "
            "shards 1); changed: world size, ep_size") in proc.stderr, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["global_batch"] == 4
    assert run["start_step"] == 2
    for got, want in zip(run["losses"], full["losses"][2:], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (run["losses"], full["losses"])
    proc = _launch(*tiny, nproc=1, base=[])                    # one process, the whole batch: the same run
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one,) = json.loads(proc.stdout.strip().splitlines()[-1])["runs"]
    for got, want in zip(one["losses"], full["losses"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (one["losses"], full["losses"])


@pytest.mark.parametrize("argv, world, line", [
    (["--global-batch", "6"], "4", "error: --global-batch: 6 must be a positive multiple of the 4 rank(s)"),
    (["--global-batch", "0"], "1", "error: --global-batch: 0 must be a positive multiple of the 1 rank(s)"),
    (["--global-batch", "4", "--batch", "2"], "2", "error: --global-batch: give --batch (sequences per rank) or "
                                                   "--global-batch (over all ranks), not both"),
    (["--global-batch", "4", "--compare-schedules"], "1", "error: --global-batch: not used by --compare-schedules"),
])
def test_global_batch_bad_input(argv, world, line, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.chdir(tmp_path)
    assert main(["--steps", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_resuming_a_save_without_router_statistics_says_what_they_cover(one_rank_env, monkeypatch, capsys, tmp_path):
    """A save written before the router statistics travelled in saves resumes (its progress lacks them) and
    --router-stats-out then covers the resumed steps only: a note says so on stderr (it was silent)."""
    from adasched.runtime.checkpoint import Values

    real = Values.state_dict
    with monkeypatch.context() as m:  # a save as the code before 2026-11-30 wrote it
        m.setattr(Values, "state_dict", lambda self: {k: v for k, v in real(self).items() if k != "router_k_sums"})
        _one_rank(capsys, ["--steps", "2", "--checkpoint-dir", str(tmp_path)])
    stats = tmp_path / "stats.json"
    rc = main([*TINY, "--steps", "4", "--checkpoint-dir", str(tmp_path), "--router-stats-out", str(stats)])
    out = capsys.readouterr().out  # (rank 0's notes: stdout without --json)
    assert rc == 0 and stats.exists(), out
    assert "predates the router statistics in saves: --router-stats-out covers steps 2..3 only" in out, out
    # a save that has them: no note, the whole run
    rc = main([*TINY, "--steps", "6", "--checkpoint-dir", str(tmp_path), "--router-stats-out", str(stats)])
    out = capsys.readouterr().out
    assert rc == 0 and "resumed from" in out and "predates" not in out, out


def test_a_second_run_on_the_same_checkpoint_dir_is_one_line(one_rank_env, tmp_path, capsys, checkpoint_lock_holder):
    """Another process holds the folder (a first run still training): the second run stops with one line naming
    its pid, exit 2, and leaves the first's saves alone; before, it resumed, pruned and committed beside it."""
    ck = tmp_path / "ck"
    run = ["--steps", "2", "--checkpoint-dir", str(ck)]
    _one_rank(capsys, run)
    holder = checkpoint_lock_holder(ck)
    try:
        before = _tree(tmp_path)
        assert main([*TINY, *run[:1], "4", *run[2:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {ck}: another run is using this checkpoint folder (.adasched-lock is locked by pid "
                       f"{holder.pid}); wait for it to end or give a new --checkpoint-dir"], err
        assert _tree(tmp_path) == before
    finally:
        checkpoint_lock_holder.release()
    assert _one_rank(capsys, [*run[:1], "4", *run[2:]])["start_step"] == 2  # the holder gone, it resumes

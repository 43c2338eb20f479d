"""Checkpoint/resume of the multi-adapter LoRA trainer (launch/train_lora.py): a step is one plan microbatch; a
run resumed from a save mid global batch (partly accumulated gradients and loss sums, Adam state, a multi-job
microbatch just done) writes the same losses.json and the same adapter tensors, bit for bit, as the uninterrupted
run - on 1 process and on the 2-stage 1F1B pipeline over 2 gloo ranks (which drains at every save point); a save
of one number of stages resumes on another (resharded: equal to rounding); periodic saves keep the right folders;
bad checkpoint input is one `error:` line, exit 2, nothing written."""
from __future__ import annotations

import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from adasched.launch.train_lora import main
from adasched.runtime.checkpoint import committed_steps, find_checkpoint, load_templates, saved_entries, step_folder
from lora_ranks import launch_two_ranks, rank_main

# planned for 3 stages: 7 microbatches, [(0,0)] [(0,0),(1,0)] [(1,0)] [] [(0,1)] [(0,1),(1,1)] [(1,1)]
JOBS = {
    "capacity": 256, "stages": 3, "global_batches": 2, "seed": 5, "layers": 3,  # cost model's; the trainer runs 2
    "jobs": [
        {"name": "pa",
         "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
         "lengths": {"dist": "lognormal", "median": 20, "sigma": 0.6, "min": 3, "max": 60}, "global_batch_size": 10,
         "lr": 0.01},
        {"name": "pb", "adapter": {"r": 2, "alpha": 4, "target_modules": "all-linear"},
         "lengths": {"dist": "lognormal", "median": 30, "sigma": 0.4, "min": 3, "max": 60}, "global_batch_size": 10,
         "lr": 0.02},
    ],
}
MODEL = ["--vocab", "32", "--hidden", "16", "--layers", "2", "--heads", "2", "--ffn", "24", "--max-positions", "64",
         "--reference", "--seed", "3"]


@pytest.fixture(scope="module")
def plan_files(tmp_path_factory):
    """The jobs file and a plan made from it without the time-limited MILP (the same plan in every run)."""
    from adasched.planner.lorafusion.jobs import build_workload, parse_jobs
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.planner.plan import save_plan
    from adasched.profiler.profile import load_profile

    d = tmp_path_factory.mktemp("lora_ck_plan")
    (d / "jobs.yaml").write_text(yaml.safe_dump(JOBS))
    plan = build_plan(build_workload(parse_jobs(JOBS), label="t"), load_profile("h100-sxm"), use_milp=False)
    segs = [[(s.job, s.global_batch) for s in mb.segments] for mb in plan.microbatches]
    assert segs == [[(0, 0)], [(0, 0), (1, 0)], [(1, 0)], [], [(0, 1)], [(0, 1), (1, 1)], [(1, 1)]]
    save_plan(plan, d / "plan.json")
    return d / "jobs.yaml", d / "plan.json"


def _files(root: Path) -> dict[str, int]:
    """Every file and folder under ``root`` with its files' modification times (the writability probes of the
    option checks touch the folders' own times)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns if p.is_file() else 0 for p in root.rglob("*")}


def _assert_same_outputs(a: Path, b: Path) -> None:
    """losses.json equal as text (json writes floats as repr: every bit) and every adapter tensor equal."""
    from safetensors.torch import load_file

    assert (b / "losses.json").read_text() == (a / "losses.json").read_text()
    losses = json.loads((a / "losses.json").read_text())
    assert losses["optimizer_steps"] == {"pa": 2, "pb": 2} and len(losses["microbatch"]) == 6
    for job in ("pa", "pb"):
        sa = load_file(str(a / job / "adapter_model.safetensors"))
        sb = load_file(str(b / job / "adapter_model.safetensors"))
        assert sa.keys() == sb.keys() and len(sa) > 0
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{job} {k}"
        # the launcher's docstring promises the same files byte for byte
        name = "adapter_model.safetensors"
        assert (a / job / name).read_bytes() == (b / job / name).read_bytes()
        assert (a / job / "adapter_config.json").read_text() == (b / job / "adapter_config.json").read_text()


def test_single_process_resume_mid_global_batch_is_bit_exact(plan_files, tmp_path, capfd):
    jobs, plan = plan_files
    straight, first, resumed, ck = (tmp_path / n for n in ("straight", "first", "resumed", "ck"))
    assert main(["--plan", str(plan), "--out", str(straight)] + MODEL) == 0
    # (b) every 2 steps, keep 2: saves 2, 4, 6 and the end, 7; the newest two stay
    assert main(["--plan", str(plan), "--out", str(first), "--checkpoint-dir", str(ck), "--checkpoint-every", "2",
                 "--checkpoint-keep", "2"] + MODEL) == 0
    assert committed_steps(ck) == [6, 7] and (ck / "plan.json").is_file()
    assert not [p for p in ck.iterdir() if p.name.endswith(".partial")]
    _assert_same_outputs(straight, first)  # saving changes nothing
    # (a) killed after the save of step 6 (job pb's 2nd global batch half accumulated): resume the newest save,
    # with --jobs this time: the run executes the plan saved in the checkpoint folder
    shutil.rmtree(step_folder(ck, 7))
    capfd.readouterr()
    assert main(["--jobs", str(jobs), "--out", str(resumed), "--checkpoint-dir", str(ck)] + MODEL) == 0
    err = capfd.readouterr().err
    assert f"resumed from {step_folder(ck, 6)} at step 6\n" in err
    _assert_same_outputs(straight, resumed)
    assert committed_steps(ck) == [6, 7]
    # the fused call's fallback without TRITON_INTERPRET (train_lora.sh) runs the torch reference that --reference
    # selects, bit for bit: a --reference save resumes without --reference there
    import adasched.kernels.lora as lora_kernels

    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setattr(lora_kernels, "INTERPRET", False)
        fallback = tmp_path / "fallback"
        argv = ["--plan", str(plan), "--out", str(fallback), "--checkpoint-dir", str(ck), "--load-step", "6"]
        assert main(argv + [a for a in MODEL if a != "--reference"]) == 0
    assert json.loads(capfd.readouterr().out)["kernels"] == "torch"
    _assert_same_outputs(straight, fallback)
    # everything done: says so, exits 0 and writes the saved adapters
    again = tmp_path / "again"
    assert main(["--plan", str(plan), "--out", str(again), "--checkpoint-dir", str(ck)] + MODEL) == 0
    assert "nothing left to train" in capfd.readouterr().err
    _assert_same_outputs(straight, again)

    # (c) bad input: one error line, exit 2, nothing written anywhere
    # a plan with the saved one's inputs digest but other contents (pa's lr): only the plan digest tells them apart
    edited = json.loads(plan.read_text())
    edited["jobs"][0]["lr"] = 0.5
    other_plan = tmp_path / "other_plan.json"
    other_plan.write_text(json.dumps(edited))
    # the plan files rank 0 writes before training, unwritable: refused up front (found by --check too), where a
    # 2-rank run passed --check and died mid-run with a traceback
    (tmp_path / "planfolder" / "plan.json").mkdir(parents=True)
    (tmp_path / "fresh_ck" / "plan.json").mkdir(parents=True)
    before = _files(tmp_path)
    bad = [
        (["--out", str(tmp_path / "planfolder")], f"--out: {tmp_path / 'planfolder' / 'plan.json'} is a directory"),
        (["--checkpoint-dir", str(tmp_path / "fresh_ck")], f"--checkpoint-dir: {tmp_path / 'fresh_ck' / 'plan.json'}"),
        (["--checkpoint-dir", str(ck), "--seed", "4"], "saved by a different run (seed: saved 3, now 4)"),
        (["--checkpoint-dir", str(ck), "--hidden", "8"], "saved by a different run (model: "),
        (["--checkpoint-dir", str(ck), "--load-step", "3"], "--load-step: 3 was not saved in"),
        (["--checkpoint-every", "2"], "--checkpoint-every: needs --checkpoint-dir"),
        (["--load-step", "2"], "--load-step: needs --checkpoint-dir"),
        (["--checkpoint-dir", str(ck / "plan.json")], "--checkpoint-dir: "),
        (["--checkpoint-dir", str(ck), "--checkpoint-every", "-1"], "--checkpoint-every: -1 must be >= 0"),
    ]
    for extra, needle in bad:
        argv = ["--plan", str(plan), "--out", str(tmp_path / "bad")] + MODEL + extra
        assert main(argv) == 2, extra
        err = capfd.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (extra, err)
    # another jobs file (other inputs digest) against the saved plan
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(dict(JOBS, seed=6)))
    before[str(other.relative_to(tmp_path))] = other.stat().st_mtime_ns
    assert main(["--jobs", str(other), "--out", str(tmp_path / "bad"), "--checkpoint-dir", str(ck)] + MODEL) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "inputs_digest: saved" in err, err
    # planning options on a resumed run (it executes the saved plan): other values than its own are refused (they
    # were ignored without a word); an unknown profile is its own error
    for extra, want in ((["--profile", "no-such-profile"], "error: --profile: 'no-such-profile' is neither"),
                        (["--profile", "a100-64-flexsp-paper"], "error: --profile: 'a100-64-flexsp-paper' is not the "
                                                                 f"profile of the saved plan a resumed run executes "
                                                                 f"({ck / 'plan.json'}: h100-sxm)"),
                        (["--time-limit", "7"], "error: --time-limit: 7 s, but the saved plan a resumed run "
                                                f"executes ({ck / 'plan.json'}) was made with None")):
        assert main(["--jobs", str(jobs), "--out", str(tmp_path / "bad"), "--checkpoint-dir", str(ck)] + MODEL
                    + extra) == 2
        err = capfd.readouterr().err
        assert err.startswith(want) and err.count("\n") == 1, err
    # the profile it was planned with, given again (the same command re-run): resumes (here: nothing left)
    assert main(["--jobs", str(jobs), "--out", str(tmp_path / "again2"), "--checkpoint-dir", str(ck),
                 "--profile", "h100-sxm"] + MODEL) == 0
    assert "nothing left to train" in capfd.readouterr().err
    before[str((tmp_path / "again2").relative_to(tmp_path))] = 0
    before.update({str(p.relative_to(tmp_path)): p.stat().st_mtime_ns
                   for p in (tmp_path / "again2").rglob("*") if p.is_file()})
    before.update({str(p.relative_to(tmp_path)): 0 for p in (tmp_path / "again2").rglob("*") if p.is_dir()})
    assert main(["--plan", str(other_plan), "--out", str(tmp_path / "bad"), "--checkpoint-dir", str(ck)] + MODEL) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "(plan_sha256: saved" in err, err
    assert _files(tmp_path) == before
    # a committed save whose rank file is damaged (DCP raises a BaseException with every rank's traceback)
    (step_folder(ck, 6) / "__0_0.distcp").write_bytes(b"not a checkpoint")
    before = _files(tmp_path)
    assert main(["--plan", str(plan), "--out", str(tmp_path / "bad"), "--checkpoint-dir", str(ck), "--load-step",
                 "6"] + MODEL) == 2
    err = capfd.readouterr().err
    assert err.startswith(f"error: {step_folder(ck, 6)}: cannot load this save") and err.count("\n") == 1, err
    assert _files(tmp_path) == before


def _worker_rank1_load_fails(rank: int, world: int, port: int, argv: list[str], rcs) -> None:
    """Rank 1's own trainer state does not load (a damaged blob), rank 0's does."""
    if rank == 1:
        from adasched.runtime.lora_trainer import LoRATrainerState

        def refuse(self, state):
            raise ValueError("checkpoint: the trainer state cannot be read (injected on rank 1)")

        LoRATrainerState.load_state_dict = refuse
    rank_main(rank, world, port, argv, rcs)


def _worker_rank1_sees_no_save(rank: int, world: int, port: int, argv: list[str], rcs) -> None:
    """Rank 1's node has no copy of the saves (no shared file system): find_checkpoint finds none there."""
    if rank == 1:
        import adasched.runtime.checkpoint as ckpt

        ckpt.find_checkpoint = lambda *a, **k: None
    rank_main(rank, world, port, argv, rcs)


def _pipeline(argv: list[str], worker=rank_main) -> dict:
    return launch_two_ranks(argv + ["--timeout", "60"], worker)


def _assert_close_outputs(a: Path, b: Path) -> None:
    """The same optimizer steps, every loss and adapter tensor equal to float rounding (rtol 1e-5, atol 1e-6)."""
    from safetensors.torch import load_file

    la, lb = json.loads((a / "losses.json").read_text()), json.loads((b / "losses.json").read_text())
    assert la["optimizer_steps"] == lb["optimizer_steps"] == {"pa": 2, "pb": 2}
    torch.testing.assert_close(torch.tensor(lb["microbatch"]), torch.tensor(la["microbatch"]), rtol=1e-5, atol=1e-6)
    for job in ("pa", "pb"):
        torch.testing.assert_close(torch.tensor(lb["per_global_batch"][job]),
                                   torch.tensor(la["per_global_batch"][job]), rtol=1e-5, atol=1e-6)
        sa = load_file(str(a / job / "adapter_model.safetensors"))
        sb = load_file(str(b / job / "adapter_model.safetensors"))
        assert sa.keys() == sb.keys() and len(sa) > 0
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{job} {k}: {m}")


def test_pipeline_resume_is_bit_exact_and_reshards_another_world_size(plan_files, tmp_path, capfd):
    _, plan = plan_files
    straight, first, resumed, ck = (tmp_path / n for n in ("straight", "first", "resumed", "ck"))
    assert _pipeline(["--plan", str(plan), "--out", str(straight)] + MODEL) == {0: 0, 1: 0}
    # a save after every microbatch: the pipeline drains 7 times and still computes the same bits
    assert _pipeline(["--plan", str(plan), "--out", str(first), "--checkpoint-dir", str(ck), "--checkpoint-every",
                      "1", "--checkpoint-keep", "0"] + MODEL) == {0: 0, 1: 0}
    assert committed_steps(ck) == list(range(1, 8))
    assert sorted(p.name for p in step_folder(ck, 2).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    _assert_same_outputs(straight, first)
    # --checkpoint-async: the 7 saves written in the background while the pipeline goes on, all committed at the end,
    # the same outputs; a run resumed from its step-3 save (pb's 1st global batch done) finishes the same
    ck_async = tmp_path / "ck_async"
    argv = ["--plan", str(plan), "--out", str(tmp_path / "first_async"), "--checkpoint-dir", str(ck_async),
            "--checkpoint-every", "1", "--checkpoint-keep", "0", "--checkpoint-async"]
    assert _pipeline(argv + MODEL) == {0: 0, 1: 0}
    assert committed_steps(ck_async) == list(range(1, 8)) and not list(ck_async.glob("*.partial"))
    _assert_same_outputs(straight, tmp_path / "first_async")
    assert _pipeline(["--plan", str(plan), "--out", str(tmp_path / "resumed_async"), "--checkpoint-dir",
                      str(ck_async), "--load-step", "3", "--checkpoint-keep", "0"] + MODEL) == {0: 0, 1: 0}
    _assert_same_outputs(straight, tmp_path / "resumed_async")
    # resume after the multi-job microbatch 1: pa's 1st global batch stepped, pb's half accumulated on both stages
    capfd.readouterr()
    assert _pipeline(["--plan", str(plan), "--out", str(resumed), "--checkpoint-dir", str(ck), "--load-step", "2",
                      "--checkpoint-keep", "0"] + MODEL) == {0: 0, 1: 0}
    assert f"resumed from {step_folder(ck, 2)} at step 2\n" in capfd.readouterr().err
    _assert_same_outputs(straight, resumed)
    # everything done: both stages load the end's save, gather their layers' adapters and rank 0 writes them
    again = tmp_path / "again"
    t0 = time.monotonic()
    assert _pipeline(["--plan", str(plan), "--out", str(again), "--checkpoint-dir", str(ck)] + MODEL) == {0: 0, 1: 0}
    again_s = time.monotonic() - t0  # two ranks' start-up and a load, on this host at its present load
    assert "nothing left to train: all 7 steps" in capfd.readouterr().err
    _assert_same_outputs(straight, again)
    # only rank 1's state fails to load: every rank stops at once (rank 0 would wait on rank 1 until --timeout),
    # exit 2, and rank 0 prints rank 1's line
    t0 = time.monotonic()
    assert _pipeline(["--plan", str(plan), "--out", str(tmp_path / "bad"), "--checkpoint-dir", str(ck)] + MODEL,
                     worker=_worker_rank1_load_fails) == {0: 2, 1: 2}
    # relative to the run above, not a fixed 50 s: a loaded host slows both; waiting out --timeout adds 60 s
    assert time.monotonic() - t0 < again_s + 40
    err = capfd.readouterr().err
    assert "error: checkpoint: the trainer state cannot be read (injected on rank 1)\n" in err, err
    assert err.count("error: ") == 1 and not (tmp_path / "bad").exists(), err
    # rank 1 sees no save where rank 0 sees step 7 (nodes without a shared file system): one line, exit 2 at once
    # (hunt finding: the fresh rank's plan broadcast paired with the resuming rank's output check - no line at all)
    assert _pipeline(["--plan", str(plan), "--out", str(tmp_path / "bad"), "--checkpoint-dir", str(ck)] + MODEL,
                     worker=_worker_rank1_sees_no_save) == {0: 2, 1: 2}
    err = capfd.readouterr().err
    assert (f"error: {ck}: the ranks see different saves there (rank 0: step 7, rank 1: none); --checkpoint-dir "
            f"must be one folder every rank shares\n") in err and err.count("error: ") == 1, err
    assert not (tmp_path / "bad").exists()
    # another number of stages reshards: one process resumes the 2 stages' step-2 save (pb's 1st global batch half
    # accumulated on both stages, pa's Adam state on both) and finishes as the uninterrupted pipeline did, to
    # rounding (one process sums in another order, as test_lora_pipeline's comparison)
    ck1 = tmp_path / "ck1"
    shutil.copytree(ck, ck1)
    one = tmp_path / "one"
    assert main(["--plan", str(plan), "--out", str(one), "--checkpoint-dir", str(ck1), "--load-step", "2",
                 "--checkpoint-every", "1", "--checkpoint-keep", "0"] + MODEL) == 0
    err = capfd.readouterr().err
    assert "resharded: the save was made by 2 pipeline stage(s); this run has 1\n" in err, err
    _assert_close_outputs(straight, one)
    assert committed_steps(ck1) == list(range(1, 8))  # 3..7 now the 1-process run's
    assert json.loads((step_folder(ck1, 5) / "adasched-checkpoint.json").read_text())["world_size"] == 1
    # and back: 2 stages resume the 1-process step-5 save (microbatch 4 done: pa's 2nd global batch half
    # accumulated, its gradients on the matrices of both new stages)
    info = find_checkpoint(ck1, 5)
    blob = load_templates(saved_entries(info), ["rank0/trainer.blob"])
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(blob, checkpoint_id=str(info.path), no_dist=True)
    grads = torch.load(io.BytesIO(blob["rank0/trainer.blob"]), weights_only=True)["grads"]
    assert len(grads[0]) > 0 and len(grads[1]) == 0  # pa (job 0) mid global batch, pb between its batches
    two = tmp_path / "two"
    assert _pipeline(["--plan", str(plan), "--out", str(two), "--checkpoint-dir", str(ck1), "--load-step", "5",
                      "--checkpoint-keep", "0"] + MODEL) == {0: 0, 1: 0}
    assert "resharded: the save was made by 1 pipeline stage(s); this run has 2\n" in capfd.readouterr().err
    _assert_close_outputs(straight, two)
    # a save of another run is still refused, on any number of stages
    before = _files(tmp_path)
    assert main(["--plan", str(plan), "--out", str(tmp_path / "bad"), "--checkpoint-dir", str(ck)] + MODEL[:-1]
                + ["4"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "seed: saved 3, now 4" in err, err
    assert _files(tmp_path) == before


def test_trainer_state_refuses_a_damaged_or_unsafe_blob(plan_files):
    """LoRATrainerState's blob is read with weights_only: junk, a pickled object with code, or a blob without the
    trainer's fields is a ValueError (one `error:` line in the launcher), and the state it was loaded into is kept."""
    import io
    from collections import OrderedDict

    from adasched.planner.lorafusion.plan import LoRAPlan
    from adasched.planner.plan import load_plan
    from adasched.runtime.lora_model import TinyCausalLM, TinyLMConfig
    from adasched.runtime.lora_trainer import build_adapters, trainer_state

    plan = load_plan(plan_files[1], expect=LoRAPlan)
    model = TinyCausalLM(TinyLMConfig(vocab_size=32, hidden=16, layers=2, heads=2, ffn_hidden=24, max_positions=64))
    st = trainer_state(model, build_adapters(model, plan, seed=3), plan)
    good = st.state_dict()
    a0 = [t.clone() for _, t in st._params(0)]
    unsafe = io.BytesIO()
    torch.save({"cursor": 1, "hook": OrderedDict, "call": os.getcwd}, unsafe)  # globals outside weights_only
    partial = io.BytesIO()
    torch.save({"cursor": 1}, partial)
    for blob, needle in ((b"junk", "cannot be read"), (good["blob"][:100], "cannot be read"),
                         (unsafe.getvalue(), "cannot be read"), (partial.getvalue(), "lacks ['grads'")):
        with pytest.raises(ValueError, match=r"^checkpoint: the trainer state") as info:
            st.load_state_dict({"blob": blob})
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert st.cursor == 0 and all(torch.equal(x, t) for x, (_, t) in zip(a0, st._params(0)))
    st.load_state_dict(good)  # the state's own blob still loads
    assert st.cursor == 0


def test_a_resumed_plan_runs_on_the_stages_its_dependency_rule_allows(tmp_path, monkeypatch, capfd):
    """Resharding cannot re-plan (another plan is another run): a save whose plan allows at most 2 pipeline stages
    (the tiny preset, 4 layers) is refused on 3 naming the saved plan and the largest stage count; 2 is fine."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--jobs", "tiny", "--layers", "4", "--reference"]
    assert main([*tiny, "--out", "t1", "--checkpoint-dir", "tck", "--checkpoint-every", "3"]) == 0
    capfd.readouterr()
    assert main(["--check", "--world", "3", *tiny, "--out", "t2", "--checkpoint-dir", "tck", "--load-step", "9"]) == 2
    assert capfd.readouterr().err.splitlines() == [
        "error: tck/plan.json: the saved plan a resumed run executes runs on at most 2 pipeline stage(s), not 3: "
        "resume on <= 2 ranks, or start in a new --checkpoint-dir"]
    assert main(["--check", "--world", "2", *tiny, "--out", "t2", "--checkpoint-dir", "tck", "--load-step", "9"]) == 0
    assert not (tmp_path / "t2").exists()


def test_a_save_of_the_position_keyed_trainer_is_refused(plan_files, tmp_path, capfd):
    """31st session's review: the synthetic data and the adapters' init are keyed by job name since 2026-12-02; a
    save of the trainer before (keyed by job position, no `data` in its run identity) resumed without a word and
    the run mixed the two data streams. Its identity lacks the entry now, so it is refused in one line."""
    from adasched.runtime.checkpoint import META_NAME

    _, plan = plan_files
    ck = tmp_path / "ck"
    assert main(["--plan", str(plan), "--out", str(tmp_path / "first"), "--checkpoint-dir", str(ck),
                 "--checkpoint-every", "3", "--checkpoint-keep", "0"] + MODEL) == 0
    meta = step_folder(ck, 3) / META_NAME
    doc = json.loads(meta.read_text())
    assert doc["run"]["data"] == "job-name"
    del doc["run"]["data"]
    meta.write_text(json.dumps(doc))
    capfd.readouterr()
    out = tmp_path / "resumed"
    assert main(["--plan", str(plan), "--out", str(out), "--checkpoint-dir", str(ck), "--load-step", "3"] + MODEL) == 2
    err = capfd.readouterr().err
    assert err == (f"error: {meta}: saved by a different run (data: saved None, now 'job-name'); use the same "
                   "settings or a new --checkpoint-dir\n"), err
    assert not out.exists()


def test_saves_hold_the_seeds_python_generator(plan_files, tmp_path, capfd):
    """train_lora seeds Python's ``random`` with --seed (nothing draws from it): the saved generator state was the
    process's unseeded one, so two uninterrupted runs' saves differed in it (h40)."""
    import random

    from adasched.runtime.checkpoint import _py_state_flat

    jobs, plan = plan_files
    states, saved = [], []
    for k in range(2):
        random.seed(os.urandom(16))  # whatever the process held before
        ck = tmp_path / f"ck{k}"
        assert main(["--plan", str(plan), "--out", str(tmp_path / f"o{k}"), "--checkpoint-dir", str(ck),
                     "--checkpoint-every", "3"] + MODEL) == 0
        states.append(random.getstate())
        # what the saves hold (the entry a resume restores), not only this process's generator afterwards
        for step in committed_steps(ck):
            info = find_checkpoint(ck, step)
            keys = [key for key in saved_entries(info) if key.endswith("rng.python")]
            assert keys == ["rank0/rng.python"], keys
            entry = load_templates(saved_entries(info), keys)
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(entry, checkpoint_id=str(info.path), no_dist=True)
            saved.append((k, step, list(entry[keys[0]])))
    seeded = list(_py_state_flat(random.Random(3).getstate()))  # MODEL's --seed 3, untouched after the seeding
    assert states[0] == states[1] == random.Random(3).getstate()
    assert len(saved) >= 4 and {k for k, _, _ in saved} == {0, 1}
    for k, step, flat in saved:
        assert flat == seeded, f"run {k}, step {step}: the saved Python generator is not the seeded one"
    capfd.readouterr()

"""2-stage 1F1B pipeline over 2 gloo ranks (launch/train_lora.py) gives the same losses, optimizer steps and
adapters as single-process training of the same plan."""
from __future__ import annotations

import json
import os
import zlib

import pytest
import torch
import yaml

from adasched.launch.train_lora import main
from lora_ranks import launch_two_ranks

JOBS = {
    "capacity": 256, "stages": 3,  # planned for 3 stages (no-op slots), run on 2 ranks
    "global_batches": 3, "seed": 5, "layers": 3,  # the cost model's (a stage holds >= 1 layer); the trainer runs 2
    "jobs": [
        {"name": "pa", "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
         "lengths": {"dist": "lognormal", "median": 20, "sigma": 0.6, "min": 3, "max": 60}, "global_batch_size": 10, "lr": 0.01},
        {"name": "pb", "adapter": {"r": 2, "alpha": 4, "target_modules": "all-linear"},
         "lengths": {"dist": "lognormal", "median": 30, "sigma": 0.4, "min": 3, "max": 60}, "global_batch_size": 10, "lr": 0.02},
    ],
}
MODEL = ["--vocab", "32", "--hidden", "16", "--layers", "2", "--heads", "2", "--ffn", "24", "--max-positions", "64"]


def test_two_stage_pipeline_matches_single_process(tmp_path):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(yaml.safe_dump(JOBS))
    single, piped = tmp_path / "single", tmp_path / "pipe"
    assert main(["--jobs", str(jobs), "--out", str(single), "--reference", "--time-limit", "0.1"] + MODEL) == 0
    plan = json.loads((single / "plan.json").read_text())
    assert plan["stages"] == 3
    assert any(len(mb["segments"]) > 1 for mb in plan["microbatches"])  # multi-adapter microbatches
    assert any(not mb["segments"] for mb in plan["microbatches"])  # and no-op microbatches

    argv = ["--plan", str(single / "plan.json"), "--out", str(piped), "--reference", "--timeout", "60"] + MODEL
    assert launch_two_ranks(argv) == {0: 0, 1: 0}

    a = json.loads((single / "losses.json").read_text())
    b = json.loads((piped / "losses.json").read_text())
    assert a["optimizer_steps"] == b["optimizer_steps"] == {"pa": 3, "pb": 3}
    for job in ("pa", "pb"):
        torch.testing.assert_close(torch.tensor(b["per_global_batch"][job]), torch.tensor(a["per_global_batch"][job]),
                                   rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    for job in ("pa", "pb"):
        sa = load_file(str(single / job / "adapter_model.safetensors"))
        sb = load_file(str(piped / job / "adapter_model.safetensors"))
        assert sa.keys() == sb.keys() and len(sa) > 0
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{job} {k}: {m}")


def test_launcher_rejects_a_plan_the_model_cannot_run(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--jobs", "tiny", "--out", str(out), "--reference", "--max-positions", "8"]) == 2
    err = capsys.readouterr().err
    # names the option to change and where the samples came from (it said "error: plan: ...")
    assert err.startswith("error: --max-positions: 8 is shorter than the longest sample, ")
    assert err.rstrip().endswith("tokens, of tiny") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["--hidden", "-4"], "error: --hidden: must be >= 1, got -4"),
    (["--max-positions", "0"], "error: --max-positions: must be >= 1, got 0"),
    (["--hidden", "30", "--heads", "4"], "error: --hidden: 30 must be divisible by --heads 4"),
    (["--world", "2"], "error: --world: only with --check"),
    (["--check", "--world", "3"], "error: --layers: 2 layers cannot be split over 3 pipeline stages"),
    (["--check", "--timeout", "-5"], "error: --timeout: must be > 0 seconds, got -5.0"),
    (["--check", "--timeout", "1e-9"], "error: --timeout: must be >= 1 seconds, got 1e-09"),  # (0 ms: store timed out)
    (["--time-limit", "0"], "error: --time-limit: must be > 0 seconds, got 0.0"),
    (["--seed", str(2 ** 63)], f"error: --seed: must be in [-2**63, 2**63), got {2 ** 63}"),
    # hunt finding: the planner refused it as 'seed: Input should be greater than or equal to 0'
    (["--seed", "-1"], "error: --seed: must be >= 0 when train_lora plans (--jobs): it is the MILP solver seed too, "
                       "got -1"),
])
def test_launcher_options_fail_on_one_line_naming_the_option(tmp_path, capsys, argv, needle):
    out = tmp_path / "o"
    assert main(["--jobs", "tiny", "--out", str(out), "--reference"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(needle) and err.count("\n") == 1, err
    assert not out.exists()


def test_check_mode_validates_for_the_torchrun_world_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--jobs", "tiny", "--out", str(out), "--check", "--world", "2"]) == 0
    assert capsys.readouterr().out.startswith("ok: ") and not out.exists()


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    assert main(["--jobs", "tiny", "--out", str(out), "--check", "--world", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out: {out} exists and is not a folder") and err.count("\n") == 1, err
    assert out.read_text() == "not a folder"


def test_argparse_errors_are_one_line(capsys):
    """Walk finding: a mistyped option printed the launcher's whole usage text (20+ lines) before the error."""
    with pytest.raises(SystemExit) as ex:
        main(["--out", "x", "--hidden", "7.5"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --hidden: invalid int value: '7.5'") and err.count("\n") == 1, err


def test_summary_says_which_kernels_ran(tmp_path, monkeypatch, capsys):
    """Review finding: without TRITON_INTERPRET (launch/train_lora.sh on a CPU) every fused call fell back to the
    torch reference with a warning, yet the summary said "fused": true."""
    from adasched.launch.train_lora import parse_args, run

    monkeypatch.setattr("adasched.kernels.lora.backend_for", lambda x: "torch")  # as without the interpreter
    s = run(parse_args(["--jobs", "tiny", "--out", str(tmp_path / "a"), "--time-limit", "0.1"]))
    assert (s["fused"], s["kernels"]) == (False, "torch")
    s = run(parse_args(["--jobs", "tiny", "--out", str(tmp_path / "b"), "--time-limit", "0.1", "--reference"]))
    assert (s["fused"], s["kernels"]) == (False, "reference")
    out = capsys.readouterr().out
    assert out.count('"kernels": "torch"') == 1 and out.count('"kernels": "reference"') == 1


def test_launch_script_out_dir_is_optional(tmp_path):
    """Review finding: `train_lora.sh --jobs FILE` (OUT_DIR left out, as its usage line allows) took "--jobs" as the
    output folder and failed with "argument --out: expected one argument"; now the options reach the launcher."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "launch" / "train_lora.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", str(script), "--jobs", "tiny", "--hidden", "-4"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: --hidden: must be >= 1, got -4\n", r.stderr
    assert list(tmp_path.iterdir()) == []  # the default runs/lora was not created


@pytest.mark.parametrize("script,extra,nproc", [("train_lora.sh", ["--world", "1"], "2"),
                                                 ("train_lora.sh", ["--world=3"], "2"),
                                                 ("train_lora.sh", ["--check"], "2"),
                                                 ("train_moe.sh", ["--validate-only"], "2")])
def test_launch_scripts_refuse_options_they_set_themselves(tmp_path, script, extra, nproc):
    """Hunt finding: train_lora.sh pre-checked with `--check --world NPROC "$@"`, so a user's --world was checked
    instead of NPROC, then every torchrun worker refused it (a traceback, exit 1); --check (train_moe.sh:
    --validate-only) made every rank check and exit 0 without training. One line, exit 2, no torchrun now."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "launch" / script
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHON=sys.executable, NPROC=nproc)
    r = subprocess.run(["bash", str(path), *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {extra[0]}: set by this script"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_large_seeds_train():
    """Review finding: seeds derived as seed * 1_000_003 + sample overflowed torch's generator for --seed >= ~2**44
    ("error: Overflow when unpacking long long"); they are folded into its range now (in-range ones unchanged)."""
    from adasched.runtime.lora_model import TinyCausalLM, TinyLMConfig, seed64
    from adasched.runtime.lora_trainer import SyntheticLoRAData, build_adapters, train_plan

    assert seed64(5) == 5 and seed64(-5) == -5 and seed64(2 ** 64 + 7) == 7
    big, small = SyntheticLoRAData(32, seed=2 ** 62), SyntheticLoRAData(32, seed=3)
    assert torch.equal(big.tokens("b", 4, 9), big.tokens("b", 4, 9)) and not torch.equal(big.tokens("b", 4, 9),
                                                                                           small.tokens("b", 4, 9))
    g = torch.Generator().manual_seed(3 * 1_000_003 + zlib.crc32(b"a") * 104_729 + 4)  # in range: used as is
    assert int(small.tokens("a", 4, 2)[0]) == int(torch.randint(0, 32, (1,), generator=g))
    from adasched.planner.lorafusion.jobs import build_workload, parse_jobs
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    jobs = dict(JOBS, stages=1, global_batches=1)
    jobs["jobs"] = [dict(j, global_batch_size=2) for j in JOBS["jobs"]]
    plan = build_plan(build_workload(parse_jobs(jobs), label="t"), load_profile("h100-sxm"), use_milp=False,
                      seed=2 ** 63 - 1)
    model = TinyCausalLM(TinyLMConfig(vocab_size=32, hidden=16, layers=2, heads=2, ffn_hidden=24, max_positions=64,
                                      seed=2 ** 63 - 1))
    ads = build_adapters(model, plan, seed=2 ** 63 - 1)
    res = train_plan(model, ads, plan, big, fused=False, seed=2 ** 63 - 1)
    assert res.steps == {0: 1, 1: 1} and all(torch.isfinite(torch.tensor(list(res.losses.values()))))



@pytest.mark.parametrize("taken", ["tiny-b", "tiny-a/adapter_config.json", "losses.json"])
def test_outputs_that_cannot_be_written_are_refused_before_training(tmp_path, capsys, taken):
    """Hunt finding: OUT/<job> a file (or OUT/losses.json a folder) was found after the whole training, with
    some adapters already written, as 'cannot write: File exists'. Now --check and a run refuse it first."""
    out = tmp_path / "o"
    if taken == "tiny-b":
        out.mkdir()
        (out / taken).write_text("mine")
        want = f"error: --out: {out / taken} is a file: job 'tiny-b''s adapter is saved in a folder of that name"
    elif taken == "losses.json":
        (out / taken).mkdir(parents=True)
        want = f"error: --out: {out / taken} is a folder: the run's losses are written to a file there"
    else:
        (out / taken).mkdir(parents=True)
        want = f"error: --out: {out / taken} is a folder: job 'tiny-a''s adapter writes a file there"
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for extra in (["--check"], ["--reference"]):
        assert main(["--jobs", "tiny", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err == want + "\n", err
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before

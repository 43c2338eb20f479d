"""Findings of the 28th session's LoRAFusion planner hunt, each a test that fails on the code before the fix."""
from __future__ import annotations

import json
import random

from adasched.planner.cli import main
from adasched.profiler.builtins import builtin_profile


def _scaled_profile(tmp_path, factor: float):
    """h100-sxm with every linear and attention term multiplied by ``factor``, as a file."""
    d = builtin_profile("h100-sxm").model_dump(mode="json")
    for part, keys in (("attention", ("a1_ms_per_tok2", "a2_ms_per_tok", "b_ms")), ("linear", ("ms_per_token", "b_ms"))):
        for k in keys:
            d[part][k] = d[part][k] * factor
    path = tmp_path / f"scaled-{factor:g}.json"
    path.write_text(json.dumps(d))
    return path


def test_many_no_op_microbatches_are_refused_before_the_simulation(tmp_path, capsys):
    """S = 64 with one-sample global batches needs 63 no-ops per global batch: 1,000 of them simulated for 76 s and
    1.3 GB (10**6 samples, which MAX_SAMPLES allows, about a day). Now one error line naming the jobs file, exit 2."""
    n = random.randint(560, 900)
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"capacity: 256\nstages: 64\nlayers: 64\nglobal_batches: {n}\njobs:\n"
                    "  - {name: a, adapter: {r: 4}, lengths: {dist: lognormal, median: 50, sigma: 0.3, min: 1, "
                    "max: 128}, global_batch_size: 1}\n")
    out = tmp_path / "p.json"
    assert main(["plan", "lora", "--jobs", str(jobs), "--out", str(out), "--no-milp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {jobs}: stages 64: the dependency rule needs "), err
    assert f"{(n - 1) * 63:,} no-op microbatches" in err[0]
    assert not out.exists()


def test_a_job_name_longer_than_a_folder_name_is_refused(tmp_path, capsys):
    """A 300-character name was planned; train_lora then failed ('File name too long') with half its output
    written. Names hold at most 128 characters."""
    for length, ok in ((128, True), (random.randint(129, 400), False)):
        name = "".join(random.choice("abcxyz019_-.") for _ in range(length - 1)) + "a"
        jobs = tmp_path / f"jobs{length}.yaml"
        jobs.write_text("capacity: 4096\nstages: 2\nglobal_batches: 1\njobs:\n"
                        f"  - {{name: '{name}', adapter: {{r: 4}}, lengths: xsum, global_batch_size: 2}}\n")
        out = tmp_path / f"p{length}.json"
        assert main(["plan", "lora", "--jobs", str(jobs), "--out", str(out), "--no-milp"]) == (0 if ok else 2)
        err = capsys.readouterr().err.strip().splitlines()
        assert out.exists() == ok
        if not ok:
            assert len(err) == 1 and err[0].startswith(f"error: {jobs}") and "name" in err[0] and "128" in err[0], err


def test_speedups_under_a_profile_of_tiny_costs_are_the_true_ratios(tmp_path):
    """Makespans were rounded to 1e-4 ms before the ratios were taken: with h100-sxm's costs x 1e-9 the plan said
    'speedup_vs_mlora 0.0' (x 1e-4: 1.7389, x 3e-5: 1.6561, for 1.7275)."""
    from adasched.planner.lorafusion.jobs import build_workload, preset_jobs
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    w = build_workload(preset_jobs("tiny"))
    true = build_plan(w, builtin_profile("h100-sxm"), use_milp=False).summary
    for factor in (1e-9, 3e-5, random.uniform(1e-6, 1e-4)):
        plan = build_plan(w, load_profile(_scaled_profile(tmp_path, factor)), use_milp=False)
        assert plan.verify() == []
        for key in ("speedup_vs_mlora", "speedup_vs_sequential", "speedup_vs_mlora_sorted"):
            assert abs(getattr(plan.summary, key) - getattr(true, key)) <= 2e-4, (factor, key)
        assert plan.summary.makespan_ms > 0 and plan.summary.mlora_makespan_ms > 0


def test_a_profile_of_denormal_costs_is_refused_not_written_as_null(tmp_path, capsys):
    """Costs of 1e-315 ms made the throughput inf, written as null: the plan's own loader then refused it."""
    prof = _scaled_profile(tmp_path, 1e-305)
    out = tmp_path / "p.json"
    assert main(["plan", "lora", "--jobs", "tiny", "--profile", str(prof), "--out", str(out), "--no-milp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --profile: ") and \
        "would be inf" in err[0], err
    assert not out.exists()


def _plan_with_second_length(tmp_path, line: str, out) -> int:
    """`plan lora` of one job whose length file holds a random length, then ``line``."""
    lens = tmp_path / "lens.txt"
    lens.write_text(f"{random.randint(16, 200)}\n{line}\n")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("capacity: 4096\nstages: 2\njobs:\n"
                    "  - {name: a, adapter: {r: 4}, lengths: lens.txt, global_batch_size: 1}\n")
    return main(["plan", "lora", "--jobs", str(jobs), "--out", str(out), "--no-milp"])


def test_length_files_hold_plain_decimal_integers(tmp_path, capsys):
    """int() read '1_000' as 1000 and Arabic-Indic digits as 123."""
    for bad in ("1_000", "\u0661\u0662\u0663", "0x40", "12.0"):
        out = tmp_path / "p.json"
        assert _plan_with_second_length(tmp_path, bad, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"line 2: {bad!r} is not an integer" in err[0], err
        assert not out.exists()


def test_long_length_lines_are_read_by_their_value(tmp_path, capsys):
    """(review) lines over 30 characters were all 'too large': 29 zeros then 42 is 42, a long -0...01 is negative."""
    for line, ok, want in (("0" * random.randint(29, 60) + "42", True, ""),
                           ("-" + "0" * random.randint(30, 60) + "1", False, "length must be >= 1"),
                           ("9" * random.randint(31, 5000), False, "more than the microbatch capacity")):
        out = tmp_path / "p.json"
        assert _plan_with_second_length(tmp_path, line, out) == (0 if ok else 2)
        err = capsys.readouterr().err
        assert out.exists() == ok and want in err, err
        out.unlink(missing_ok=True)

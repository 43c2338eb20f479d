"""Findings of the 25th session's LoRAFusion planner hunt, each a test that fails on the code before the fix."""
from __future__ import annotations

import random
import types

from adasched.planner.cli import main


def test_a_plan_that_loses_or_repeats_a_sample_is_not_written(tmp_path, capsys, monkeypatch):
    """The verifier's missing / duplicated counts only went into the summary: a packing bug that lost a sample
    (injected here into the merge pass) wrote the plan and exited 0 ("samples_missing": 1), and `show` then
    refused the file. Now one error line, exit 2, nothing written."""
    import adasched.planner.lorafusion.plan as P

    orig = P.merge_pass
    lose = random.Random().random() < 0.5  # lose a sample, or pack one twice

    def faulty(problems, lengths, capacity):
        out, n = orig(problems, lengths, capacity)
        a, g, ids = out[0][0].segments[0]
        out[0][0].segments[0] = (a, g, ids[1:] if lose else ids + ids[:1])
        return out, max(n, 1)

    monkeypatch.setattr(P, "merge_pass", faulty)
    out = tmp_path / "p.json"
    assert main(["plan", "lora", "--jobs", "tiny", "--out", str(out), "--no-milp"]) == 2
    err = capsys.readouterr().err
    want = "1 samples in no microbatch" if lose else "1 samples in more than one place"
    assert err.startswith("error: LoRA plan failed verification: ") and want in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_short_length_file_with_many_global_batches_means_the_whole_file(tmp_path, capsys):
    """global_batches 600,000 over two jobs reading a 4-line file was refused as 1,200,000 samples (counted before
    reading the file) although the plan holds 8; the README says a short file gives its job fewer global
    batches, with a note. Now counted after reading."""
    lens = tmp_path / "four.txt"
    lens.write_text("\n".join(str(random.Random().randint(16, 200)) for _ in range(4)) + "\n")
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("capacity: 256\nstages: 2\nlayers: 2\nglobal_batches: 600000\njobs:\n"
                    "  - {name: a, adapter: {r: 4}, lengths: four.txt, global_batch_size: 1}\n"
                    "  - {name: b, adapter: {r: 4}, lengths: four.txt, global_batch_size: 1}\n")
    out = tmp_path / "p.json"
    assert main(["plan", "lora", "--jobs", str(jobs), "--out", str(out), "--no-milp", "--json"]) == 0
    err = capsys.readouterr().err
    assert "4 global batch(es) of 1, not global_batches 600000" in err, err
    assert out.exists()
    # a drawn distribution is still counted before drawing: 10**6 samples per plan at most
    jobs.write_text("capacity: 4096\nstages: 1\nlayers: 2\nglobal_batches: 600000\njobs:\n"
                    "  - {name: a, adapter: {r: 4}, lengths: {dist: lognormal, median: 100, sigma: 0.5}, "
                    "global_batch_size: 2}\n")
    assert main(["plan", "lora", "--jobs", str(jobs), "--out", str(out.with_name("q.json")), "--no-milp"]) == 2
    assert "more than 1,000,000 per plan" in capsys.readouterr().err


def test_the_solver_note_counts_bin_count_milps_that_timed_out_without_a_solution(monkeypatch, tmp_path):
    """A bin-count MILP stopped by its time limit before any solution left the problem at FFD, and the note
    filed it under "FFD kept unproved" with "0 MILP stopped by its time limit"."""
    import adasched.planner.lorafusion.model as M
    from adasched.planner.lorafusion.jobs import build_workload, parse_jobs
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.profiler.profile import load_profile

    monkeypatch.setattr(M, "_milp", lambda *a, **k: (types.SimpleNamespace(status="timeout"), None))
    rnd = random.Random(3)  # (the hunt's lengths: first-fit decreasing stays above the bin lower bound on both)
    jobs = []
    for j in range(2):
        path = tmp_path / f"n{j}.txt"
        path.write_text("\n".join(str(rnd.choice([110, 300, 420, 530])) for _ in range(60)) + "\n")
        jobs.append({"name": f"j{j}", "adapter": {"r": 4}, "lengths": str(path), "global_batch_size": 30})
    cfg = parse_jobs({"capacity": 1024, "stages": 1, "global_batches": 2, "layers": 8, "jobs": jobs})
    plan = build_plan(build_workload(cfg), load_profile("h100-sxm"), time_limit=1.0)
    timed_out = [p for p in plan.problems if p.milp1 == "timeout" and p.status == "heuristic"]
    assert timed_out, [(p.milp1, p.status) for p in plan.problems]
    assert (f"({len(timed_out)} of them: the bin-count MILP stopped by its time limit without a solution)"
            in plan.solver.note), plan.solver.note


def test_yaml_booleans_are_yaml_12_ones(tmp_path, capsys):
    """PyYAML follows YAML 1.1: `use_rslora: yes` was silently true and `name: on` a job named True ("error: ...: job
    True: name: Input should be a valid string"). Now true / false only; yes / on are strings."""
    from adasched.profiler.io import load_yaml

    word = random.Random().choice(["yes", "no", "on", "off", "y", "n", "Yes", "ON"])
    assert load_yaml(f"a: {word}\nb: true\nc: False\n") == {"a": word, "b": True, "c": False}
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("capacity: 1024\nstages: 1\nlayers: 2\nglobal_batches: 1\njobs:\n"
                    f"  - {{name: a, adapter: {{r: 4, use_rslora: {word}}}, lengths: xsum, global_batch_size: 2}}\n")
    assert main(["plan", "lora", "--jobs", str(jobs), "--out", str(tmp_path / "p.json"), "--no-milp"]) == 2
    assert "job 'a': adapter.use_rslora: Input should be a valid boolean" in capsys.readouterr().err
    jobs.write_text("capacity: 1024\nstages: 1\nlayers: 2\nglobal_batches: 1\njobs:\n"
                    "  - {name: 7, adapter: {r: 4}, lengths: xsum, global_batch_size: 2}\n")
    assert main(["plan", "lora", "--jobs", str(jobs), "--out", str(tmp_path / "p.json"), "--no-milp"]) == 2
    assert "jobs[0]: name: Input should be a valid string" in capsys.readouterr().err

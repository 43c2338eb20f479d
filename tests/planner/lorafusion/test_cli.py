"""`adasched plan lora` / `bench lora`: happy path, presets, every bad input (error line, exit 2, nothing written)."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from adasched.planner.cli import main
from adasched.planner.lorafusion.jobs import build_workload, load_jobs
from adasched.planner.lorafusion.plan import LoRAPlan
from adasched.planner.plan import load_plan


def _jobs(tmp_path, **over):
    lens = tmp_path / "lens.txt"
    lens.write_text("\n".join(str(x) for x in [900, 120, 3000, 77, 640, 1500, 2048, 333, 51, 4000, 700, 260]) + "\n")
    data = {
        "capacity": 4096, "stages": 2, "global_batches": 2, "seed": 3, "layers": 8,
        "jobs": [
            {"name": "a", "adapter": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
             "lengths": "xsum", "global_batch_size": 6, "lr": 1e-4},
            {"name": "b", "adapter": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
             "lengths": {"dist": "lognormal", "median": 300, "sigma": 0.8, "min": 16, "max": 4096},
             "global_batch_size": 5, "lr": 2e-4},
            {"name": "c", "adapter": {"r": 16, "alpha": 16, "target_modules": ["o_proj"]},
             "lengths": "lens.txt", "global_batch_size": 6, "lr": 1e-4},
        ],
    }
    data.update(over)
    return data, lens


def _write(tmp_path, data, name="jobs.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return p


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_plan_lora_happy_path(tmp_path, capsys, fmt):
    data, _ = _jobs(tmp_path)
    jobs = _write(tmp_path, data, f"jobs.{fmt}")
    out = tmp_path / "plan.json"
    rc = main(["plan", "lora", "--jobs", str(jobs), "--out", str(out), "--time-limit", "0.2", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    s = res["summary"]
    for key in ("speedup_vs_mlora", "speedup_vs_sequential", "padding_waste", "solve_seconds_p95",
                "samples_missing", "samples_duplicated"):
        assert key in s
    assert s["samples_missing"] == 0 and s["samples_duplicated"] == 0
    plan = load_plan(out, expect=LoRAPlan)
    # the plan carries every sample of every (job, global batch) exactly once, as the workload drew them
    cfg, base, label = load_jobs(jobs)
    w = build_workload(cfg, base, label=label)
    assert plan.lengths == list(w.lengths)
    got = plan.batches()
    for j in w.jobs:
        for g, b in enumerate(j.batches):
            assert sorted(got[(j.index, g)]) == list(b)
    assert all(mb.padded_tokens <= 4096 for mb in plan.microbatches)
    # the file re-simulates to the predicted makespan
    assert plan.simulate().makespan_ms == pytest.approx(plan.predicted_ms, rel=1e-6)
    assert plan.solver.status in ("optimal", "feasible", "heuristic")


def test_bench_lora_preset_json(capsys):
    rc = main(["bench", "lora", "--jobs", "mix", "--json", "--time-limit", "0.1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    s = res["summary"]
    assert res["jobs"] == "preset:mix" and res["profile"] == "h100-sxm"
    assert s["samples_missing"] == 0 and s["samples_duplicated"] == 0
    assert s["speedup_vs_mlora"] > 1.0 and s["speedup_vs_sequential"] > 1.0
    assert s["padding_waste"] < 0.03


def _bad(tmp_path, capsys, data, *, must):
    jobs = _write(tmp_path, data)
    out = tmp_path / "plan.json"
    rc = main(["plan", "lora", "--jobs", str(jobs), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for m in must:
        assert m in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".plan.json.*"))
    return err


def test_bad_sample_exceeds_capacity(tmp_path, capsys):
    data, lens = _jobs(tmp_path, capacity=2048)
    _bad(tmp_path, capsys, data, must=["job 'c'", "lengths", "capacity 2048"])


def test_bad_rank(tmp_path, capsys):
    data, _ = _jobs(tmp_path)
    data["jobs"][1]["adapter"]["r"] = 0
    _bad(tmp_path, capsys, data, must=["job 'b'", "adapter.r", ">= 1"])


def test_bad_target_module(tmp_path, capsys):
    data, _ = _jobs(tmp_path)
    data["jobs"][0]["adapter"]["target_modules"] = ["q_proj", "qkv"]
    _bad(tmp_path, capsys, data, must=["job 'a'", "adapter.target_modules", "unknown module 'qkv'"])


def test_bad_empty_length_file(tmp_path, capsys):
    data, lens = _jobs(tmp_path)
    lens.write_text("\n")
    _bad(tmp_path, capsys, data, must=["job 'c'", "lengths", "is empty"])


def test_bad_duplicate_name(tmp_path, capsys):
    data, _ = _jobs(tmp_path)
    data["jobs"][2]["name"] = "a"
    _bad(tmp_path, capsys, data, must=["job 'a'", "name", "used twice"])


@pytest.mark.parametrize("name", ["plan.json", "losses.json"])
def test_bad_job_named_like_a_trainer_file(tmp_path, capsys, name):
    # the trainer writes OUT/plan.json and OUT/losses.json beside OUT/<job>/: such a job trained, then failed to save
    data, _ = _jobs(tmp_path)
    data["jobs"][1]["name"] = name
    _bad(tmp_path, capsys, data, must=[f"job {name!r}: name: {name!r} is the name of a file the trainer writes"])


def test_bad_more_stages_than_layers(tmp_path, capsys):
    # was planned with a quarter of a layer per stage
    data, _ = _jobs(tmp_path, stages=9)
    _bad(tmp_path, capsys, data, must=["stages: 9 pipeline stages but layers 8"])


@pytest.mark.parametrize("name, text, must", [
    ("jobs.yaml", "capacity: 1024\ncapacity: 2048\njobs: []\n", "line 2 column 1: found duplicate key 'capacity'"),
    ("jobs.yaml", "capacity: 1024\njobs:\n  - {name: a, \n", "malformed YAML at line 4 column 1"),
    ("jobs.json", '{"capacity": 1024, "jobs": [], "capacity": 2048}', "duplicate key 'capacity'"),
])
def test_bad_duplicate_key_or_malformed_yaml(tmp_path, capsys, name, text, must):
    """A key given twice was accepted, the last one winning; a YAML error said where it was in no line."""
    jobs = tmp_path / name
    jobs.write_text(text)
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", str(jobs), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {jobs}: ") and err.count("\n") == 1 and must in err, err
    assert not out.exists()


def test_short_length_file_is_said(tmp_path, capsys):
    """A length file holding fewer samples than global_batch_size x global_batches gave the job fewer global batches
    without a word; now a note on stderr and in the plan's solver note (the job is still planned)."""
    data, lens = _jobs(tmp_path, global_batches=3)      # job c: 12 samples = 2 global batches of 6, not 3
    lens.write_text("\n".join(str(x) for x in [900, 120, 3000, 77, 640, 1500, 2048, 333, 51, 4000, 700, 260, 5]))
    jobs = _write(tmp_path, data)
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", str(jobs), "--out", str(out)]) in (0, None)
    err = capsys.readouterr().err
    want = "holds 13 samples: 2 global batch(es) of 6, not global_batches 3 (its last 1 sample(s) unused)"
    assert err.count("note: job 'c': length file") == 1 and want in err, err
    plan = load_plan(out, expect=LoRAPlan)
    assert want in plan.solver.note


def test_seed_without_milp_is_refused(tmp_path, capsys):
    data, _ = _jobs(tmp_path)
    jobs = _write(tmp_path, data)
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", str(jobs), "--no-milp", "--seed", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --seed: has no effect with --no-milp") and err.count("\n") == 1 and not out.exists()


def test_bad_preset_and_missing_file(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "lora", "--jobs", "nosuch", "--out", str(out)]) == 2
    assert "nosuch" in capsys.readouterr().err and not out.exists()


def test_show_and_load_refuse_a_plan_that_fails_verification(tmp_path, capsys, assert_show_refuses):
    data, _ = _jobs(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", str(_write(tmp_path, data)), "--out", str(out), "--time-limit", "0.2"]) == 0
    assert main(["show", str(out)]) == 0
    plan = json.loads(out.read_text())
    seg0 = plan["microbatches"][0]["segments"][0]
    first, n = seg0["samples"][0], len(plan["lengths"])

    def dup(d):  # the second sample replaced by a second copy of the first: one duplicated, one missing
        d["microbatches"][0]["segments"][0]["samples"][1] = first

    def out_of_range(d):
        d["microbatches"][0]["segments"][0]["samples"][0] = n + 5

    def tokens(d):
        d["microbatches"][0]["segments"][0]["tokens"] += 1

    def wrong_batch(d):
        d["microbatches"][0]["segments"][0]["global_batch"] = 1 - seg0["global_batch"]

    def too_big(d):
        d["capacity"] = 128

    def shallow(d):  # fewer layers than stages: refused in the jobs file, passed in a plan
        d["layers"] = d["stages"] - 1

    def deeper(d):  # hunt: 64 layers kept the 2-layer model's prediction (stage_cost is per layers / stages)
        d["layers"] = 64

    def fake_baseline(d):  # hunt: show printed "baseline mlora 1.000 ms" beside the summary's own speedup
        d["baselines_ms"]["mlora"] = 1.0

    assert_show_refuses(plan, [(dup, f"1 samples in more than one place (first: sample {first})"),
                               (out_of_range, f"sample id {n + 5} not in [0, {n})"), (tokens, "segment says"),
                               (wrong_batch, "placed in segment"), (too_big, "> capacity 128"),
                               (shallow, "stages: 2 pipeline stages but layers 1"),
                               (deeper, f"but layers / stages = 64 / {plan['stages']}"),
                               (fake_baseline, "baselines_ms: {'mlora': 1.0, ")])


def test_jobs_help_names_every_preset():
    from adasched.planner.lorafusion.cli import _JOBS_HELP
    from adasched.planner.lorafusion.jobs import PRESETS

    assert _JOBS_HELP.endswith("preset name: " + ", ".join(PRESETS) + ".")


def test_show_names_the_solve_time_limit_per_problem(tmp_path, capsys):
    # the limit is per (global batch, group) problem and the time their sum: 'solve time 4.879 s (limit 0.4 s)' read
    # as a 12x overrun
    from adasched.planner.lorafusion.plan import LoRAPlan
    from adasched.planner.plan import load_plan

    data, _ = _jobs(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", str(_write(tmp_path, data)), "--out", str(out), "--time-limit", "0.2"]) == 0
    plan = load_plan(out, expect=LoRAPlan)
    row = dict(plan.summary_rows())["solve time"]
    assert row == (f"{plan.solver.solve_seconds:.3f} s over {len(plan.problems)} (global batch, group) problems "
                   f"(limit 0.2 s each)")
    assert len(plan.problems) >= 1


def test_plan_files_that_are_too_large_or_stale_are_refused(tmp_path, capsys, assert_show_refuses):
    """Hunt findings: a plan with global_batch_size 10**12 was a MemoryError in verify (global_batches 10**12 hung
    `show`); a plan of no jobs passed `show`; summary fields that do not follow from the microbatches (ratios,
    counts, padding waste, throughput) were shown as they were."""
    data, _ = _jobs(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", str(_write(tmp_path, data)), "--out", str(out), "--time-limit", "0.2"]) == 0
    plan = json.loads(out.read_text())

    def huge_batch(d):
        d["jobs"][0]["global_batch_size"] = 10 ** 12

    def huge_batches(d):
        d["jobs"][0]["global_batches"] = 10 ** 12

    def more_samples(d):
        d["jobs"][0]["global_batches"] += 1

    def no_jobs(d):
        d["jobs"], d["groups"], d["microbatches"] = [], [], []

    def field(name, delta):
        def edit(d):
            d["summary"][name] += delta
        return edit

    s = plan["summary"]
    capsys.readouterr()
    for edit, needle in ((huge_batch, "jobs.0.global_batch_size: Input should be less than or equal to 1000000"),
                         (huge_batches, "jobs.0.global_batches: Input should be less than or equal to 1000000"),
                         (no_jobs, "jobs: List should have at least 1 item")):
        d = json.loads(json.dumps(plan))
        edit(d)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(d))
        assert main(["show", str(p)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {p}: ") and needle in err and err.count("\n") == 1, err
    n = len(plan["lengths"])
    assert_show_refuses(plan, [
        (more_samples, f"lengths: {n} samples, but the jobs' global batches hold "
                       f"{n + plan['jobs'][0]['global_batch_size']}"),
        (field("speedup_vs_mlora", 0.01), f"summary.speedup_vs_mlora: {s['speedup_vs_mlora'] + 0.01}, the "
                                          f"microbatches give {s['speedup_vs_mlora']}"),
        (field("speedup_vs_sequential", -0.01), "summary.speedup_vs_sequential: "),
        (field("speedup_vs_mlora_sorted", 0.5), "summary.speedup_vs_mlora_sorted: "),
        (field("padding_waste", 0.001), "summary.padding_waste: "),
        (field("throughput_tokens_per_s", 1.0), "summary.throughput_tokens_per_s: "),
        (field("microbatches", 1), f"summary.microbatches: {s['microbatches'] + 1}, the microbatches give "
                                   f"{s['microbatches']}"),
        (field("noop_microbatches", 1), "summary.noop_microbatches: "),
        (field("tokens", -1), "summary.tokens: "),
    ])


def test_resimulated_recomputes_what_follows_from_the_sequence(tmp_path):
    """Hunt finding: resimulated() refreshed the makespan only; the speedups, counts, padding waste and throughput
    of a plan whose microbatches were split by hand stayed those of the old sequence."""
    data, _ = _jobs(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", str(_write(tmp_path, data)), "--out", str(out), "--time-limit", "0.2"]) == 0
    plan = load_plan(out)
    i = next(k for k, mb in enumerate(plan.microbatches) if mb.segments and len(mb.segments[0].samples) > 1)
    mb = plan.microbatches[i]
    seg = mb.segments[0]
    from adasched.planner.lorafusion.costmodel import padded

    L = plan.lengths
    def part(ids):
        t = sum(L[x] for x in ids)
        return seg.model_copy(update={"samples": ids, "tokens": t, "padded_tokens": padded(t)})

    a, b = part(seg.samples[:1]), part(seg.samples[1:])
    first = mb.model_copy(update={"segments": [a], "padded_tokens": a.padded_tokens})
    rest = mb.model_copy(update={"segments": [b, *mb.segments[1:]],
                                 "padded_tokens": b.padded_tokens + sum(x.padded_tokens for x in mb.segments[1:])})
    split = plan.model_copy(update={"microbatches": [*plan.microbatches[:i], first, rest, *plan.microbatches[i + 1:]]})
    new = split.resimulated()
    assert new.verify() == []
    s, old = new.summary, plan.summary
    ms = new._makespan_ms()
    real = sum(x.tokens for m in new.microbatches for x in m.segments)
    padded_total = sum(m.padded_tokens for m in new.microbatches)
    assert s.microbatches == old.microbatches + 1 == len(new.microbatches)
    assert s.tokens == real == old.tokens
    assert s.padding_waste == round(1 - real / padded_total, 5)
    assert s.throughput_tokens_per_s == round(real / ms * 1000.0, 2)
    assert s.speedup_vs_mlora == round(old.mlora_makespan_ms / ms, 4)
    assert s.speedup_vs_sequential == round(old.sequential_makespan_ms / ms, 4)
    assert s.speedup_vs_mlora_sorted == round(old.mlora_sorted_makespan_ms / ms, 4)
    # stored to 1e-4 ms and 8 significant digits (round_ms), written out here
    digits = max(4, 7 - math.floor(math.log10(ms)))
    assert new.predicted_ms == s.makespan_ms == round(ms, digits) and abs(s.makespan_ms - ms) <= 5e-5


def test_a_profile_of_tiny_costs_prints_the_comparison(tmp_path, capsys):
    """Hunt finding: makespans stored to 1e-4 ms read 0 for a profile of tiny per-token costs, and the comparison
    table divided by them: a ZeroDivisionError traceback (exit 1) after the plan was written."""
    from adasched.profiler.builtins import builtin_profile

    prof = builtin_profile("h100-sxm").model_dump(mode="json")
    prof["linear"]["ms_per_token"] = 1e-8
    prof["linear"]["b_ms"] = 0
    prof["attention"].update(a1_ms_per_tok2=0, a2_ms_per_tok=1e-10, b_ms=0)
    pf = tmp_path / "tiny-costs.json"
    pf.write_text(json.dumps(prof))
    out = tmp_path / "p.json"
    for cmd in (["plan", "lora", "--jobs", "tiny", "--profile", str(pf), "--out", str(out)],
                ["bench", "lora", "--jobs", "tiny", "--profile", str(pf)]):
        assert main(cmd) == 0
        res = capsys.readouterr()
        assert "Traceback" not in res.err and "sequential packing" in res.out
    # and the plan it wrote loads back (review finding: ratios computed from unrounded baseline makespans failed
    # the summary check once makespans were below ~0.25 ms)
    assert main(["show", str(out)]) == 0


@pytest.mark.parametrize("factor", [1e-2, 1e-4, 1e-7, 1e3])
def test_plans_of_scaled_costs_pass_their_own_check(tmp_path, capsys, factor):
    """Review finding: every preset's plan must load back (`show`) whatever the profile's scale."""
    from adasched.profiler.builtins import builtin_profile

    prof = builtin_profile("h100-sxm").model_dump(mode="json")
    for key in ("ms_per_token", "b_ms"):
        prof["linear"][key] *= factor
    for key in ("a1_ms_per_tok2", "a2_ms_per_tok", "b_ms"):
        prof["attention"][key] *= factor
    pf = tmp_path / "scaled.json"
    pf.write_text(json.dumps(prof))
    for preset in ("tiny", "mix"):
        out = tmp_path / f"{preset}.json"
        assert main(["plan", "lora", "--jobs", preset, "--profile", str(pf), "--out", str(out), "--time-limit",
                     "0.2"]) == 0
        capsys.readouterr()
        assert main(["show", str(out)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("opt", ["--out", "--plot"])
def test_an_output_over_a_length_file_of_the_jobs_is_refused(tmp_path, capsys, monkeypatch, opt):
    """Hunt finding: `plan lora --jobs jl.yaml --out lens.txt`, lens.txt being the length file jl.yaml names,
    replaced the user's lengths with the plan (every later plan of that jobs file failed)."""
    import random

    monkeypatch.chdir(tmp_path)
    lens = "".join(f"{random.randint(16, 200)}\n" for _ in range(8))
    name = "lens.txt" if opt == "--out" else "lens.png"  # (a figure must be a picture file name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / name).write_text(lens)
    (tmp_path / "data" / "jl.yaml").write_text(yaml.safe_dump({
        "capacity": 256, "stages": 1, "global_batches": 2, "layers": 2,
        "jobs": [{"name": "a", "adapter": {"r": 4}, "lengths": name, "global_batch_size": 2}]}))
    target = f"data/{name}"  # the jobs file's relative path, seen from here
    argv = ["plan", "lora", "--jobs", "data/jl.yaml", "--no-milp", "--out", "p.json", opt, target]
    if opt == "--out":
        argv = argv[:-4] + ["--out", target]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {opt}: {target} is the --jobs length file input: writing there would replace it; give "
                   f"the output another file\n"), err
    assert (tmp_path / "data" / name).read_text() == lens and not (tmp_path / "p.json").exists()


def test_stage_cost_that_overflows_the_simulation_names_the_field(tmp_path, capsys):
    """Hunt finding: finite but huge stage_cost terms (1e308 ms per token) passed the field checks and failed in
    the simulation: 'error: task 'F0s0': duration_ms must be finite ...', naming neither the file nor the field."""
    import random

    out = tmp_path / "p.json"
    assert main(["plan", "lora", "--jobs", "tiny", "--no-milp", "--out", str(out)]) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    data["stage_cost"][random.choice(["linear_ms_per_token", "linear_b_ms", "attn_b_ms"])] = 1e308
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: fails verification: stage_cost: the microbatches do not simulate") and \
        err.count("\n") == 1, err


def _verified_plan(tmp_path, capsys):
    """A plan of the _jobs file made by the CLI (0.2 s per MILP), loaded back and verified."""
    data, _ = _jobs(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", str(_write(tmp_path, data)), "--out", str(out), "--time-limit", "0.2"]) == 0
    capsys.readouterr()
    plan = load_plan(out)
    assert plan.verify() == []
    return plan


def test_verify_refuses_a_solver_record_the_problems_do_not_support(tmp_path, capsys):
    """verify did not re-derive the solver record and the summary's problem counts from ``problems``: a plan
    edited to read "optimal" over unproved problems, with another objective or bound, or with problems that do not
    cover the samples, verified and was shown as planned."""
    plan = _verified_plan(tmp_path, capsys)
    p0 = plan.problems[0]
    flipped = "heuristic" if p0.status == "optimal" else "optimal"
    problems = [p0.model_copy(update={"status": flipped}), *plan.problems[1:]]
    edits = {
        "solver status": ({"solver": plan.solver.model_copy(update={"status": "optimal"}),
                           "problems": [p.model_copy(update={"status": "heuristic"}) for p in plan.problems]},
                          "summary.problems_*"),
        "status flip": ({"problems": problems}, "summary.problems_*"),
        "objective": ({"solver": plan.solver.model_copy(update={"objective": plan.solver.objective + 1})},
                      "solver.objective"),
        "bound": ({"solver": plan.solver.model_copy(update={"bound": plan.solver.bound - 1})}, "solver.bound"),
        "samples": ({"problems": [p0.model_copy(update={"samples": p0.samples + 1}), *plan.problems[1:]]},
                    "problems: "),
        "bins": ({"problems": [p0.model_copy(update={"bins": p0.ffd_bins + 1}), *plan.problems[1:]]},
                 "problems.0: lower_bound"),
        "jobs": ({"problems": [p0.model_copy(update={"jobs": [len(plan.jobs)]}), *plan.problems[1:]]},
                 "problems.0.jobs"),
    }
    for what, (update, needle) in edits.items():
        errs = plan.model_copy(update=update).verify()
        assert any(e.startswith(needle) for e in errs), (what, errs)
    # the summary counts made to agree with edited statuses: the solver record's worst status must follow
    target = "heuristic" if plan.solver.status != "heuristic" else "optimal"
    retagged = [p.model_copy(update={"status": target}) for p in plan.problems]
    counts = {k: sum(p.status == k for p in retagged) for k in ("optimal", "feasible", "heuristic")}
    agreed = plan.model_copy(update={"problems": retagged, "summary": plan.summary.model_copy(
        update={f"problems_{k}": v for k, v in counts.items()})})
    errs = agreed.verify()
    assert any(e.startswith(f"solver.status: {plan.solver.status!r}") for e in errs), errs
    # and through the CLI: one line, exit 2
    bad = tmp_path / "bad.json"
    bad.write_text(plan.model_copy(update=edits["objective"][0]).model_dump_json())
    assert main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "solver.objective" in err and err.count("\n") == 1, err


def test_verify_refuses_edited_bookkeeping_fields(tmp_path, capsys):
    """Hunt finding: edits of the problems', jobs' and summary's remaining fields verified and were shown as
    planned ("solve p95 1000000000.000 s", "mLoRA-style -300.00%", "12 (0 no-op, 7 merged)", a problem of global
    batch 99, a MILP outcome "garbage", a job's mean length -1e9)."""
    plan = _verified_plan(tmp_path, capsys)
    p0, j0, s = plan.problems[0], plan.jobs[0], plan.summary

    def problem(**kw):
        return {"problems": [p0.model_copy(update=kw), *plan.problems[1:]]}

    def summary(**kw):
        return {"summary": s.model_copy(update=kw)}

    edits = [
        (problem(global_batch=99), "problems.0.global_batch: 99"),
        (problem(global_batch=-1), "problems.0.global_batch: -1"),
        (problem(milp2="garbage"), "problems.0: smallest_bin_tokens"),
        (problem(smallest_bin_tokens=-5), "problems.0: smallest_bin_tokens -5 < 0"),
        (summary(solve_seconds_p95=1e9), "summary.solve_seconds_p95: 1000000000.0, the problems' solve times give"),
        (summary(solve_seconds_total=-1.0), "summary.solve_seconds_total: -1.0"),
        (summary(mlora_padding_waste=-3.0), "summary.mlora_padding_waste: -3.0 is not a fraction"),
        (summary(sequential_padding_waste=2.5), "summary.sequential_padding_waste: 2.5 is not a fraction"),
        (summary(mlora_max_microbatch_tokens=-5), "summary.mlora_max_microbatch_tokens: -5 < 0"),
        (summary(merges=s.microbatches + 1), f"summary.merges: {s.microbatches + 1}, not in [0, microbatches"),
        ({"jobs": [j0.model_copy(update={"mean_tokens": -1e9}), *plan.jobs[1:]]}, "jobs.0: mean_tokens -1000000000.0"),
        ({"jobs": [j0.model_copy(update={"std_tokens": j0.std_tokens + 1}), *plan.jobs[1:]]}, "jobs.0: mean_tokens"),
    ]
    if len(plan.groups) > 1:  # a problem's jobs from two groups
        other = next(g for g in plan.groups if p0.jobs[0] not in g)
        edits.append((problem(jobs=[*p0.jobs, other[0]]), "problems.0.jobs: "))
    for update, needle in edits:
        errs = plan.model_copy(update=update).verify()
        assert any(e.startswith(needle) for e in errs), (update, errs)
    # within tolerance of build_plan's rounding: still verifies
    assert plan.model_copy(update=summary(solve_seconds_total=s.solve_seconds_total + 4e-5)).verify() == []
    bad = tmp_path / "bad.json"
    bad.write_text(plan.model_copy(update=edits[4][0]).model_dump_json())
    assert main(["show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and "summary.solve_seconds_p95" in err and err.count("\n") == 1, err

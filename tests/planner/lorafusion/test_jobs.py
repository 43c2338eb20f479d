"""Jobs files, named distributions and presets."""
from __future__ import annotations

import math

import numpy as np
import pytest

from adasched.planner.lorafusion.jobs import (
    PRESETS,
    build_workload,
    load_jobs,
    parse_jobs,
    wikipedia_lengths,
)
from adasched.profiler.io import InputError


def test_wikipedia_fixture_is_the_stated_sample():
    w = np.asarray(wikipedia_lengths())
    assert len(w) == 4096 and w.min() >= 1 and w.max() == 4096
    assert 700 < w.mean() < 820 and 300 < np.median(w) < 400


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_deterministic_workloads(name):
    cfg, base, label = load_jobs(name)
    a = build_workload(cfg, base, label=label)
    b = build_workload(*load_jobs(name)[:2])
    assert a.lengths == b.lengths
    assert max(a.lengths) <= cfg.capacity
    for j in a.jobs:
        assert len(j.batches) == cfg.global_batches
        assert all(len(bt) == j.spec.global_batch_size for bt in j.batches)
    ids = sorted(s for j in a.jobs for bt in j.batches for s in bt)
    assert ids == list(range(len(a.lengths)))
    if name in ("mix", "het"):
        assert len(cfg.jobs) == 4 and cfg.capacity == 8192


def test_parametric_distributions_match_their_stated_parameters():
    cfg = parse_jobs({"global_batches": 64, "seed": 1, "jobs": [
        {"name": "x", "adapter": {"r": 8}, "lengths": "xsum", "global_batch_size": 64},
        {"name": "c", "adapter": {"r": 8}, "lengths": "cnndm", "global_batch_size": 64}]})
    w = build_workload(cfg)
    for j, (median, sigma, lo) in zip(w.jobs, ((480, 0.5, 64), (850, 0.45, 128))):
        xs = np.asarray([w.lengths[s] for bt in j.batches for s in bt])
        assert xs.min() >= lo and xs.max() <= 4096
        assert abs(np.median(xs) / median - 1) < 0.05
        assert abs(np.std(np.log(xs)) - sigma) < 0.03
        assert abs(xs.mean() / (median * math.exp(sigma ** 2 / 2)) - 1) < 0.05


def test_length_file_is_used_in_order_and_short_files_rejected(tmp_path):
    (tmp_path / "l.txt").write_text("# lengths\n5\n6\n7\n8\n9\n")
    cfg = parse_jobs({"global_batches": 5, "jobs": [
        {"name": "f", "adapter": {"r": 1}, "lengths": "l.txt", "global_batch_size": 2}]})
    w = build_workload(cfg, tmp_path)
    assert w.lengths == (5, 6, 7, 8) and w.jobs[0].batches == ((0, 1), (2, 3))
    cfg = parse_jobs({"jobs": [{"name": "f", "adapter": {"r": 1}, "lengths": "l.txt", "global_batch_size": 9}]})
    with pytest.raises(InputError, match="fewer than global_batch_size 9"):
        build_workload(cfg, tmp_path)
    (tmp_path / "bad.txt").write_text("5\nfive\n")
    cfg = parse_jobs({"jobs": [{"name": "f", "adapter": {"r": 1}, "lengths": "bad.txt", "global_batch_size": 1}]})
    with pytest.raises(InputError, match="line 2"):
        build_workload(cfg, tmp_path)


def test_a_length_file_shared_by_jobs_is_read_once(tmp_path, monkeypatch):
    """(33rd session's scale hunt) 32 jobs naming the 1M-line Wikipedia file read and checked it 32 times: 31 s
    before planning began. Once now (by its resolved path: another spelling of the same file too), each job taking
    the same first samples as when it was alone."""
    import random

    from adasched.planner.lorafusion import jobs as J

    vals = [random.randint(1, 999) for _ in range(12)]
    (tmp_path / "l.txt").write_text("\n".join(map(str, vals)) + "\n")
    (tmp_path / "sub").mkdir()
    calls = []
    real = J._read_length_file
    monkeypatch.setattr(J, "_read_length_file", lambda path, where: (calls.append(path), real(path, where))[1])
    cfg = parse_jobs({"global_batches": 2, "jobs": [
        {"name": n, "adapter": {"r": 1}, "lengths": f, "global_batch_size": b}
        for n, f, b in (("a", "l.txt", 2), ("b", "sub/../l.txt", 3), ("c", "l.txt", 5))]})
    w = build_workload(cfg, tmp_path)
    assert len(calls) == 1
    assert w.lengths == tuple(vals[:4] + vals[:6] + vals[:10])


@pytest.mark.parametrize("lengths, adapter, needle", [
    ({"dist": "lognormal", "median": -1, "sigma": 0.5}, {"r": 2}, "lengths: median"),
    (5, {"r": 2}, "lengths: must be a named distribution"),
    ("xsum", {"r": 2, "target_modules": "q_proj"}, "adapter.target_modules: must be a list"),
    ("xsum", {"r": 2, "alpha": 0}, "adapter.alpha"),
    ("xsum", {"r": 2, "dropout": 1.0}, "adapter.dropout"),
    ("xsum", {"r": True}, "adapter.r: Input should be a valid integer"),  # a bool is not rank 1
    ("xsum", {"r": 8.0}, "adapter.r: Input should be a valid integer"),
    ("xsum", {"r": 2, "alpha": "16"}, "adapter.alpha: Input should be a valid number"),
])
def test_field_errors_name_the_job_and_field(lengths, adapter, needle):
    with pytest.raises(InputError) as err:
        parse_jobs({"jobs": [{"name": "ok", "adapter": {"r": 1}, "lengths": "xsum", "global_batch_size": 1},
                             {"name": "bad-job", "adapter": adapter, "lengths": lengths, "global_batch_size": 2}]},
                   "f.yaml")
    msg = str(err.value)
    assert msg.startswith("f.yaml: job 'bad-job': ") and needle in msg, msg


def test_yaml_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `2e-4` as a string; our loader reads it as YAML 1.2 and JSON do."""
    p = tmp_path / "jobs.yaml"
    p.write_text("capacity: 4096\njobs:\n  - name: a\n    adapter: {r: 8, alpha: 1.6E1}\n"
                 "    lengths: {dist: lognormal, median: 3e2, sigma: 0.5}\n    global_batch_size: 4\n    lr: 2e-4\n")
    cfg, _, _ = load_jobs(str(p))
    job = cfg.jobs[0]
    assert job.lr == 2e-4 and job.adapter.alpha == 16.0 and job.lengths.median == 300.0
    p.write_text(p.read_text().replace("lr: 2e-4", "lr: '2e-4'"))  # quoted: a string, refused by name
    with pytest.raises(InputError, match="job 'a': lr: Input should be a valid number"):
        load_jobs(str(p))


def test_yaml_integers_are_read_as_yaml_1_2_reads_them(tmp_path):
    """PyYAML (YAML 1.1) read `global_batches: 010` as octal 8 and `1:30` as sexagesimal 90 (a plan of 90 global
    batches, exit 0); JSON and YAML 1.2 read 10 and refuse 1:30. Hex and 0o octal still work."""
    p = tmp_path / "jobs.yaml"
    text = ("capacity: 4096\nglobal_batches: {gb}\njobs:\n  - name: a\n    adapter: {{r: 0x8}}\n"
            "    lengths: xsum\n    global_batch_size: 012\n")
    p.write_text(text.format(gb="010"))
    cfg, _, _ = load_jobs(str(p))
    assert (cfg.global_batches, cfg.jobs[0].global_batch_size, cfg.jobs[0].adapter.r) == (10, 12, 8)
    p.write_text(text.format(gb="0o17"))
    assert load_jobs(str(p))[0].global_batches == 15
    p.write_text(text.format(gb="1_0"))  # digit-group underscores, as PyYAML reads them
    assert load_jobs(str(p))[0].global_batches == 10
    p.write_text(text.format(gb="1:30"))
    with pytest.raises(InputError, match=r"global_batches: Input should be a valid integer"):
        load_jobs(str(p))
    p.write_text(text.format(gb="9" * 5000))  # beyond Python's digit limit: the file named, one line
    with pytest.raises(InputError, match=rf"^{p}: malformed YAML at line 2 column 17: bad integer '9999"):
        load_jobs(str(p))


def test_length_file_errors_name_the_line_and_survive_a_name_too_long(tmp_path, capsys):
    """A sample above the capacity was 'sample 1' - the value on line 5 after comments and blank lines; a length
    file name too long for the OS gave 'error: <path>: File name too long', naming neither job nor field."""
    from adasched.planner.cli import main

    lens = tmp_path / "lens.txt"
    lens.write_text("# lengths\n\n100\n\n300\n120\n")
    p = tmp_path / "jobs.yaml"
    p.write_text("capacity: 256\nstages: 1\nglobal_batches: 1\njobs:\n"
                 "  - {name: a, adapter: {r: 4}, lengths: lens.txt, global_batch_size: 3}\n")
    out = tmp_path / "plan.json"
    assert main(["plan", "lora", "--jobs", str(p), "--no-milp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {p}: job 'a': lengths: length file {str(lens)!r} line 5: a sample has 300 tokens "
                   "(384 padded to 128), more than the microbatch capacity 256\n"), err
    p.write_text(p.read_text().replace("lens.txt", "x" * 300 + ".txt"))
    assert main(["plan", "lora", "--jobs", str(p), "--no-milp", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}: job 'a': lengths: length file ") and err.endswith(
        ": File name too long\n") and err.count("\n") == 1, err
    assert not out.exists()

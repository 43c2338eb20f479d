"""Collective profiling with real gloo process groups: spawned workers (2 ranks) and torchrun (4 ranks)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adasched.profiler.collectives import (OPS, CollectiveConfig, fit_collectives, group_sizes_for,
                                           spawn_collectives)
from adasched.profiler.profile import load_profile

REPO = Path(__file__).resolve().parents[2]


def test_group_sizes():
    assert group_sizes_for(1) == [] and group_sizes_for(2) == [2]
    assert group_sizes_for(8) == [2, 4, 8] and group_sizes_for(6) == [2, 4, 6]


def test_config_validation():
    with pytest.raises(ValueError, match="unknown collective"):
        CollectiveConfig(sizes=(8, 16), ops=("broadcastx",))
    with pytest.raises(ValueError, match=">= 2 distinct positive"):
        CollectiveConfig(sizes=(8,))
    with pytest.raises(ValueError, match="nproc"):
        spawn_collectives(1, CollectiveConfig(sizes=(8, 16)))
    # (h45: both passed the constructor - a float size failed inside the workers with a torch signature fragment,
    # no ops measured nothing and fitted nothing)
    for sizes in ((4096.5, 8192), (True, 8192), (np.float64(4096), 8192)):
        with pytest.raises(ValueError, match=r"^sizes: message sizes are whole numbers of bytes"):
            CollectiveConfig(sizes=sizes, ops=("all_reduce",))
    with pytest.raises(ValueError, match=r"^ops: need at least one collective"):
        CollectiveConfig(sizes=(4096, 8192), ops=())
    assert CollectiveConfig(sizes=(np.int64(4096), 8192), ops=("all_reduce",)).sizes[0] == 4096


@pytest.mark.slow
def test_spawned_gloo_workers_fit_all_four_ops():
    """2 spawned ranks; reduce_scatter through its documented all_reduce + shard equivalent (the torchrun test
    below times the backend's own reduce_scatter)."""
    cfg = CollectiveConfig(sizes=(1 << 12, 1 << 16, 1 << 19), warmup=1, repeats=3, timeout_s=60,
                           emulate_reduce_scatter=True)
    res = spawn_collectives(2, cfg, show_progress=False, limit_s=120)
    assert res["world"] == 2 and res["backend"] == "gloo"
    pts = res["points"]
    assert {(p["op"], p["group_size"]) for p in pts} == {(op, 2) for op in OPS}
    assert sorted({p["bytes"] for p in pts}) == [1 << 12, 1 << 16, 1 << 19]
    assert all(p["ms"] > 0 for p in pts)
    fits = fit_collectives(res, ranks_per_node=2, source="measured: test")
    assert sorted(f.op for f in fits) == sorted(OPS)
    for f in fits:
        mine = [p for p in pts if p["op"] == f.op]
        errs = [abs(f.time_ms(p["bytes"]) - p["ms"]) / p["ms"] for p in mine]
        assert f.fit_rel_error == pytest.approx(sum(errs) / len(errs), rel=1e-6)
        assert f.scope == "intra" and f.beta_ms_per_byte > 0 and "gloo, 2 ranks" in f.source
        assert ("all_reduce + local shard" in f.source) == (f.op == "reduce_scatter")
    assert list(res["emulated"]) == ["reduce_scatter"]


@pytest.mark.slow
def test_torchrun_four_ranks_writes_profile(tmp_path):
    """The issue's check: torchrun --standalone --nproc_per_node=4 of the collective profiling."""
    out = tmp_path / "coll.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           "-m", "adasched.launch.profile_collectives", "--out", str(out), "--quick", "--no-microbench",
           "--name", "tr4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout and "Traceback" not in r.stderr
    p = load_profile(out)
    assert p.name == "tr4" and p.world_size == 4 and p.gpus_per_node == 4
    assert {(c.op, c.group_size) for c in p.collectives} == {(op, g) for op in OPS for g in (2, 4)}
    assert all(c.scope == "intra" and c.beta_ms_per_byte > 0 for c in p.collectives)
    assert len(p.raw["collectives"]["points"]) == len(OPS) * 2 * 4
    assert p.attention is None  # --no-microbench
    assert p.raw["collectives"]["emulated"] == {}  # gloo's own reduce_scatter was timed
    assert [f.name for f in tmp_path.iterdir()] == ["coll.json"]  # atomic write: no temp file left


def test_emulated_reduce_scatter_is_recorded_in_source():
    res = {"world": 2, "backend": "gloo", "emulated": {"reduce_scatter": "timed as all_reduce + local shard"},
           "points": [{"op": "reduce_scatter", "group_size": 2, "bytes": b, "ms": 0.1 + b * 1e-6} for b in (1e3, 1e5)]}
    (f,) = fit_collectives(res, 1, "measured: x")
    assert "all_reduce + local shard" in f.source and f.scope == "inter"
    assert f.alpha_ms == pytest.approx(0.1, rel=1e-6) and f.beta_ms_per_byte == pytest.approx(1e-6, rel=1e-6)


def test_torchrun_entry_refuses_outside_torchrun(capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    from adasched.launch.profile_collectives import main

    assert main(["--out", "x.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def test_out_is_checked_before_the_measuring(tmp_path, capsys, monkeypatch):
    """Walk finding: under torchrun a bad --out failed only after every benchmark, once per rank, plus torchrun's
    traceback; --check (what profile_collectives.sh runs first) and the start of the run check it."""
    from adasched.launch.profile_collectives import main

    assert main(["--out", str(tmp_path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and "is a directory" in err and err.count("\n") == 1
    assert main(["--out", str(tmp_path / "p.json"), "--check"]) == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    import adasched.profiler.local as local

    monkeypatch.setattr(local, "profile_in_world", lambda **kw: pytest.fail("measured before checking --out"))
    assert main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ""  # rank 1: silent; rank 0 prints the line


def test_scope_is_inter_when_contiguous_groups_straddle_nodes():
    """6 ranks a node, 12 ranks: a 4-rank group (ranks 4..7) crosses nodes and was labelled 'intra' (4 <= 6)."""
    import numpy as np

    rng = np.random.default_rng(41)
    for world, per_node, want in ((12, 6, {2: "intra", 4: "inter", 8: "inter", 12: "inter"}),
                                  (16, 8, {2: "intra", 4: "intra", 8: "intra", 16: "inter"}),
                                  (6, 6, {2: "intra", 4: "intra", 6: "intra"})):
        pts = [{"op": "all_reduce", "group_size": g, "bytes": b, "ms": float(rng.uniform(0.05, 0.2)) + b * 1e-7}
               for g in group_sizes_for(world) for b in (4096, 1 << 20)]
        fits = fit_collectives({"world": world, "backend": "gloo", "points": pts}, per_node, "measured: x")
        assert {f.group_size: f.scope for f in fits} == want


@pytest.mark.slow
def test_workers_exit_when_the_launcher_is_killed():
    """A launcher killed mid-measurement (SIGKILL: no cleanup runs) must not leave its workers measuring on, or
    waiting out the process-group timeout, as orphans (earlier: ~170 orphaned workers once filled 24 GB)."""
    import signal
    import time

    psutil = pytest.importorskip("psutil")
    code = ("from adasched.profiler.collectives import CollectiveConfig, spawn_collectives\n"
            "spawn_collectives(2, CollectiveConfig(sizes=(8, 16), repeats=10**7, timeout_s=300), "
            "show_progress=False, limit_s=600)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.5)
            workers = [c for c in psutil.Process(launcher.pid).children()
                       if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2, "the two workers never started"
        time.sleep(3)  # let them get into the measuring loop
        assert all(w.is_running() for w in workers)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        # (a worker still importing torch starts its watchdog only after the import: at load average ~8 that took
        # over 15 s once; an orphan would measure on for minutes - repeats 10**7 - or wait out the 300 s timeout)
        gone, alive = psutil.wait_procs(workers, timeout=60)
        assert alive == [], f"{len(alive)} worker(s) still running 60 s after the launcher was killed"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for w in workers:
            try:
                w.kill()
            except psutil.NoSuchProcess:
                pass


def test_a_killed_worker_is_a_runtime_error_not_a_traceback(monkeypatch):
    """A worker killed by a signal (the OOM killer, a segfault): torch raises ProcessExitedException, which is not a
    ProcessRaisedException; it escaped the CLI as a traceback. It is the same one-line RuntimeError now."""
    import torch.multiprocessing as mp

    import adasched.profiler.collectives as coll

    class Killed:
        processes = []

        def join(self, timeout=None):
            raise mp.ProcessExitedException("process 1 terminated with signal SIGKILL", error_index=1, error_pid=4242,
                                            exit_code=-9, signal_name="SIGKILL")

    monkeypatch.setattr(mp, "start_processes", lambda *a, **k: Killed())
    with pytest.raises(RuntimeError, match="^collective profiling failed: process 1 terminated with signal SIGKILL"):
        coll.spawn_collectives(2, coll.CollectiveConfig(sizes=(1024, 4096), warmup=1, repeats=1, timeout_s=5),
                               show_progress=False, limit_s=30)

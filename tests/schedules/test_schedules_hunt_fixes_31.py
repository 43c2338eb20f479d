"""31st session's schedules hunt: smoothing a long run's norms took memory quadratic in its length (100k steps: a
7.45 GiB MemoryError, through the CLI a traceback); UBA took phi third where REX, LinearDecay and WarmupDecay take
warmup_steps (UBA(opt, T, W) ran without warmup at phi = W); `schedules refine --out sched.txt` wrote a schedule
that neither Refined.from_file nor `schedules plot` read back."""
from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from adasched.planner.cli import main
from adasched.schedules import REX, UBA, smooth_norms, write_norms_csv


def _windows_median(g, smoothing):
    """The definition: the median of each odd window about `smoothing` of the run wide, reflect-padded."""
    width = int(round(smoothing * g.size))
    if width <= 1 or g.size < 2:
        return g.copy()
    width += 1 - width % 2
    half = width // 2
    padded = np.concatenate([g[1:half + 1][::-1], g, g[-half - 1:-1][::-1]])
    return np.array([np.median(padded[i:i + width]) for i in range(g.size)])


def test_smoothing_equals_the_windowed_median():
    seed = random.randrange(10**6)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    for n in [*range(1, 40), int(rng.integers(40, 400))]:
        for smoothing in (0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 0.99, float(rng.uniform(0, 1))):
            g = rng.lognormal(size=n)
            np.testing.assert_array_equal(smooth_norms(g, smoothing), _windows_median(g, smoothing),
                                          err_msg=f"{n} {smoothing} (seed {seed})")


def test_a_long_run_is_smoothed_in_linear_memory():
    """300k steps at the default smoothing under a 2.5 GiB address-space limit (the old code asked for 22 GiB)."""
    code = ("import resource, numpy as np; resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000));"
            "from adasched.schedules import refined_multipliers; g = np.random.default_rng().lognormal(size=300_000);"
            "m = refined_multipliers(g); assert m.shape == (300_001,) and abs(m.max() - 1) < 1e-12 and m[-1] == 0.0;"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_uba_takes_warmup_third_like_its_siblings():
    T, W = random.randint(20, 60), random.randint(2, 9)
    opt = [torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=1.0) for _ in range(2)]
    uba, rex = UBA(opt[0], T, W), REX(opt[1], T, W)
    assert uba.warmup_steps == rex.warmup_steps == W and uba.phi == 0.5
    assert uba.get_last_lr()[0] == rex.get_last_lr()[0] == 0.0  # warming up from 0, as REX
    with pytest.raises(TypeError):
        UBA(opt[0], T, W, 0.0, -1, 2.0)  # phi only by name


def test_refine_out_must_be_json(tmp_path, capsys):
    norms = tmp_path / "n.csv"
    g = list(np.random.default_rng().lognormal(size=30))
    write_norms_csv(norms, g, g)
    for name in ("sched.txt", "sched", "sched.json.bak"):
        out = tmp_path / name
        assert main(["schedules", "refine", str(norms), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --out: {out}: the schedule is JSON, told from a norms CSV by its suffix; name it "
                       ".json"], err
        assert not out.exists()
    assert main(["schedules", "refine", str(norms), "--out", str(tmp_path / "s.JSON")]) == 0
    assert main(["schedules", "plot", str(tmp_path / "s.JSON"), "--out", str(tmp_path / "p.png")]) == 0


def test_without_scikit_learn_bench_is_one_line_and_the_demo_step_skips(tmp_path):
    """The 31st session's packaging hunt: scikit-learn is the optional [bench] extra, and without it `adasched
    bench schedules` and the demo's schedules step ended in a ModuleNotFoundError traceback."""
    code = ("import sys; sys.modules['sklearn'] = None; sys.modules['sklearn.datasets'] = None;"
            "sys.modules['sklearn.model_selection'] = None\n"
            "if sys.argv[1] == 'bench':\n"
            "    from adasched.planner.cli import main; sys.exit(main(['bench', 'schedules', '--quick']))\n"
            "from pathlib import Path; from adasched.launch import demo_schedules; demo_schedules.run(Path('out'))")
    r = subprocess.run([sys.executable, "-c", code, "bench"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 2 and r.stderr == ("error: scikit-learn: not installed: the schedules benchmark trains on "
                                              "its digits data (pip install 'adasched[bench]')\n"), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", code, "demo"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("skipped: scikit-learn is not installed"), r.stderr[-2000:]
    assert not any((tmp_path / "out").iterdir())

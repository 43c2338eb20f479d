"""`make demo` step: LR schedules for one budget (240 optimizer steps = the digits benchmark's 100 % budget).

Trains a small MLP on scikit-learn's digits for 240 steps with SGD-momentum + LinearDecay while GradNormRecorder
logs each step's gradient norms, refines a schedule from them, then prints every schedule's lr / peak lr at
0..100 % of the run and writes out_dir/schedules.png (and the norms CSV + refined JSON beside it)."""
from __future__ import annotations

from pathlib import Path

STEPS = 240


def _record_norms(out_dir: Path) -> Path:
    import torch

    from adasched.schedules import GradNormRecorder, LinearDecay
    from adasched.schedules.bench import load_digits_split

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend
    xtr, ytr = load_digits_split()[:2]
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = LinearDecay(opt, STEPS)
    path = out_dir / "schedules_norms.csv"
    g = torch.Generator().manual_seed(0)
    with GradNormRecorder(opt).recording(path):
        for _ in range(STEPS):
            idx = torch.randint(0, xtr.shape[0], (128,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.set_num_threads(threads)
    return path


def run(out_dir: Path) -> None:
    from adasched.planner.ui import print_table
    from adasched.profiler.io import atomic_write_json
    from adasched.schedules.lr import refined_multipliers, smooth_norms
    from adasched.schedules.gradnorm import read_norms_csv
    from adasched.schedules.plots import DEFAULT_SPECS, curve_rows, plot_curves, schedule_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import sklearn  # noqa: F401 - the recorded run trains on its digits data
    except ImportError:
        print("skipped: scikit-learn is not installed (pip install 'adasched[bench]'); the schedules step trains "
              "on its digits data")
        return
    norms_csv = _record_norms(out_dir)
    g = read_norms_csv(norms_csv, "l2")
    m = refined_multipliers(g, "l2", 0.1)
    refined_json = out_dir / "schedules_refined.json"
    atomic_write_json(refined_json, {"kind": "refined_lr_schedule", "schema_version": 1, "source": str(norms_csv),
                                     "norm": "l2", "smoothing": 0.1, "steps": len(g), "grad_norms": g,
                                     "smoothed_norms": smooth_norms(g, 0.1).tolist(), "multipliers": m.tolist()})
    curves = [schedule_curve(s, STEPS) for s in DEFAULT_SPECS] + [schedule_curve(str(refined_json), STEPS)]
    curves[-1] = ("refined (MLP/SGD norms)", curves[-1][1])
    rows, cols = curve_rows(curves)
    print_table(rows, cols, title=f"lr / peak lr over a {STEPS}-step budget (no warmup)")
    png = plot_curves(curves, out_dir / "schedules.png", title=f"schedules, {STEPS}-step budget")
    print(f"wrote {png}, {norms_csv.name}, {refined_json.name}")


if __name__ == "__main__":  # the demo's own entry (its --help, demo-out/); an argument was taken for the folder
    import sys

    from adasched.launch.demo import main

    sys.exit(main(["schedules", *sys.argv[1:]]))

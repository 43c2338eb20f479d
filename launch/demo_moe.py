"""`make demo` step for MoE.

Training part (this file's ``train_part``): a tiny MoE LM with DynaMoE top-p routing and a descending
capacity schedule trains expert-parallel over 2 local gloo ranks under torchrun (r_fwd=2, r_bwd=1 chunks, expert
weight gradients deferred past the backward combine, dense gradients all-reduced in slices during the MoE backward), printing the loss per step; then two capacity
schedules at equal budget are compared on the synthetic task (single process, a few seconds).
Planning part (``plan_part``): FSMoE chooses the forward/backward chunk counts and the gradient slices for the
Mixtral-8x7B preset on 64 GPUs (h100-sxm profile) and prints them against no pipelining and a fixed r = 2; after
training, the router statistics of the trained top-p model (expected k per layer) are fed back into the planner
for the fine-grained preset (``stats_part``).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from adasched.launch.demo import check_step
from adasched.launch.proc import torchrun_tree

__all__ = ["run", "plan_part", "train_part", "stats_part"]


def train_part(out_dir: Path) -> None:
    from adasched.launch.train_moe import compare_schedules

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = out_dir / "moe-router-stats.json"
    args = ["--router", "top_p", "--schedule", "descending", "--layers", "4",
            "--steps", "6", "--r-fwd", "2", "--r-bwd", "1", "--wgrad", "deferred", "--router-stats-out", str(stats)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    print("moe: tiny MoE LM, top-p routing, descending k_max schedule, EP over 2 gloo ranks (torchrun, "
          "r_fwd=2, r_bwd=1, wgrad deferred):")
    try:
        proc = torchrun_tree(2, "adasched.launch.train_moe", args, capture_output=True, env=env, timeout_s=600)
    except subprocess.TimeoutExpired:  # (run_tree stopped torchrun and its ranks)
        raise SystemExit("demo moe: train_moe did not finish within 600 s (stopped)") from None
    for line in proc.stdout.splitlines():
        if " step " in line:
            print("  " + line)
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    check_step(proc.returncode, f"demo moe: train_moe failed (exit {proc.returncode}): {tail[0][-300:]}")
    print(f"  router statistics (mean k per layer) -> {stats}: {json.loads(stats.read_text())['mean_k_per_layer']}")
    res = compare_schedules(["uniform", "descending"], steps=150, layers=4, seeds=[0])
    print("moe: capacity schedules at equal budget (total k = 8 over 4 layers), 150 steps, held-out loss (nats):")
    for r in res["rows"]:
        print(f"  {r['schedule']:12s} k per layer {r['caps']:9s} loss {r['held_out_loss']:.4f} "
              f"({r['vs_uniform']:.3f}x uniform)")
    (out_dir / "moe-schedules.json").write_text(json.dumps(res, indent=1) + "\n")


def plan_part(out_dir: Path) -> None:
    from adasched.planner.cli import main

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / "moe-plan.json"
    print("moe: FSMoE plan, Mixtral-8x7B layers on 64 GPUs (8 nodes x 8, h100-sxm profile):")
    rc = main(["plan", "moe", "--config", "mixtral-8x7b", "--gpus", "64", "--out", str(plan)])
    check_step(rc, f"demo moe: `adasched plan moe` failed with exit status {rc}")
    rc = main(["show", str(plan), "--plot", str(out_dir / "moe-plan.png")])
    check_step(rc, f"demo moe: `adasched show` failed with exit status {rc}")


def stats_part(out_dir: Path) -> None:
    from adasched.planner.cli import main

    out_dir = Path(out_dir)
    stats = out_dir / "moe-router-stats.json"
    print("moe: the trained router's expected k per layer, fed back into the planner (fine-grained preset):")
    rc = main(["plan", "moe", "--config", "fine-grained", "--gpus", "64", "--router-stats", str(stats),
               "--out", str(out_dir / "moe-plan-dynamic-k.json")])
    check_step(rc, f"demo moe: `adasched plan moe --router-stats` failed with exit status {rc}")


def run(out_dir: Path) -> None:
    plan_part(out_dir)
    train_part(out_dir)
    stats_part(out_dir)


if __name__ == "__main__":  # the demo's own entry (its --help, demo-out/), as the other steps'
    import sys

    from adasched.launch.demo import main

    sys.exit(main(["moe", *sys.argv[1:]]))

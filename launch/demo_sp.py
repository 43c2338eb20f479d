"""Demo step `flexsp`: plan 2 FlexSP steps on the built-in A100 profile for 4 GPUs, print the comparison with
the baselines, draw step 0's groups per rank, then train a tiny GPT executing the plan on 4 gloo ranks under
torchrun: step 1 saving a checkpoint (``python -m torch.distributed.run --standalone --nproc_per_node=4 -m
adasched.launch.train_sp --plan <plan> --steps 1 --checkpoint-dir <out>/sp-checkpoints``), then a second launch
that resumes from it for step 2 with ``--check-reference``.

Writes out_dir/sp-plan.json, out_dir/sp-plan.png and out_dir/sp-checkpoints/ (cleared first: a save of an earlier
demo's plan would be refused as another run)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from adasched.launch.demo import check_step
from adasched.launch.proc import torchrun_tree

PLAN_ARGS = ["--profile", "a100-64-flexsp-paper", "--model", "gpt-7b", "--seqlens", "builtin", "--gpus", "4",
             "--global-batch", "64", "--max-context", "12000", "--steps", "2", "--seed", "0", "--time-limit", "0.5"]


def run(out_dir: Path) -> None:
    from adasched.planner.cli import main

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / "sp-plan.json"
    plot = out_dir / "sp-plan.png"
    rc = main(["plan", "sp", *PLAN_ARGS, "--out", str(plan), "--plot", str(plot)])
    check_step(rc, f"demo flexsp: `adasched plan sp` failed with exit status {rc}")
    print(f"FlexSP plan: {plan}; groups per rank of step 0: {plot}", flush=True)
    ckpt = out_dir / "sp-checkpoints"
    shutil.rmtree(ckpt, ignore_errors=True)
    for step_args in (["--steps", "1"], ["--steps", "2", "--check-reference"]):  # the second launch resumes
        train_args = [*step_args, "--checkpoint-dir", str(ckpt)]
        try:
            from adasched.launch.train_sp import launch_local
        except ImportError:  # runtime not installed: run torchrun directly
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
            env.setdefault("OMP_NUM_THREADS", "1")
            rc = torchrun_tree(4, "adasched.launch.train_sp", ["--plan", str(plan), *train_args], env=env,
                               timeout_s=600).returncode
        else:
            rc = launch_local(plan, 4, train_args, timeout_s=600)
        check_step(rc, f"demo flexsp: training on 4 gloo ranks failed with exit status {rc}")


if __name__ == "__main__":  # the demo's own entry (its --help, demo-out/); an argument was taken for the folder
    from adasched.launch.demo import main

    sys.exit(main(["flexsp", *sys.argv[1:]]))

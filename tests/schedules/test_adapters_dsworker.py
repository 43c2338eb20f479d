"""Not a test module: the worker for the 2-rank CPU DeepSpeed test (run as a script by test_adapters.py (named test_adapters_* only to sit with it): one process per rank).

Each rank trains a tiny model with ``deepspeed.initialize(lr_scheduler=DeepSpeedSchedule("rex", ...))`` for K
steps, saves a checkpoint, trains to the end; then a fresh engine loads the checkpoint and trains the same steps.
Writes the lrs of both runs (per step, per param group) to OUT/rank{r}.json."""
from __future__ import annotations

import json
import os
import sys


def build(seed: int):
    import deepspeed
    import torch

    from adasched.schedules.adapters import DeepSpeedSchedule

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    groups = [{"params": model[0].parameters(), "lr": 0.03}, {"params": model[2].parameters(), "lr": 0.007}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, config=config,
                                               lr_scheduler=DeepSpeedSchedule("rex", 2, 12, min_lr_ratio=0.1))
    return engine, sched


def train(engine, steps: int, rank: int, start: int):
    import torch

    lrs = []
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * s + rank)
        x = torch.randn(4, 6, generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        lrs.append([grp["lr"] for grp in engine.optimizer.param_groups])
    return lrs


def main(out_dir: str, ckpt_dir: str) -> None:
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401
    import torch

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (25-120 s here); without it the
    # engine falls back to torch.distributed's gloo all-reduce, which is what this test needs.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", timeout=__import__("datetime").timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    engine, sched = build(0)
    first = train(engine, 5, rank, 0)
    engine.save_checkpoint(ckpt_dir, tag="step5")
    rest_a = train(engine, 7, rank, 5)
    w_a = [p.detach().clone() for p in engine.module.parameters()]
    engine2, sched2 = build(123)  # different init: must come from the checkpoint
    engine2.load_checkpoint(ckpt_dir, tag="step5")
    resumed_at = sched2.last_epoch
    rest_b = train(engine2, 7, rank, 5)
    same_w = all(torch.equal(a, b) for a, b in zip(w_a, engine2.module.parameters()))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"first": first, "rest_a": rest_a, "rest_b": rest_b, "resumed_at": resumed_at,
                   "same_weights": same_w, "type": type(sched).__name__, "last_epoch": sched.last_epoch}, fh)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""What the launchers share: bounds for numbers argparse accepts but a run cannot use, the checkpoint options and the
LR-schedule options (the one-line argument parser is :class:`adasched.planner.ui.OneLineArgParser`; the
finite-seconds and memory checks are in :mod:`adasched.profiler.io`)."""
from __future__ import annotations

import argparse

from adasched.planner.plan import MAX_LAYERS  # most transformer layers a launcher's tiny CPU model takes

__all__ = ["MAX_LAYERS", "add_checkpoint_args", "checkpoint_config", "LR_SCHEDULES", "add_lr_schedule_args",
           "check_lr_schedule", "lr_scheduler", "lr_identity"]


def add_checkpoint_args(p: argparse.ArgumentParser, *, step: str = "optimizer step", folder_holds: str = "") -> None:
    """``--checkpoint-dir``, ``--checkpoint-every``, ``--checkpoint-keep``, ``--checkpoint-async``, ``--load-step``
    (torchtitan's checkpoint.folder / interval / keep_latest_k / async_mode / load_step). ``step`` says what one step
    is in this launcher (e.g. "microbatch of the plan"); ``folder_holds`` names what else the folder keeps (e.g.
    " and its plan")."""
    g = p.add_argument_group("checkpointing (torch.distributed.checkpoint; a run resumes from the newest save in "
                             "--checkpoint-dir)")
    g.add_argument("--checkpoint-dir", default=None,
                   help=f"folder of this run's saves{folder_holds}; if it holds a save, the run resumes from the "
                        f"newest (default: no checkpoints)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help=f"also save after every N completed steps (a step = one {step}) (default 0: only at the end)")
    g.add_argument("--checkpoint-keep", type=int, default=None, metavar="K",
                   help="newest saves kept (default 2; 0 = all)")
    g.add_argument("--checkpoint-async", action="store_true",
                   help="save in the background: training goes on once the state is copied to host memory (one more "
                        "copy of the saved state while a save is in flight); torchtitan's async mode")
    g.add_argument("--load-step", type=int, default=None, metavar="STEP",
                   help="resume from the save taken after STEP completed steps instead of the newest (the saves "
                        "after STEP are another timeline: this run's first save deletes them)")


def checkpoint_config(args: argparse.Namespace):
    """The :class:`~adasched.runtime.checkpoint.CheckpointConfig` the options describe, None without
    --checkpoint-dir (then the other options must not be given). Raises InputError naming the option."""
    from pathlib import Path

    from adasched.profiler.io import InputError
    from adasched.runtime.checkpoint import CheckpointConfig

    if args.checkpoint_dir is None:
        # the defaults are None (not 0 / 2) so that an option given with its default value is refused too
        for opt, value in (("--checkpoint-every", args.checkpoint_every), ("--checkpoint-keep", args.checkpoint_keep),
                           ("--load-step", args.load_step), ("--checkpoint-async", args.checkpoint_async or None)):
            if value is not None:
                raise InputError(opt, "needs --checkpoint-dir")
        return None
    if not str(args.checkpoint_dir).strip():
        raise InputError("--checkpoint-dir", "is empty")
    return CheckpointConfig(folder=Path(args.checkpoint_dir),
                            interval=0 if args.checkpoint_every is None else args.checkpoint_every,
                            keep=2 if args.checkpoint_keep is None else args.checkpoint_keep, load_step=args.load_step,
                            async_save=args.checkpoint_async)


def checkpoint_identity(cfg) -> dict | None:
    """What of a :func:`checkpoint_config` every rank must share (it decides collectives: the async saves' own
    group, resume, the periodic saves): resolved values, so `--checkpoint-keep 2` on one rank equals the default on
    another; the folder's path may differ between nodes."""
    return None if cfg is None else {"async": cfg.async_save, "every": cfg.interval, "keep": cfg.keep,
                                     "load_step": cfg.load_step}


#: --lr-schedule choices: "constant" (no scheduler) and adasched.schedules.get_schedule's names (cosine = UBA phi 2)
LR_SCHEDULES = ("constant", "linear", "cosine", "rex", "uba")


def add_lr_schedule_args(p: argparse.ArgumentParser) -> None:
    """``--lr-schedule`` and ``--warmup-steps`` (the schedule runs over the run's optimizer steps)."""
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="learning-rate schedule over the run's optimizer steps (adasched.schedules.get_schedule; "
                        "cosine = UBA with phi 2), stepped once per optimizer step (default constant: --lr "
                        "throughout, no scheduler)")
    p.add_argument("--warmup-steps", type=int, default=0, metavar="W",
                   help="linear warmup from 0 over the first W optimizer steps of a non-constant --lr-schedule "
                        "(default 0; must be < the run's steps)")


def check_lr_schedule(args: argparse.Namespace, steps: int | None = None) -> None:
    """--warmup-steps on its own and, once the run's step count is known, against it (InputError naming it)."""
    from adasched.profiler.io import InputError

    w = args.warmup_steps
    if w < 0:
        raise InputError("--warmup-steps", f"{w} must be >= 0")
    if w and args.lr_schedule == "constant":
        raise InputError("--warmup-steps", f"{w} needs a decaying --lr-schedule ({', '.join(LR_SCHEDULES[1:])}); "
                                           f"constant keeps --lr from the first step")
    if steps is not None and args.lr_schedule != "constant" and w >= steps:
        raise InputError("--warmup-steps", f"{w} must be < the run's {steps} steps (--steps): the schedule would "
                                           f"never leave its warmup")


def lr_scheduler(args: argparse.Namespace, optimizer, steps: int):
    """The --lr-schedule scheduler over ``steps`` optimizer steps; None for constant."""
    if args.lr_schedule == "constant":
        return None
    from adasched.schedules import get_schedule

    return get_schedule(args.lr_schedule, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=steps)


def lr_identity(args: argparse.Namespace, steps: int) -> dict:
    """The schedule's part of a checkpoint's run identity: a decaying schedule's horizon is the step count, so
    another --steps is another run; a constant LR may be extended by a later launch (total_steps None)."""
    return {"lr": args.lr, "lr_schedule": args.lr_schedule, "warmup_steps": args.warmup_steps,
            "total_steps": None if args.lr_schedule == "constant" else steps}

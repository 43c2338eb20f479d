"""What the launchers share: bounds for numbers argparse accepts but a run cannot use, and the checkpoint options
(the one-line argument parser is :class:`adasched.planner.ui.OneLineArgParser`; the finite-seconds and memory
checks are in :mod:`adasched.profiler.io`)."""
from __future__ import annotations

import argparse

__all__ = ["MAX_LAYERS", "add_checkpoint_args", "checkpoint_config"]

#: most transformer layers a launcher's tiny CPU model takes (a bound on the time to build it)
MAX_LAYERS = 1024


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """``--checkpoint-dir``, ``--checkpoint-every``, ``--checkpoint-keep``, ``--load-step`` (torchtitan's
    checkpoint.folder / interval / keep_latest_k / load_step)."""
    g = p.add_argument_group("checkpointing (torch.distributed.checkpoint; a run resumes from the newest save in "
                             "--checkpoint-dir)")
    g.add_argument("--checkpoint-dir", default=None,
                   help="folder of this run's saves; if it holds one, the run resumes from the newest (default: "
                        "no checkpoints)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also save after every N completed steps (default 0: only at the end)")
    g.add_argument("--checkpoint-keep", type=int, default=2, metavar="K",
                   help="newest saves kept (default 2; 0 = all)")
    g.add_argument("--load-step", type=int, default=None, metavar="STEP",
                   help="resume from this step's save instead of the newest")


def checkpoint_config(args: argparse.Namespace):
    """The :class:`~adasched.runtime.checkpoint.CheckpointConfig` the options describe, None without
    --checkpoint-dir (then the other options must not be given). Raises InputError naming the option."""
    from pathlib import Path

    from adasched.profiler.io import InputError
    from adasched.runtime.checkpoint import CheckpointConfig

    if args.checkpoint_dir is None:
        for opt, value, default in (("--checkpoint-every", args.checkpoint_every, 0),
                                    ("--checkpoint-keep", args.checkpoint_keep, 2),
                                    ("--load-step", args.load_step, None)):
            if value != default:
                raise InputError(opt, "needs --checkpoint-dir")
        return None
    if not str(args.checkpoint_dir).strip():
        raise InputError("--checkpoint-dir", "is empty")
    return CheckpointConfig(folder=Path(args.checkpoint_dir), interval=args.checkpoint_every,
                            keep=args.checkpoint_keep, load_step=args.load_step)

"""`adasched bench checkpoint`: synchronous vs asynchronous checkpoint saves (:mod:`adasched.runtime.ckpt_bench`)."""
from __future__ import annotations

from typing import Optional

import typer

__all__ = ["register", "MAX_REPEATS", "MAX_TRAIN_STEPS"]

MAX_REPEATS = 1000
MAX_TRAIN_STEPS = 10 ** 6


def register(groups) -> None:
    @groups.bench.command("checkpoint")
    def bench_checkpoint_cmd(
        params_m: float = typer.Option(32.0, "--params-m", help="Float32 parameters in the saved model, in units of "
                                                               "2^20 (saved with AdamW's two moments: 12 bytes each)."),
        repeats: int = typer.Option(4, "--repeats", help="Saves per mode (medians and ranges are reported; even: the "
                                                         "order alternates)."),
        train_steps: int = typer.Option(100, "--train-steps", help="Stand-in training steps run after each save (the "
                                                                  "work an asynchronous save overlaps)."),
        folder: Optional[str] = typer.Option(None, "--folder", help="Where to write the saves (default: a temporary "
                                                                     "folder, removed afterwards)."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON only."),
    ) -> None:
        """Checkpointer saves, synchronous vs asynchronous (--checkpoint-async), in one process: how long save()
        blocks the training thread, and save + stand-in training steps until committed (ratios async / sync)."""
        from adasched.planner.ui import emit_json, print_table, progress
        from adasched.profiler.io import InputError, check_host_memory, check_output_folder

        from .ckpt_bench import bench_checkpoint

        if not params_m > 0 or params_m > 1e6:
            raise InputError("--params-m", f"{params_m:g} must be > 0 (and at most 1e6)")
        if not 1 <= repeats <= MAX_REPEATS:  # (10**20 was accepted and ran until killed)
            raise InputError("--repeats", f"{repeats} must be in 1..{MAX_REPEATS}")
        if not 0 <= train_steps <= MAX_TRAIN_STEPS:
            raise InputError("--train-steps", f"{train_steps} must be in 0..{MAX_TRAIN_STEPS}")
        params = int(params_m * 2 ** 20)
        if params < 1:  # (rounded to 0 parameters: the bench's own error named repeats and train_steps)
            raise InputError("--params-m", f"{params_m:g} is under one parameter (the unit is 2**20)")
        # the model and its moments (12 B/param) plus the async stager's copy of them
        check_host_memory(24 * params, "--params-m", f"{params_m:g}M parameters need {24 * params / 2**30:,.1f} GiB "
                                                     f"(weights, AdamW moments and a staged copy)")
        if folder is not None:  # (taken as a str: typer made "" the current folder, filled with the saves)
            check_output_folder(folder, "--folder")
        with progress("checkpoint saves", repeats, enabled=not as_json) as advance:
            res = bench_checkpoint(params, repeats, train_steps, None if folder is None else str(folder),
                                   progress=lambda done, total: advance())
        if as_json:
            emit_json(res)
            return

        def ms(mode, key):
            lo, hi = res[mode][f"{key}_range_s"]
            return f"{res[mode][f'{key}_s'] * 1e3:,.1f} ({lo * 1e3:,.1f}-{hi * 1e3:,.1f})"

        rows = [(mode, ms(mode, "blocking"), ms(mode, "overlapped")) for mode in ("sync", "async")]
        rows.append(("async / sync (medians)", f"{res['blocking_ratio']:.3f}", f"{res['overlapped_ratio']:.3f}"))
        print_table(rows, ["mode", "save() blocks, ms (min-max)",
                           f"save + {train_steps} steps, committed, ms (min-max)"],
                    title=f"checkpoint of {res['params'] / 2**20:g} x 2^20 params "
                          f"({res['state_bytes'] / 2**20:,.0f} MiB "
                          f"with AdamW), {repeats} repeats; the steps alone {res['train_s'] * 1e3:.1f} ms")

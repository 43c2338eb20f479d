"""`adasched profile`: measure this machine and write a ClusterProfile JSON (thin; see profiler.local)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .report import rough_fit_notes

__all__ = ["register"]


def register(groups) -> None:
    @groups.root.command("profile")
    def profile_cmd(
        quick: bool = typer.Option(False, "--quick", help="CI-sized run: tiny shapes, few sizes and repeats "
                                                         "(well under a minute on a 2-core CPU box)."),
        out: Path = typer.Option(Path("profile.json"), "--out", "-o",
                                 help="Where to write the ClusterProfile JSON (written atomically)."),
        nproc: Optional[int] = typer.Option(None, "--nproc",
                                            help="Worker processes for the collective benchmarks when not under "
                                                 "torchrun (gloo on CPU; nccl, one per GPU, on a multi-GPU node; "
                                                 "the profile then describes the GPUs measured); at least 2; "
                                                 "default 4 (2 with --quick) on CPU, the GPU "
                                                 "count (rounded down to a power of two, at most 8) on GPUs; on "
                                                 "a CPU host at most 2 x its cores as a power of two (8 to 64). "
                                                 "Not with --no-collectives, nor under torchrun."),
        no_collectives: bool = typer.Option(False, "--no-collectives", help="Skip the collective benchmarks."),
        name: Optional[str] = typer.Option(None, "--name", help="Profile name (default local-<hostname>)."),
        as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON on stdout (nothing else)."),
    ) -> None:
        """Measure this machine and write a ClusterProfile JSON (the planners' --profile FILE).

        Device inventory (NVML, or the CPU host without a GPU), GEMM rate, copy bandwidth, attention fwd+bwd over sequence lengths (fit a1*s^2 + a2*s + b), the linear layers' cost per token, and all_to_all, all_reduce, all_gather, reduce_scatter over message and group sizes (alpha-beta fits with their error). Under torchrun the collectives use that world (gloo on CPU, nccl on GPU); otherwise --nproc workers are spawned here (gloo on CPU; nccl, one per GPU, on a multi-GPU node; a single GPU skips them). Progress goes to stderr; --json keeps stdout pure JSON.
        """
        from adasched.planner.ui import emit_json, print_table

        from .local import in_torchrun, profile_in_world, profile_local
        from .report import profile_rows

        from .io import InputError, check_output_path

        check_output_path(out, "--out")  # before minutes of measuring, and before any note on stderr
        import os

        if name is not None and not name.strip():
            raise InputError("--name", "is empty (give a profile name, or leave --name out for local-<hostname>)")
        if name is not None:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # (refused by the profile's validation after a minute of measuring)
                raise InputError("--name", f"{name!r} is not valid UTF-8 text") from None
        if nproc is not None and no_collectives:
            raise InputError("--nproc", "has no effect with --no-collectives (no worker processes are started)")
        if nproc is not None and in_torchrun():
            raise InputError("--nproc", "has no effect under torchrun (the collectives run in torchrun's world)")

        if in_torchrun() and no_collectives and os.environ.get("RANK", "0") != "0":
            return  # nothing collective to do: rank 0 profiles and writes alone
        try:
            if in_torchrun() and not no_collectives:
                prof = profile_in_world(quick=quick, out=out, name=name)
                if prof is None:  # not rank 0
                    return
            else:
                prof = profile_local(quick=quick, nproc=nproc, collectives=not no_collectives, name=name)
                from .profile import save_profile

                save_profile(prof, out)
        except (RuntimeError, TimeoutError) as err:  # a worker died or hung: say so, no traceback, no file
            typer.echo(f"error: profile: {' '.join(str(err).split())}", err=True)
            raise typer.Exit(1) from None
        for note in rough_fit_notes(prof):  # stderr: --json keeps stdout pure JSON
            typer.echo(note, err=True)
        if as_json:
            emit_json(prof)
        else:
            print_table(profile_rows(prof), ["field", "value"], title=f"profile {prof.name} -> {out}")

"""torchrun entry point for collective profiling (gloo on CPU, nccl on GPUs).

    torchrun --standalone --nproc_per_node=4 -m adasched.launch.profile_collectives --out profile.json [--quick]

Every rank measures all_to_all / all_reduce / all_gather / reduce_scatter over message sizes and group sizes
(powers of two up to the world); rank 0 adds its device inventory and (unless --no-microbench) the
single-device microbenchmarks, fits the cost models and writes the ClusterProfile atomically.
"""
from __future__ import annotations

import os
import sys

from adasched.planner.ui import OneLineArgParser, is_rank0


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgParser(prog="adasched.launch.profile_collectives", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="ClusterProfile JSON to write (rank 0, atomically)")
    ap.add_argument("--quick", action="store_true", help="CI-sized message sizes and repeats")
    ap.add_argument("--no-microbench", action="store_true", help="only the collectives (skip GEMM/copy/attention/linear)")
    ap.add_argument("--name", default=None, help="profile name (default local-<hostname>)")
    ap.add_argument("--check", action="store_true",
                    help="only check the options, outside torchrun (what profile_collectives.sh runs first)")
    args = ap.parse_args(argv)
    if args.name is not None and not args.name.strip():  # ClusterProfile refuses an empty name after the measuring
        ap.error("argument --name: empty profile name")
    if args.check:
        from adasched.profiler.io import check_output_path, error_line

        try:
            check_output_path(args.out, "--out")
            from adasched.profiler.io import InputError

            nproc = os.environ.get("NPROC") or "4"  # what profile_collectives.sh hands torchrun (${NPROC:-4})
            if not (nproc.isascii() and nproc.isdigit()):  # (' 2' was told it needs >= 2 processes)
                raise InputError("NPROC", f"{nproc!r} is not a whole number")
            if int(nproc) < 2:
                raise InputError("NPROC", f"{nproc}: collectives need >= 2 processes (or run `adasched profile "
                                          f"--no-collectives`)")
            # the bounds `adasched profile --nproc` has (one GPU per nccl rank; a bounded number of CPU processes):
            # NPROC=99999 passed this check and torchrun started 99,999 torch processes
            import torch

            from adasched.profiler.local import resolve_nproc

            ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
            resolve_nproc(int(nproc), quick=args.quick, collectives=True, ngpu=ngpu, option="NPROC")
        except ValueError as err:
            sys.stderr.write(error_line(err))
            return 2
        return 0

    from adasched.profiler.io import check_output_path, error_line
    from adasched.profiler.local import in_torchrun, profile_in_world

    if not in_torchrun():
        sys.stderr.write("error: adasched.launch.profile_collectives: run me under torchrun "
                         "(RANK/WORLD_SIZE/MASTER_ADDR are not set); or use `adasched profile`\n")
        return 2
    try:
        check_output_path(args.out, "--out")  # every rank, before minutes of measuring
        prof = profile_in_world(quick=args.quick, out=args.out, microbench=not args.no_microbench, name=args.name)
    except ValueError as err:  # InputError is a ValueError: one line, from rank 0
        if is_rank0():
            sys.stderr.write(error_line(err))
        return 2
    if prof is not None:
        print(f"wrote {args.out}: {len(prof.collectives)} collective fits on {prof.world_size} ranks "
              f"({prof.num_nodes} node(s) x {prof.gpus_per_node})")
        from adasched.profiler.report import rough_fit_notes

        for note in rough_fit_notes(prof):  # as `adasched profile` says them (this entry said nothing)
            sys.stderr.write(note + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

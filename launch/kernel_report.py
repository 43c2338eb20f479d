"""Compiler report of our Triton kernels for a GPU target, on any machine (no GPU, no device time).

    python -m adasched.launch.kernel_report                 # sm_90 (H100/H200), every kernel
    python -m adasched.launch.kernel_report --arch 100      # sm_100 (B200): warp-specialised where we ask for it
    python -m adasched.launch.kernel_report --only lora --json report.json

One row per kernel configuration (``adasched.kernels.aot.kernel_cases``): registers, spilled bytes, shared memory,
pipeline depth, MMA instructions, warp-specialised partitions and ptxas performance warnings (C7515 = warpgroup
MMAs serialised). Exit status 1 if any row shows a serialised wgmma; 2 on bad arguments. Run it without
TRITON_INTERPRET=1 (it says so otherwise).
"""
from __future__ import annotations

import os
import sys

from adasched.planner.ui import OneLineArgParser
from adasched.profiler.io import InputError, atomic_write_json, check_output_path


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgParser(prog="python -m adasched.launch.kernel_report", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, choices=(90, 100), help="compute capability x10 (default 90)")
    ap.add_argument("--only", default=None, help="comma-separated groups: lora, gemm, moe (default: all)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the rows to this JSON file "
                    "(default: none)")
    args = ap.parse_args(argv)
    try:  # before compiling anything: a bad path must not cost minutes of work
        check_output_path(args.json_out, "--json")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set: run `env -u TRITON_INTERPRET python -m adasched.launch.kernel_report`",
              file=sys.stderr)
        return 2
    only = [g.strip() for g in args.only.split(",")] if args.only is not None else None
    bad = [g for g in (only or []) if g not in ("lora", "gemm", "moe")]
    if bad:  # (an empty --only meant every group; ' ' printed "error: --only:  not in ...")
        print(f"error: --only: {', '.join(g or repr(g) for g in bad)} not in lora, gemm, moe", file=sys.stderr)
        return 2

    from adasched.kernels.aot import compile_report, kernel_cases
    from adasched.kernels.bench import format_table

    rows = []
    for group, label, fn, types, consts, opts, nodiv in kernel_cases(only, args.arch):
        try:
            rep = compile_report(fn, types, consts, opts, arch=args.arch, no_divisibility=nodiv)
            rows.append({"group": group, "kernel": label, **rep, "error": ""})
        except Exception as err:  # a config the compiler rejects is a finding, not a crash
            rows.append({"group": group, "kernel": label, "arch": args.arch, "error": f"{type(err).__name__}: {err}"[:200]})
        print(f"  compiled {label}", file=sys.stderr, flush=True)
    cols = ["group", "kernel", "regs", "spill_bytes", "shared_bytes", "stages", "mma", "tma_loads", "membar_gpu",
            "ws_partitions", "warnings", "error"]
    table = [[("" if r.get(c) is None else ",".join(r[c]) if isinstance(r.get(c), list) else str(r.get(c, "")))
              for c in cols] for r in rows]
    print(format_table(table, cols, title=f"kernel report, sm_{args.arch} (offline compile, Triton's ptxas -v)"))
    if args.json_out:
        atomic_write_json(args.json_out, rows)
    # 1: a serialised wgmma or a kernel the compiler failed on (that was exit 0, as a pass)
    return 1 if any(r.get("wgmma_serialized") or r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

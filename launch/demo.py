"""`make demo`: the main job end to end on embedded defaults. Each area contributes one step module
(launch/demo_<area>.py with ``run(out_dir: Path) -> None``); the steps run in order and write into demo-out/."""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

STEPS = (
    ("profile", "adasched.launch.demo_profile"),
    ("schedules", "adasched.launch.demo_schedules"),
    ("flexsp", "adasched.launch.demo_sp"),
    ("lora", "adasched.launch.demo_lora"),
    ("moe", "adasched.launch.demo_moe"),
    ("twill", "adasched.launch.demo_twill"),
)


def check_step(rc: int, message: str) -> None:
    """A step's command ended with ``rc``: 0 goes on; 130 (the command caught a Ctrl-C and said "aborted") stops
    the demo as a Ctrl-C does; anything else stops it with ``message`` (one line, exit 1)."""
    if rc == 0:
        return
    if rc == 130:
        raise KeyboardInterrupt
    raise SystemExit(message)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = [name for name, _ in STEPS]
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: python -m adasched.launch.demo [STEP ...]   (steps: {' '.join(names)}; none = all, in "
              "this order; outputs in demo-out/)")
        return 0
    unknown = [a for a in argv if a not in names]
    if unknown:
        sys.stderr.write(f"error: step {unknown[0]!r}: unknown (steps: {', '.join(names)})\n")
        return 2
    only = set(argv)
    out = Path("demo-out")
    from adasched.profiler.io import check_output_folder, error_line

    try:  # (a file named demo-out was a FileExistsError traceback)
        check_output_folder(out, "demo-out")
    except ValueError as err:
        sys.stderr.write(error_line(err))
        return 2
    out.mkdir(exist_ok=True)
    t_all = time.perf_counter()
    for name, mod in STEPS:
        if only and name not in only:
            continue
        print(f"\n=== demo step: {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            from adasched.planner.cli import abort_said_by_caller

            with abort_said_by_caller():  # (a step's in-process CLI command said "aborted" too: two lines)
                importlib.import_module(mod).run(out)
        except KeyboardInterrupt:  # (was a traceback, or "failed with exit status 130" and exit 1)
            sys.stdout.flush()
            sys.stderr.write(f"aborted (demo step {name})\n")
            return 130
        print(f"--- {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\ndemo finished in {time.perf_counter() - t_all:.1f} s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

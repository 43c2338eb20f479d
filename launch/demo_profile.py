"""Demo step `profile`: profile this machine (quick) and show the built-in H100 profile with its fitted models.

Writes out_dir/profile-local.json (this machine, quick run incl. 2-rank gloo collectives) and
out_dir/h100-sxm-profile.png (the h100-sxm fits with their measured points)."""
from __future__ import annotations

from pathlib import Path


def run(out_dir: Path) -> None:
    from adasched.launch.demo import check_step
    from adasched.planner.cli import main

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    local = out_dir / "profile-local.json"
    rc = main(["profile", "--quick", "--out", str(local)])
    check_step(rc, f"demo profile: `adasched profile --quick` failed with exit status {rc}")
    plot = out_dir / "h100-sxm-profile.png"
    rc = main(["show", "h100-sxm", "--plot", str(plot)])
    check_step(rc, f"demo profile: `adasched show h100-sxm` failed with exit status {rc}")
    print(f"profile of this machine: {local}; built-in h100-sxm fitted models: {plot}")


if __name__ == "__main__":  # the demo's own entry (its --help, demo-out/); an argument was taken for the folder
    import sys

    from adasched.launch.demo import main

    sys.exit(main(["profile", *sys.argv[1:]]))

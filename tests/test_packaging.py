"""The wheel contains every package folder (a folder with __init__.py under the top-level folders is
adasched/<path>/__init__.py in the wheel) and the profiler's built-in data files."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = ("planner", "runtime", "kernels", "profiler", "schedules", "launch")
SKIP = {".venv", ".git", "build", "dist", "demo-out", ".cache", "__pycache__", ".pytest_cache", ".hypothesis"}


@pytest.mark.slow
def test_wheel_has_every_package_and_data(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                        "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300, cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("adasched-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = sorted(str(p.parent.relative_to(src)) for top in TOP for p in (src / top).rglob("__init__.py")
                      if not any(part in SKIP for part in p.parts))
    assert {"planner", "profiler", "launch"} <= set(expected)
    missing = [d for d in expected if f"adasched/{d}/__init__.py" not in names]
    assert not missing, f"package folders missing from the wheel (add them to pyproject.toml): {missing}"
    # every module of a package folder ships too
    for d in expected:
        for py in (src / d).glob("*.py"):
            assert f"adasched/{d}/{py.name}" in names, py
    data = sorted(p.relative_to(src).as_posix() for p in (src / "profiler" / "builtin").glob("*.json"))
    assert data and all(f"adasched/{p}" in names for p in data)
    assert "adasched/launch/profile_collectives.sh" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    assert "adasched = adasched.planner.cli:main" in zipfile.ZipFile(wheel).read(ep).decode()

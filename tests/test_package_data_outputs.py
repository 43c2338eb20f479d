"""An output file inside the package's built-in data (a Twill graph, a profile, a preset) is refused before any
work: `plan ... --out <that folder>/x.json` left a plan there, beside (or over) the built-in inputs every later run
reads."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

import adasched.profiler.io as io
from adasched.planner.cli import main
from adasched.profiler.io import PACKAGE_DATA_FOLDERS, InputError, atomic_write_text, check_output_path

ROOT = Path(io.__file__).resolve().parent.parent  # the installed adasched package


@pytest.mark.parametrize("folder", PACKAGE_DATA_FOLDERS)
def test_every_built_in_data_folder_is_refused_as_an_output(folder, tmp_path):
    assert (ROOT / folder).is_dir() and any((ROOT / folder).iterdir())
    target = ROOT / folder / f"out-{random.randrange(10**9)}.json"
    with pytest.raises(InputError, match=rf"^--out: {target} is in adasched's built-in data \(adasched/{folder}/\)"):
        check_output_path(target, "--out")
    with pytest.raises(InputError, match="built-in data"):
        atomic_write_text(target, "{}")
    assert not target.exists() and not list((ROOT / folder).glob(".out-*"))
    link = tmp_path / "link.json"  # a link whose target is in there
    link.symlink_to(target)
    with pytest.raises(InputError, match="built-in data"):
        check_output_path(link, "--out")
    check_output_path(tmp_path / "fine.json", "--out")  # elsewhere: no error


def test_plan_out_into_the_graphs_folder_is_one_line(tmp_path, capsys):
    target = ROOT / "planner/twill/graphs/mine.json"
    assert main(["plan", "twill", "--graph", "toy-attention", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out: {target} is in adasched's built-in data (adasched/planner/twill/graphs/): write "
                   "it elsewhere"], err
    assert not target.exists()


def test_the_folders_are_the_package_data_pyproject_ships():
    import tomllib

    data = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    shipped = {f"{pkg.removeprefix('adasched.').replace('.', '/')}/{glob.rsplit('/', 1)[0]}"
               for pkg, globs in data["tool"]["setuptools"]["package-data"].items() for glob in globs if "/" in glob}
    assert shipped == set(PACKAGE_DATA_FOLDERS)

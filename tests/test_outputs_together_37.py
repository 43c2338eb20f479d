"""outputs_together: a block inside another hands its outputs to the enclosing block (before, the inner block
renamed them at its own end, so an outer failure after it left them written)."""
import os

import pytest

from adasched.profiler.io import atomic_path, outputs_together


def _write(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def test_nested_block_waits_for_the_outer_one(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.png"
    with outputs_together():
        _write(a, "outer")
        with outputs_together():
            _write(b, "inner")
        assert not a.exists() and not b.exists()  # the inner block's end commits nothing yet
    assert a.read_text() == "outer" and b.read_text() == "inner"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.png"]  # no temp file left


def test_outer_failure_after_a_nested_block_writes_nothing(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.png"
    b.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with outputs_together():
            with outputs_together():
                _write(b, "new")
            _write(a, "outer")
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["b.png"] and b.read_text() == "old"


def test_inner_failure_removes_only_its_own_outputs_when_caught(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.png"
    with outputs_together():
        _write(a, "outer")
        with pytest.raises(ValueError):
            with outputs_together():
                _write(b, "inner")
                raise ValueError("plot failed")
    assert sorted(os.listdir(tmp_path)) == ["a.json"] and a.read_text() == "outer"

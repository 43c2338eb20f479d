"""34th session: train_moe and train_lora compare every rank's options (and train_lora its plan) before training,
as train_sp did. Each rank parses its own command line (torchrun per node); a rank given another --lr, --steps or
--layers trained on in silence (train_moe: the ranks' losses differed) or waited in the pipeline until --timeout
(train_lora: a traceback). Now: one line on rank 0, exit 2 on every rank, nothing trained or written."""
from __future__ import annotations

import pytest

from adasched.runtime.dist import check_same_on_every_rank, spawn_gloo

TAIL = "every rank must read the same plan file and arguments"


def _moe_worker(rank: int, world: int, extra: list):
    from adasched.launch.train_moe import main

    return main(["--steps", "2", "--layers", "2", "--seq", "8", "--batch", "2", *extra[rank]])


@pytest.mark.parametrize("extra, keys", [
    ([["--lr", "0.003"], ["--lr", "0.001"]], "lr"),
    ([[], ["--steps", "3"]], "steps"),
    ([["--router", "gshard"], ["--router", "top_p"]], "router"),
])
def test_train_moe_ranks_with_other_options_stop_with_one_line(capfd, extra, keys):
    assert spawn_gloo(_moe_worker, 2, extra, timeout_s=90) == [2, 2]
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: train_moe: rank(s) [1] run another plan or options than rank 0 (different: {keys}): "
                     f"{TAIL}"], err
    assert "step" not in out, out  # nothing trained


def _lora_worker(rank: int, world: int, out: str, extra: list):
    from adasched.launch.train_lora import main

    return main(["--out", out, "--jobs", "tiny", "--reference", "--timeout", "30", *extra[rank]])


def test_train_lora_ranks_with_another_model_stop_with_one_line(tmp_path, capfd):
    out = tmp_path / "out"
    assert spawn_gloo(_lora_worker, 2, str(out), [["--hidden", "32"], ["--hidden", "48", "--heads", "3"]],
                      timeout_s=120) == [2, 2]
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: train_lora: rank(s) [1] run another plan or options than rank 0 (different: model): "
                     f"{TAIL}"], lines
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_train_lora_ranks_with_a_checkpoint_dir_on_some_only_stop_with_one_line(tmp_path, capfd):
    """(review) rank 0 with --checkpoint-dir met rank 1's plan broadcast in its save agreement: a traceback after
    the timeout. The options are compared first now."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    assert spawn_gloo(_lora_worker, 2, str(out), [["--checkpoint-dir", str(ck)], []], timeout_s=120) == [2, 2]
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: train_lora: rank(s) [1] run another plan or options than rank 0 (different: "
                     f"checkpoint): {TAIL}"], lines
    assert not out.exists() and not ck.exists()


def test_train_moe_ranks_spelling_out_a_default_train_together(tmp_path, capfd):
    """(review) the raw options were compared: --checkpoint-keep 2 on one rank and the default 2 on the other, or
    --json on rank 0 only, were refused though they run the same. Resolved values are compared now."""
    ck = str(tmp_path / "ck")
    extra = [["--checkpoint-dir", ck, "--checkpoint-keep", "2", "--json"], ["--checkpoint-dir", ck]]
    assert spawn_gloo(_moe_worker, 2, extra, timeout_s=120) == [0, 0]
    out, err = capfd.readouterr()
    assert "error:" not in err, err
    import json

    assert [len(r["losses"]) for r in json.loads(out)["runs"]] == [2]  # both steps trained


def _check_worker(rank: int, world: int, views: list):
    from adasched.profiler.io import InputError

    try:
        check_same_on_every_rank(views[rank], "here")
    except InputError as err:
        return str(err)
    return None


def test_check_same_on_every_rank_names_ranks_and_keys():
    # rank 2 lacks a key rank 0 has, rank 3 has one more: both are differences, named by key, sorted
    views = [{"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 2]}, {"a": 1}, {"a": 1, "b": [1, 2], "c": None}]
    said = spawn_gloo(_check_worker, 4, views, timeout_s=60)
    want = "here: rank(s) [2, 3] run another plan or options than rank 0 (different: b, c): " + TAIL
    assert said == [want] * 4, said
    assert spawn_gloo(_check_worker, 2, [{"x": 1.5}, {"x": 1.5}], timeout_s=60) == [None, None]

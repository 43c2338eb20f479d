"""28th session's SP runtime hunt (each failed before): launch_local let a caller's --world replace its own in the
plan check (then every rank failed under torchrun with a traceback); TinyGPT broadcast a single position over
every token (wrong logits, no error) and a negative one was an IndexError; spawn_gloo waited out its whole timeout
for a rank that left with exit code 0 without reporting; cu_seqlens of 2.5 was read as 2; a shard index of -1
returned the last shard."""
from __future__ import annotations

import os
import random
import time

import pytest
import torch

from adasched.runtime.dist import WorkerError, spawn_gloo
from adasched.runtime.ulysses import head_range, reference_packed_attention, shard_range


def _leaves_quietly(rank, world):
    if rank == 1:
        os._exit(0)
    return rank


def test_a_rank_that_exits_0_without_reporting_is_named():
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as err:
        spawn_gloo(_leaves_quietly, 2, timeout_s=20)
    assert err.value.rank == 1 and "process exited with code 0 before reporting" in str(err.value), str(err.value)
    assert time.monotonic() - t0 < 20  # (it waited timeout_s + 30 s, then a TimeoutError)


@pytest.mark.parametrize("arg", ["--world", "--world=4", "--check-plan-only"])
def test_launch_local_refuses_the_options_it_sets(arg, capsys, tmp_path):
    from adasched.launch.train_sp import launch_local

    args = [arg] + (["4"] if arg == "--world" else [])
    assert launch_local(tmp_path / "p.json", 2, args + ["--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {arg.split('=')[0]}: launch_local sets it"), err


def test_positions_must_match_the_tokens():
    from adasched.runtime.sp_model import TinyGPT, TinyGPTConfig

    torch.manual_seed(random.randint(0, 10**6))
    model = TinyGPT(TinyGPTConfig(vocab=17, hidden=8, heads=2, layers=1, max_len=32))
    n = random.randint(3, 9)
    tokens = torch.randint(0, 17, (n,))
    with pytest.raises(ValueError, match=r"positions \(1,\) and tokens"):
        model(tokens, torch.arange(n)[:1], [0, n])
    bad = torch.arange(n)
    bad[random.randrange(n)] = -random.randint(1, 5)
    with pytest.raises(ValueError, match="is negative"):
        model(tokens, bad, [0, n])
    assert model(tokens, torch.arange(n), [0, n]).shape == (n, 17)


def test_cu_seqlens_are_whole_counts_and_shard_indices_in_range():
    q = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="must be whole token counts"):
        reference_packed_attention(q, q, q, [0, 2.5, 5])
    with pytest.raises(ValueError, match="must be whole token counts"):
        reference_packed_attention(q, q, q, torch.tensor([0.0, 2.5, 5.0]))
    with pytest.raises(ValueError, match="1-D"):
        reference_packed_attention(q, q, q, torch.tensor([[0, 2, 5]]))
    out = reference_packed_attention(q, q, q, torch.tensor([0.0, 2.0, 5.0]))  # whole floats still read
    torch.testing.assert_close(out, reference_packed_attention(q, q, q, [0, 2, 5]), rtol=0, atol=0)
    degree = random.randint(2, 6)
    for bad in (-1, degree, degree + random.randint(1, 5)):
        with pytest.raises(ValueError, match=f"shard index {bad} is not in"):
            shard_range(random.randint(0, 50), degree, bad)
        with pytest.raises(ValueError, match=f"shard index {bad} is not in"):
            head_range(random.randint(1, 12), degree, bad)

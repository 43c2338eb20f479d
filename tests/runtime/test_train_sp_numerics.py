"""Numerics of the SP runtime beyond float32: the tiny GPT's loss keeps float64 (it was cut to float32, so
`train_sp --dtype float64 --check-reference` failed its own 1e-10 tolerance), and a float64 run on 2 gloo ranks
whose SP degree changes between steps (2 -> 1 + 1 -> 2) matches the single-process reference to ~1e-15."""
import copy
import re

import torch

from adasched.launch.train_sp import launch_local
from adasched.planner.flexsp.plan import SPGroup, SPMicroBatch, SPPlan, SPStep
from adasched.planner.plan import SolverRecord, save_plan
from adasched.runtime.sp_model import IGNORE, TinyGPT, TinyGPTConfig, pack_sequences


def test_shard_loss_keeps_float64_and_upcasts_half_logits():
    torch.manual_seed(0)
    model = TinyGPT(TinyGPTConfig(vocab=19, hidden=8, heads=2, layers=1, max_len=16)).double()
    g = torch.Generator().manual_seed(1)
    batch = pack_sequences([torch.randint(0, 19, (n,), generator=g) for n in (7, 2, 11)])
    targets = 7 + 2 + 11 - 3
    loss = model.shard_loss(batch.tokens, batch.positions, batch.targets, batch.cu_seqlens, None, targets)
    assert loss.dtype == torch.float64  # was float32: logits.float() downcast a float64 model
    (d_head,) = torch.autograd.grad(loss, model.head.weight)
    # the same loss written out in float64: log-softmax of the logits at each target
    logits = model(batch.tokens, batch.positions, batch.cu_seqlens)
    keep = batch.targets != IGNORE
    want = -torch.log_softmax(logits, dim=-1)[keep].gather(1, batch.targets[keep, None]).sum() / targets
    (want_head,) = torch.autograd.grad(want, model.head.weight)
    assert abs(loss.item() - want.item()) <= 1e-14 * abs(want.item())
    torch.testing.assert_close(d_head, want_head, rtol=1e-12, atol=1e-14)
    # a bfloat16 model's logits still go up to float32 for the softmax (what .float() was there for)
    half = copy.deepcopy(model).to(torch.bfloat16)
    lh = half.shard_loss(batch.tokens, batch.positions, batch.targets, batch.cu_seqlens, None, targets)
    assert lh.dtype == torch.float32 and abs(lh.item() - want.item()) < 0.05 * want.item()


def _group(ranks, ids, lens):
    return SPGroup(degree=len(ranks), ranks=ranks, seq_ids=ids, seqlens=[lens[i] for i in ids], predicted_ms=1.0)


def test_float64_check_reference_two_ranks_degree_changes(tmp_path, monkeypatch, capfd):
    l0, l1 = [13, 4, 9], [7, 3, 10, 5]
    steps = [
        SPStep(step=0, seqlens=l0, predicted_ms=2.0, micro_batches=[
            SPMicroBatch(groups=[_group([0, 1], [0, 1], l0)], predicted_ms=1.0),   # degree 2, 17 tokens: 9 / 8
            SPMicroBatch(groups=[_group([1], [2], l0)], predicted_ms=1.0)]),       # rank 0 idle
        SPStep(step=1, seqlens=l1, predicted_ms=1.0, micro_batches=[
            SPMicroBatch(groups=[_group([0], [0, 3], l1), _group([1], [1, 2], l1)], predicted_ms=1.0)]),  # 1 + 1
    ]
    plan = tmp_path / "plan.json"
    save_plan(SPPlan(world_size=2, model="tiny-gpt", inputs_digest="test", predicted_ms=3.0, steps=steps,
                     solver=SolverRecord(backend="hand", status="heuristic", solve_seconds=0.0)), plan)
    monkeypatch.chdir(tmp_path)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    rc = launch_local(plan, 2, ["--steps", "3", "--check-reference", "--dtype", "float64", "--heads", "2",
                                "--head-dim", "4", "--timeout", "60", "--seed", "2"], timeout_s=180)
    r = capfd.readouterr()
    assert rc == 0, r.out + r.err
    diffs = re.findall(r"step (\d): plan step (\d), .*rel\. diff loss ([\d.e+-]+), grads ([\d.e+-]+)\)", r.out)
    assert [d[:2] for d in diffs] == [("0", "0"), ("1", "1"), ("2", "0")], r.out
    for _, _, dl, dg in diffs:  # float64 end to end: measured <= 1e-15 (was 2.6e-9 with a float32 loss)
        assert float(dl) <= 1e-13 and float(dg) <= 1e-13, r.out
    assert "(tolerance 1e-10, float64): OK" in r.out

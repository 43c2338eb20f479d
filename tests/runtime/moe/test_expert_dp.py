"""Expert data parallelism on 4 real gloo ranks with EP size 2: EP groups {0,1} {2,3}, expert copies (the
expert-data-parallel groups) {0,2} {1,3}. One training step of a tiny MoE LM on different data per rank:

- the expert gradients (ExpertGradReducer: summed over the copies, divided by the data-parallel size) and the dense
  gradients (GradSliceReducer over ep.dp_group) equal a float64 single-process reference of the data-parallel
  objective, the mean over the 4 ranks of each rank's loss (LM loss + router losses), every element;
- after an SGD step every expert's two copies are bitwise equal, and so is every dense parameter on the 4 ranks;
- the old reduction (dense grads only, expert grads divided by the world, what launch/train_moe did) leaves the
  copies different: this is what the test would catch on the old code;
- gradient accumulation: two micro-batches (the first under no_sync of both reducers) equal one big batch and the
  float64 reference on the concatenated data of all ranks (router losses off, so one batch = its halves);
- torch DDP over the data-parallel group, told to ignore the expert shards, plus ExpertGradReducer: the same;
- router state (sigmoid_bias's bias, top_p's controlled p) moves on every data-parallel rank's statistics
  (ep.dp_group), equal on the 4 ranks and to the reference's (over the EP group only, p differed between groups);
- the groups themselves (flat, hierarchical, a data-parallel group smaller than the world) and the ValueErrors.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from adasched.launch.train_moe import main
from adasched.runtime.dist import spawn_gloo
from adasched.runtime.moe import (ExpertGradReducer, ExpertParallel, GradSliceReducer, RouterConfig,
                                  named_parameters_by_kind, replica_divergence)
from adasched.runtime.moe.lm import MarkovTask, TinyMoELM, lm_loss

ROOT = Path(__file__).resolve().parents[3]
WORLD, EP = 4, 2
VOCAB, D, HEADS, FFN, E, S, B, LAYERS = 11, 8, 2, 6, 4, 5, 3, 2
LR = 0.5
# float32 model against a float64 reference: float32 roundings through two blocks (measured max error 4.3e-8 ..
# 4.6e-7 absolute, the larger with the seed-9 weights of the DDP case)
ATOL, RTOL = 1e-6, 1e-5


def _routers(kind="gshard", aux=True):
    coefs = {} if aux else {"aux_loss_coef": 0.0, "z_loss_coef": 0.0}
    return [RouterConfig(kind=kind, num_experts=E, top_k=2, **coefs) for _ in range(LAYERS)]


def _models(ep, routers, seed=3, r=(2, 1)):
    """(float32 EP model, float64 single-process reference) with the same weights."""
    torch.manual_seed(seed)
    ref = TinyMoELM(VOCAB, D, HEADS, FFN, routers, max_len=S, backend="torch")
    ref.init_experts(seed + 1)
    model = TinyMoELM(VOCAB, D, HEADS, FFN, routers, max_len=S, ep=ep, r_fwd=r[0], r_bwd=r[1], backend="torch")
    model.init_experts(seed + 1)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p, kind in named_parameters_by_kind(model):
            if kind == "dense":
                p.copy_(ref_params[name])
    return model, ref.double()


def _data(micro=1):
    """Every rank's (inputs, targets), the same on every rank: rank r's batch is data[r]."""
    task = MarkovTask(VOCAB)
    return [task.batch(torch.Generator().manual_seed(100 + r), B * micro, S) for r in range(WORLD)]


def _close(got, want, what):
    want = want.to(got.dtype)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    bad = ~torch.isclose(got, want, atol=ATOL, rtol=RTOL)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} mismatched, first {bad.nonzero()[:3].tolist()}, "
                           f"max err {float((got - want).abs().max()):.3g}")
    return float((got - want).abs().max())


def _reducers(model, ep):
    dense, expert = model.dense_parameters(), model.expert_parameters()
    n = sum(p.numel() for p in dense)
    dense_red = GradSliceReducer(dense, [n / LAYERS] * LAYERS, group=ep.dp_group)   # slices in the MoE gaps
    for m in model.moe_layers():
        m.reducer = dense_red
    # small buckets: several all-reduces launched from the gradient hooks during the backward
    return dense_red, ExpertGradReducer(expert, ep, bucket_elements=150)


def _compare_grads(model, ref, ep, what):
    """Every gradient of the EP model against the reference's (experts: this rank's shard); max abs error."""
    ref_params = dict(ref.named_parameters())
    err = 0.0
    kinds = set()
    for name, p, kind in named_parameters_by_kind(model):
        want = ref_params[name].grad
        if kind == "expert":
            off = model.blocks[int(name.split(".")[1])].moe.expert_offset
            want = want[off:off + p.shape[0]]
        err = max(err, _close(p.grad, want, f"{what}: {kind} {name}"))
        kinds.add(kind)
    assert kinds == {"dense", "expert"}
    return err


def _gather(t):
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _copies_differ(model, rank):
    """Largest difference between a parameter and its copies: expert shards on ranks r and r+2 (the same experts
    in both EP groups), dense parameters on every rank. Cross-checks replica_divergence (same value)."""
    worst = 0.0
    for name, p, kind in named_parameters_by_kind(model):
        got = _gather(p.detach())
        peers = [rank % EP, rank % EP + EP] if kind == "expert" else range(WORLD)
        for q in peers:
            worst = max(worst, float((got[q] - p.detach()).abs().max()))
    return worst


def _step_case(rank, ep):
    """One step on different data per rank: gradients vs the float64 reference, copies equal after SGD."""
    model, ref = _models(ep, _routers())
    data = _data()
    dense_red, expert_red = _reducers(model, ep)
    x, y = data[rank]
    (lm_loss(model(x), y) + model.aux_loss()).backward()
    launched_in_backward = expert_red.launched_elements
    dense_red.finish()
    expert_red.finish()
    expert_total = sum(p.numel() for p in model.expert_parameters())
    assert 0 < launched_in_backward, "no expert bucket was launched during the backward"
    for xr, yr in data:                                  # the data-parallel objective: mean of the ranks' losses
        ((lm_loss(ref(xr), yr) + ref.aux_loss()) / WORLD).backward()
    err = _compare_grads(model, ref, ep, "one step")
    torch.optim.SGD(model.parameters(), lr=LR).step()
    assert _copies_differ(model, rank) == 0.0 == replica_divergence(model, ep)
    dense_red.remove()
    expert_red.remove()
    return err, launched_in_backward, expert_total


def _ddp_case(rank, ep):
    """torch DDP over the data-parallel group for the dense parameters, told to ignore the expert shards (else it
    would broadcast rank 0's experts over every rank's at construction and average different experts), plus
    ExpertGradReducer for those: the same gradients as the float64 reference."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, ref = _models(ep, _routers(), seed=9)
    experts = [n for n, _, kind in named_parameters_by_kind(model) if kind == "expert"]
    DDP._set_params_and_buffers_to_ignore_for_model(model, experts)
    ddp = DDP(model, process_group=ep.dp_group)
    expert_red = ExpertGradReducer(model.expert_parameters(), ep)
    data = _data()
    x, y = data[rank]
    (lm_loss(ddp(x), y) + model.aux_loss()).backward()
    expert_red.finish()
    for xr, yr in data:
        ((lm_loss(ref(xr), yr) + ref.aux_loss()) / WORLD).backward()
    expert_red.remove()
    return _compare_grads(model, ref, ep, "DDP + ExpertGradReducer")


def _old_reduction_case(rank, ep):
    """What launch/train_moe did before expert data parallelism: dense grads averaged over the world, expert grads
    divided by the world but not reduced over their copies. The copies then hold different weights after one step,
    and the expert gradients miss the other EP group's tokens."""
    model, ref = _models(ep, _routers())
    x, y = _data()[rank]
    dense_red, _ = _reducers(model, ep)
    (lm_loss(model(x), y) + model.aux_loss()).backward()
    dense_red.finish()
    for p in model.expert_parameters():
        p.grad /= WORLD
    torch.optim.SGD(model.parameters(), lr=LR).step()
    diverged = _copies_differ(model, rank)
    assert diverged > 1e-5, f"copies of the experts stayed equal without expert-DP reduction ({diverged:.3g})"
    worst = torch.tensor(diverged, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)        # replica_divergence: the same value on every rank
    assert abs(replica_divergence(model, ep) - float(worst)) <= 1e-12 * float(worst)
    dense_red.remove()
    return diverged


def _accumulation_case(rank, ep):
    """Two micro-batches (first under no_sync) == one big batch == float64 reference on all ranks' data at once."""
    routers = _routers(aux=False)
    data = _data(micro=2)
    x, y = data[rank]
    acc, ref = _models(ep, routers, seed=5)
    big, _ = _models(ep, routers, seed=5)
    dense_red, expert_red = _reducers(acc, ep)
    with dense_red.no_sync(), expert_red.no_sync():
        (lm_loss(acc(x[:B]), y[:B]) / 2).backward()
    assert expert_red.launched_elements == 0 and dense_red.launched_elements == 0
    (lm_loss(acc(x[B:]), y[B:]) / 2).backward()
    dense_red.finish()
    expert_red.finish()
    dense_big, expert_big = _reducers(big, ep)
    lm_loss(big(x), y).backward()
    dense_big.finish()
    expert_big.finish()
    xs = torch.cat([d[0] for d in data])               # one forward on the concatenated data of the 4 ranks
    ys = torch.cat([d[1] for d in data])
    lm_loss(ref(xs), ys).backward()
    err_acc = _compare_grads(acc, ref, ep, "2 micro-batches")
    err_big = _compare_grads(big, ref, ep, "one big batch")
    for (name, p), q in zip(acc.named_parameters(), big.parameters()):
        _close(p.grad, q.grad.double(), f"accumulated vs big batch: {name}")
    for r in (dense_red, expert_red, dense_big, expert_big):
        r.remove()
    return max(err_acc, err_big)


def _router_state_case(rank, ep):
    """Router state moves on the statistics of every data-parallel rank (ep.dp_group): sigmoid_bias's bias (layer 0,
    from the token counts) and top_p's controlled p (layer 1, from the mean k) stay equal on the 4 ranks and equal
    the reference's after one forward on the concatenated data (reduced over the EP group only, p differed between
    the two EP groups)."""
    routers = [RouterConfig(kind="sigmoid_bias", num_experts=E, top_k=2),
               RouterConfig(kind="top_p", num_experts=E, k_max=3, p=0.6, target_k=1.2, controller_rate=0.05)]
    model, ref = _models(ep, routers, seed=7)
    data = _data()
    x, y = data[rank]
    (lm_loss(model(x), y) + model.aux_loss()).backward()
    xs = torch.cat([d[0] for d in data])
    ys = torch.cat([d[1] for d in data])
    (lm_loss(ref(xs), ys) + ref.aux_loss()).backward()
    (m0, m1), (r0, r1) = model.moe_layers(), ref.moe_layers()
    for what, got, want, start in (("expert bias", m0.router.expert_bias, r0.router.expert_bias, 0.0),
                                   ("top_p p", m1.router.p_threshold, r1.router.p_threshold, 0.6)):
        assert float((got - start).abs().max()) > 0, f"{what} did not move"
        for other in _gather(got.reshape(-1)):
            assert torch.equal(other, got.reshape(-1)), f"{what} differs between ranks"
        _close(got, want.to(torch.float64), what)


def _groups_case(rank):
    """The groups and their ranks; a data-parallel group smaller than the world; the ValueErrors."""
    ep = ExpertParallel.create_groups(E, EP)
    assert ep.ranks == [rank - rank % 2, rank - rank % 2 + 1] and ep.rank == rank % 2
    assert ep.expert_dp_ranks == [rank % 2, rank % 2 + 2] and ep.expert_dp_size == 2 and ep.dp_size == WORLD
    assert ep.experts_per_rank == E // EP
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=ep.expert_dp_group)
    assert float(t) == sum(ep.expert_dp_ranks)
    full = ExpertParallel.create_groups(E, WORLD)            # = create(): no copies
    assert full.ranks == [0, 1, 2, 3] and full.expert_dp_group is None and full.expert_dp_ranks == [rank]
    old = ExpertParallel.create(E)                           # unchanged: data-parallel group = the EP group
    assert old.dp_ranks == [0, 1, 2, 3] and old.expert_dp_size == 1
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = halves[rank // 2]
    rep = ExpertParallel.create_groups(E, 1, group=mine)     # data-parallel groups {0,1} {2,3}, experts replicated
    assert rep.ranks == [rank] and rep.dp_ranks == [rank - rank % 2, rank - rank % 2 + 1]
    assert rep.expert_dp_ranks == rep.dp_ranks
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=rep.expert_dp_group)
    assert float(t) == sum(rep.dp_ranks)
    errors = []
    for kw, needle in (({"num_experts": E, "ep_size": 3}, "ep_size: 3 does not divide the data-parallel size 4"),
                       ({"num_experts": 6, "ep_size": 4}, "num_experts: 6 is not divisible"),
                       ({"num_experts": E, "ep_size": 0}, "ep_size: 0 must be an int >= 1"),
                       ({"num_experts": E, "ep_size": 2, "hierarchical": True, "gpus_per_node": 3},
                        "gpus_per_node: 3 does not divide")):
        try:
            ExpertParallel.create_groups(**kw)
        except ValueError as err:
            assert needle in str(err), err
            errors.append(needle)
    assert len(errors) == 4, errors
    return ep


def _launcher_case(rank, world):
    """The launcher's training (make_ep + _train_one) with --ep-size 4, 2 and 1 trains the same model: the same
    first loss, final losses within float32 rounding, every copy equal at the end."""
    from adasched.launch.train_moe import _train_one, make_ep, parse_args

    runs = {}
    for ep_size in (4, 2, 1):
        args = parse_args(["--ep-size", str(ep_size), "--layers", "1", "--steps", "3", "--batch", "2", "--seq", "8",
                           "--experts", "4"])
        ep = make_ep(args, world)
        assert ep.size == ep_size and ep.expert_dp_size == world // ep_size
        runs[ep_size] = _train_one(args, "top_p", "uniform", rank, world, ep, lambda m: None)
    for ep_size, run in runs.items():
        assert run["copies_max_diff"] == 0.0, (ep_size, run)
        assert run["first_loss"] == runs[4]["first_loss"], (ep_size, run["first_loss"], runs[4]["first_loss"])
        assert abs(run["final_loss"] - runs[4]["final_loss"]) <= 1e-5, (ep_size, run["final_loss"],
                                                                         runs[4]["final_loss"])
    return max(abs(run["final_loss"] - runs[4]["final_loss"]) for run in runs.values())


def _worker(rank, world):
    flat = _groups_case(rank)
    hier = ExpertParallel.create_groups(E, EP, hierarchical=True, gpus_per_node=1)
    assert hier.inter_group is not None and hier.expert_dp_ranks == flat.expert_dp_ranks
    model, _ = _models(flat, _routers())
    kinds = {n: k for n, _, k in named_parameters_by_kind(model)}
    assert {n for n, k in kinds.items() if k == "expert"} == {f"blocks.{i}.moe.w{j}" for i in range(LAYERS)
                                                              for j in (1, 2)}
    assert all(p.allreduce is False for p in model.expert_parameters())
    err_flat, launched, total = _step_case(rank, flat)
    err_hier, _, _ = _step_case(rank, hier)
    diverged = _old_reduction_case(rank, flat)
    err_acc = _accumulation_case(rank, flat)
    err_ddp = _ddp_case(rank, flat)
    _router_state_case(rank, flat)
    launcher_spread = _launcher_case(rank, world)
    return {"err": max(err_flat, err_hier, err_acc, err_ddp), "launched": launched, "total": total,
            "diverged": diverged, "launcher_spread": launcher_spread}


def test_expert_data_parallel_world4_ep2():
    out = spawn_gloo(_worker, WORLD, timeout_s=60)
    for r in out:                                        # every element was compared inside the workers
        assert 0 < r["launched"] <= r["total"] and r["diverged"] > 1e-5, r
    print("max abs grad error vs float64:", max(r["err"] for r in out), "old-code copy divergence:",
          min(r["diverged"] for r in out), "launcher final-loss spread over EP 4/2/1:", out[0]["launcher_spread"])


def test_parameter_kinds_without_ep_are_all_dense():
    model = TinyMoELM(VOCAB, D, HEADS, FFN, _routers(), max_len=S, backend="torch")
    assert {k for _, _, k in named_parameters_by_kind(model)} == {"dense"}
    assert model.expert_parameters() == [] and len(model.dense_parameters()) == len(list(model.parameters()))
    assert not hasattr(model.blocks[0].moe.w1, "allreduce")


@pytest.mark.parametrize("argv,needle", [
    (["--ep-size", "3"], "--ep-size: 3 does not divide the world size 4"),
    (["--ep-size", "0"], "--ep-size: 0 must be >= 1"),
    (["--ep-size", "4", "--experts", "6"], "--ep-size: 4 does not divide --experts 6"),
    (["--ep-size", "6", "--experts", "12", "--hierarchical", "--gpus-per-node", "4"],   # 12 ranks: nodes of 4
     "--gpus-per-node: an expert-parallel group of 6 ranks does not split into nodes of 4"),
])
def test_launcher_ep_size_errors(monkeypatch, capsys, argv, needle):
    monkeypatch.setenv("WORLD_SIZE", "12" if "--hierarchical" in argv else "4")
    assert main(["--validate-only"] + argv) == 2
    assert capsys.readouterr().err == f"error: {needle}\n"


def test_torchrun_launcher_ep2_of_4_keeps_copies_equal():
    """launch/train_moe.sh on 4 gloo ranks with --ep-size 2 (two EP groups, every expert on 2 ranks): trains, and
    after the last step every parameter equals its copies bitwise (replica_divergence 0.0)."""
    env = dict(os.environ, PYTHON=sys.executable, NPROC="4", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "train_moe.sh"), "--ep-size", "2", "--steps", "2",
                           "--layers", "1", "--router", "top_p", "--json"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["world"] == 4 and res["ep_size"] == 2
    (run,) = res["runs"]
    assert run["copies_max_diff"] == 0.0
    assert 1.0 < run["final_loss"] < 4.0


def _noncontiguous_worker(rank, world):
    import torch

    from adasched.runtime.moe import GradSliceReducer

    g = torch.Generator().manual_seed(17 + rank)
    out = {}
    for make in ("contiguous", "transposed", "channels_last", "unused_channels_last"):
        if make == "contiguous":
            w = torch.nn.Parameter(torch.randn(3, 4))
        elif make == "transposed":
            w = torch.nn.Parameter(torch.randn(4, 3).t())            # (3, 4), strides (1, 3)
        else:
            w = torch.nn.Parameter(torch.randn(2, 3, 2, 2).to(memory_format=torch.channels_last))
        red = GradSliceReducer([w], slices=[], average=True)
        x = torch.randn(w.shape, generator=g, dtype=torch.float64).float()
        if make != "unused_channels_last":
            (w * x).sum().backward()                                 # grad = x, different on every rank
        red.finish()
        out[make] = (x if make != "unused_channels_last" else torch.zeros_like(x), w.grad.detach().clone())
        red.remove()
    return out


def test_gradients_that_are_not_contiguous_are_averaged():
    """Hunt finding: the reducer sliced p.grad.reshape(-1), a copy for a transposed or channels_last gradient, and
    wrote the averaged values into that copy: every rank kept its own gradient (replicas drifting apart)."""
    res = spawn_gloo(_noncontiguous_worker, 2, timeout_s=60)
    for make in res[0]:
        want = (res[0][make][0] + res[1][make][0]) / 2
        for r in (0, 1):
            got = res[r][make][1]
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{make} rank {r}")

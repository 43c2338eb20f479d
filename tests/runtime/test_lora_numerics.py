"""Numerics of the multi-adapter LoRA trainer on a hand-made plan that the planner's own tests do not produce:
global batches split over several microbatches AND microbatches shared by both jobs (segment order varies), a
no-op microbatch, 3 layers (uneven 1 + 2 stage split).

- fused trainer (Triton interpreter) == one plain PEFT AdamW step per global batch on that batch's per-token mean
  loss, for both jobs (per-job lr, rsLoRA), losses and adapters;
- each job's optimizer steps exactly once per global batch, right after the backward of that batch's last
  microbatch, with the job's lr (1 stage and on both stages of the pipeline);
- the 2-stage 1F1B pipeline over 2 gloo ranks (fused path) == the single-process run;
- no leak between jobs packed together: changing job B's tokens leaves job A's losses and adapter bit for bit
  unchanged (dropout on for both, so the per-row masks are exercised as well).
"""
from __future__ import annotations

import pytest
import torch

from adasched.planner.lorafusion.costmodel import padded
from adasched.planner.lorafusion.jobs import build_workload, parse_jobs
from adasched.planner.lorafusion.plan import LoRAMicrobatch, LoRASegment, build_plan
from adasched.profiler.profile import load_profile
from adasched.runtime import lora_trainer as lt
from adasched.runtime.dist import spawn_gloo
from adasched.runtime.lora_model import TinyCausalLM, TinyLMConfig

CFG = TinyLMConfig(vocab_size=29, hidden=16, layers=3, heads=2, ffn_hidden=24, max_positions=64, seed=3)
# (job, global batch, sample ids) per microbatch; job 0 = samples 0..7 (2 x 4), job 1 = samples 8..13 (2 x 3)
LAYOUT = [
    [(0, 0, [0, 1])],
    [(0, 0, [2, 3]), (1, 0, [8])],
    [(1, 0, [9, 10])],
    [],                                  # no-op
    [(0, 1, [4, 5])],                    # 3 after job 0's last microbatch of batch 0: fine for 2 stages
    [(1, 1, [11]), (0, 1, [6])],         # job 1 first in this packed microbatch
    [(0, 1, [7]), (1, 1, [12, 13])],
]


def make_plan(dropout_a: float = 0.0, dropout_b: float = 0.0, layout=LAYOUT):
    jobs = parse_jobs({
        "capacity": 256, "stages": 2, "global_batches": 2, "seed": 7, "layers": CFG.layers,
        "jobs": [
            {"name": "ja", "adapter": {"r": 4, "alpha": 8, "dropout": dropout_a,
                                       "target_modules": ["q_proj", "v_proj", "down_proj"]},
             "lengths": {"dist": "lognormal", "median": 9, "sigma": 0.5, "min": 2, "max": 24},
             "global_batch_size": 4, "lr": 0.02},
            {"name": "jb", "adapter": {"r": 2, "alpha": 4, "dropout": dropout_b, "use_rslora": True,
                                       "target_modules": ["k_proj", "o_proj", "up_proj"]},
             "lengths": {"dist": "lognormal", "median": 7, "sigma": 0.5, "min": 2, "max": 24},
             "global_batch_size": 3, "lr": 0.05},
        ]})
    plan = build_plan(build_workload(jobs, label="numerics"), load_profile("h100-sxm"), use_milp=False)
    mbs = []
    for segs in layout:
        ss = [LoRASegment(job=j, global_batch=g, samples=ids, tokens=sum(plan.lengths[i] for i in ids),
                          padded_tokens=padded(sum(plan.lengths[i] for i in ids))) for j, g, ids in segs]
        mbs.append(LoRAMicrobatch(segments=ss, padded_tokens=sum(s.padded_tokens for s in ss)))
    plan = plan.model_copy(update={"microbatches": mbs})
    try:  # the full layout is a plan that verifies (its prediction re-simulated); a subset of it cannot be
        return plan.resimulated()  # simulated (its pipeline waits on microbatches it lacks) and is used in-process
    except ValueError:
        return plan


def _expected_steps(plan) -> list[tuple[int, int]]:
    """(job, microbatch) where each job must step: the last microbatch holding each (job, global batch)."""
    last = {}
    for i, mb in enumerate(plan.microbatches):
        for s in mb.segments:
            last[(s.job, s.global_batch)] = i
    return sorted((j, i) for (j, _), i in last.items())


def _record_steps(monkeypatch_setattr, log: list) -> None:
    """Wrap the trainer so that every optimizer step logs (job, microbatch index being processed, lr)."""
    pack, make_opts = lt.pack_microbatch, lt._optimizers
    current = {}

    def pack_spy(plan, i, *a, **k):
        current["i"] = i
        return pack(plan, i, *a, **k)

    def opts_spy(adapters, plan, layers):
        opts = make_opts(adapters, plan, layers)
        for j, opt in enumerate(opts):
            if opt is not None:
                step = opt.step

                def logged(*a, _step=step, _j=j, _opt=opt, **k):
                    log.append((_j, current["i"], _opt.param_groups[0]["lr"]))
                    return _step(*a, **k)

                opt.step = logged
        return opts

    monkeypatch_setattr(lt, "pack_microbatch", pack_spy)
    monkeypatch_setattr(lt, "_optimizers", opts_spy)


def _peft_reference(plan, j, init_state, data):
    """Plain PEFT training of job j: per global batch, every sample run on its own, loss = sum of the batch's
    token cross-entropies / its target tokens, one AdamW step (weight decay 0, the job's lr)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    spec = plan.jobs[j].adapter
    pm = get_peft_model(TinyCausalLM(CFG), LoraConfig(r=spec.r, lora_alpha=spec.alpha, use_rslora=spec.use_rslora,
                                                      target_modules=list(spec.modules), lora_dropout=0.0))
    res = set_peft_model_state_dict(pm, init_state)
    assert not res.unexpected_keys
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=plan.jobs[j].lr, weight_decay=0.0)
    losses = []
    for g in range(plan.jobs[j].global_batches):
        ids = plan.batches()[(j, g)]
        total = sum(
            torch.nn.functional.cross_entropy(pm(input_ids=t[None])[0, :-1], t[1:], reduction="sum")
            for t in (data.sample_tokens(plan, s) for s in ids))
        loss = total / sum(plan.lengths[s] - 1 for s in ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, get_peft_model_state_dict(pm)


def _close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def single_run():
    """The fused single-process run of the dropout-free plan (shared by the PEFT and pipeline tests)."""
    plan = make_plan()
    inits: list = []
    model, ads, res, log = _logged_run(plan, lt.train_plan, on_built=lambda ads: inits.extend(
        ad.peft_state_dict() for ad in ads))
    return plan, inits, res, [ad.peft_state_dict() for ad in ads], log


def _logged_run(plan, train, on_built=lambda ads: None):
    """``train`` (train_plan or train_plan_pipeline) on fresh adapters with every optimizer step logged as
    (job, microbatch, lr); returns (model, adapters, result, log)."""
    mp = pytest.MonkeyPatch()
    log: list = []
    try:
        _record_steps(mp.setattr, log)
        model = TinyCausalLM(CFG)
        ads = lt.build_adapters(model, plan, seed=4, init_b="random")
        on_built(ads)
        res = train(model, ads, plan, lt.SyntheticLoRAData(CFG.vocab_size, seed=6), fused=True, seed=1)
    finally:
        mp.undo()
    return model, ads, res, log


def test_plan_shape_is_what_the_tests_claim():
    plan = make_plan()
    assert plan.verify() == [] and plan.dependency_violations(2) == []
    spans = {}
    for i, mb in enumerate(plan.microbatches):
        for s in mb.segments:
            spans.setdefault((s.job, s.global_batch), set()).add(i)
    assert all(len(v) >= 2 for v in spans.values())  # every global batch accumulates over >= 2 microbatches
    assert sum(len(mb.segments) == 2 for mb in plan.microbatches) == 3


def test_fused_accumulation_equals_one_peft_step_per_global_batch(single_run):
    plan, init, res, trained, log = single_run
    by_job = res.by_job(plan)
    data = lt.SyntheticLoRAData(CFG.vocab_size, seed=6)
    for j, job in enumerate(plan.jobs):
        want_losses, want_state = _peft_reference(plan, j, init[j], data)
        assert by_job[job.name] == pytest.approx(want_losses, rel=2e-6)
        _close(trained[j], want_state, 2e-5)
        assert any(not torch.equal(trained[j][k], init[j][k]) for k in init[j])  # it did train
    # one step per (job, global batch), right after that batch's last microbatch, at the job's lr
    assert res.steps == {0: 2, 1: 2}
    assert sorted((j, i) for j, i, _ in log) == _expected_steps(plan) == [(0, 1), (0, 6), (1, 2), (1, 6)]
    assert all(lr == plan.jobs[j].lr for j, _, lr in log)


def _pipeline_worker(rank, world, plan_json):
    from adasched.planner.lorafusion.plan import LoRAPlan

    plan = LoRAPlan.model_validate_json(plan_json)
    model, ads, res, log = _logged_run(plan, lt.train_plan_pipeline)
    return res, lt.gather_adapter_states(ads, model), log, lt.stage_layers(CFG.layers, world, rank)


def test_two_stage_fused_pipeline_equals_single_process(single_run):
    plan, _, res1, trained, _ = single_run
    (r0, states, log0, lay0), (r1, none, log1, lay1) = spawn_gloo(_pipeline_worker, 2, plan.model_dump_json(),
                                                                  timeout_s=120)
    assert (lay0, lay1) == ((0, 1), (1, 3)) and none is None
    assert r1.steps == res1.steps == {0: 2, 1: 2} and not r0.losses  # losses live on the last stage
    assert r1.losses.keys() == res1.losses.keys()
    for k in res1.losses:
        assert r1.losses[k] == pytest.approx(res1.losses[k], rel=1e-6, abs=1e-7)
    for j in range(len(plan.jobs)):
        _close(states[j], trained[j], 1e-6)
    # every stage steps each job after the backward of that job's last microbatch of the batch
    for log in (log0, log1):
        assert sorted((j, i) for j, i, _ in log) == _expected_steps(plan)
        assert all(lr == plan.jobs[j].lr for j, _, lr in log)


class _OtherB(lt.SyntheticLoRAData):
    """The same streams except job 1's tokens (same lengths, so every row keeps its place in the packing)."""

    def tokens(self, job, sample, length):
        t = super().tokens(job, sample, length)
        return (5 * t + 11) % self.vocab_size if job == "jb" else t


def test_jobs_packed_together_do_not_leak_into_each_other():
    plan = make_plan(0.2, 0.3, layout=[LAYOUT[1], LAYOUT[5], LAYOUT[6]])  # only the shared microbatches
    model = TinyCausalLM(CFG)
    runs = []
    for data in (lt.SyntheticLoRAData(CFG.vocab_size, seed=6), _OtherB(CFG.vocab_size, seed=6)):
        ads = lt.build_adapters(model, plan, seed=4, init_b="random")
        res = lt.train_plan(model, ads, plan, data, fused=True, seed=1)
        runs.append((res.by_job(plan), [ad.peft_state_dict() for ad in ads]))
    (la, sa), (lb, sb) = runs
    assert la["ja"] == lb["ja"]
    for k in sa[0]:
        assert torch.equal(sa[0][k], sb[0][k]), k  # job A bit for bit
    assert la["jb"] != lb["jb"] and any(not torch.equal(sa[1][k], sb[1][k]) for k in sa[1])  # B's data mattered

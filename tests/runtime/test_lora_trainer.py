"""Multi-adapter LoRA trainer: fused path vs torch reference (dropout on, identical Philox masks), fused path vs
plain per-adapter PEFT training on the same samples, PEFT save/load of the trained adapters."""
from __future__ import annotations

import json

import pytest
import torch

from adasched.planner.lorafusion.jobs import build_workload, parse_jobs
from adasched.planner.lorafusion.plan import build_plan
from adasched.profiler.profile import load_profile
from adasched.runtime.lora_model import TinyCausalLM, TinyLMConfig, plain_proj
from adasched.runtime.lora_trainer import SyntheticLoRAData, build_adapters, save_adapters, train_plan

CFG = TinyLMConfig(vocab_size=32, hidden=16, layers=2, heads=2, ffn_hidden=24, max_positions=64, seed=5)


def make_plan(dropout_a: float, dropout_b: float, stages: int = 1):
    jobs = parse_jobs({
        "capacity": 256, "stages": stages, "global_batches": 2, "seed": 11, "layers": 2,
        "jobs": [
            {"name": "ja", "adapter": {"r": 4, "alpha": 8, "dropout": dropout_a, "target_modules": ["q_proj", "v_proj"]},
             "lengths": {"dist": "lognormal", "median": 12, "sigma": 0.5, "min": 3, "max": 40},
             "global_batch_size": 3, "lr": 0.02},
            {"name": "jb", "adapter": {"r": 2, "alpha": 4, "dropout": dropout_b, "target_modules": ["v_proj", "down_proj"],
                                       "use_rslora": True},
             "lengths": {"dist": "lognormal", "median": 16, "sigma": 0.4, "min": 3, "max": 40},
             "global_batch_size": 2, "lr": 0.03},
        ]})
    w = build_workload(jobs, label="test")
    return build_plan(w, load_profile("h100-sxm"), use_milp=False)


def _close(a: dict, b: dict, atol: float, rtol: float = 1e-4):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def test_fused_path_matches_reference_with_dropout():
    from adasched.kernels.lora import backend_for

    assert backend_for(torch.zeros(1)) == "interpret"  # the Triton kernels really run (interpreter on CPU)
    plan = make_plan(0.2, 0.1)
    # several jobs share microbatches, so the multi-adapter path is exercised
    assert any(len(mb.segments) > 1 for mb in plan.microbatches)
    data = SyntheticLoRAData(CFG.vocab_size, seed=3)
    model = TinyCausalLM(CFG)
    out = {}
    for fused in (True, False):
        ads = build_adapters(model, plan, seed=1, init_b="random")
        res = train_plan(model, ads, plan, data, fused=fused, seed=9)
        out[fused] = (res, [ad.peft_state_dict() for ad in ads])
    (rf, sf), (rr, sr) = out[True], out[False]
    assert rf.steps == rr.steps == {0: 2, 1: 2}
    assert rf.losses.keys() == rr.losses.keys()
    for k in rf.losses:
        assert rf.losses[k] == pytest.approx(rr.losses[k], rel=1e-5)
    for a, b in zip(sf, sr):
        _close(a, b, atol=2e-5)
    # training moved the adapters
    init = [ad.peft_state_dict() for ad in build_adapters(model, plan, seed=1, init_b="random")]
    assert any(not torch.allclose(sf[0][k], init[0][k]) for k in sf[0])


def _peft_train(plan, j, init_dir, data):
    """Plain per-adapter training with PEFT on the same samples: one optimizer step per global batch on the
    mean token loss of that batch (each sample run on its own, unpacked)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    pm = PeftModel.from_pretrained(TinyCausalLM(CFG), str(init_dir), is_trainable=True)
    params = [p for p in pm.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=plan.jobs[j].lr, weight_decay=0.0)
    losses = []
    batches = plan.batches()
    for g in range(plan.jobs[j].global_batches):
        ids = batches[(j, g)]
        n = sum(plan.lengths[s] - 1 for s in ids)
        total = 0.0
        for s in ids:
            t = data.sample_tokens(plan, s)
            logits = pm(input_ids=t[None])[0]
            total = total + torch.nn.functional.cross_entropy(logits[:-1], t[1:], reduction="sum")
        loss = total / n
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, get_peft_model_state_dict(pm)


def test_fused_trainer_matches_plain_peft_training_and_saves_loadable_adapters(tmp_path):
    plan = make_plan(0.0, 0.0)
    data = SyntheticLoRAData(CFG.vocab_size, seed=4)
    model = TinyCausalLM(CFG)
    ads = build_adapters(model, plan, seed=2, init_b="random")
    save_adapters(tmp_path / "init", plan, ads)
    res = train_plan(model, ads, plan, data, fused=True, seed=0)
    by_job = res.by_job(plan)
    for j, job in enumerate(plan.jobs):
        want_losses, want_state = _peft_train(plan, j, tmp_path / "init" / job.name, data)
        assert by_job[job.name] == pytest.approx(want_losses, rel=1e-5)
        _close(ads[j].peft_state_dict(), {k: v for k, v in want_state.items()}, atol=2e-5)

    # save the trained adapters in PEFT's format and load them back with peft
    from peft import LoraConfig, PeftModel

    save_adapters(tmp_path / "out", plan, ads, result=res)
    losses = json.loads((tmp_path / "out" / "losses.json").read_text())
    assert set(losses["per_global_batch"]) == {"ja", "jb"}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (2, 17), generator=gen)
    base_out = TinyCausalLM(CFG)(ids)
    for j, job in enumerate(plan.jobs):
        d = tmp_path / "out" / job.name
        assert sorted(f.name for f in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp
        conf = LoraConfig.from_pretrained(str(d))
        assert conf.r == job.adapter.r and conf.lora_alpha == job.adapter.alpha
        assert conf.use_rslora == job.adapter.use_rslora
        assert set(conf.target_modules) == set(job.adapter.modules)
        pm = PeftModel.from_pretrained(TinyCausalLM(CFG), str(d))
        pm.eval()
        with torch.no_grad():
            got = pm(input_ids=ids)
            from adasched.kernels.lora import LoRAAdapterWeights, multi_lora_linear_reference

            ad = ads[j]

            def proj(path, mod, x, ad=ad):
                if not ad.has(path):
                    return plain_proj(path, mod, x)
                a, b = ad.pair(path)
                return multi_lora_linear_reference(x, mod.weight, [LoRAAdapterWeights(a, b, ad.scale)], [(0, 0, x.shape[0])])

            ours = torch.stack([model.forward_packed([17], proj, tokens=ids[r]) for r in range(2)])
        torch.testing.assert_close(got, ours, atol=1e-5, rtol=1e-5)
        assert (got - base_out).abs().max() > 1e-3  # the adapter really changes the model


def test_check_plan_rejects_more_stages_than_the_plan_was_made_for():
    """A 1-stage plan puts a job's next global batch right after the last one; on 4 stages its optimizer step
    would not have happened yet: check_plan says so (the rule is read through LoRAPlan.dependency_violations)."""
    from adasched.profiler.io import InputError
    from adasched.runtime.lora_trainer import check_plan

    plan = make_plan(0.0, 0.0, stages=1)
    model = TinyCausalLM(CFG)
    assert plan.dependency_violations() == []
    check_plan(plan, model, 1)
    bad = plan.dependency_violations(4)
    assert bad, "a 1-stage plan of 2 global batches per job must violate the 4-stage rule"
    for job, g, first, last in bad:  # brute-force the rule from the microbatch list
        pos = [i for i, mb in enumerate(plan.microbatches) for s in mb.segments if s.job == job and s.global_batch == g]
        prev = [i for i, mb in enumerate(plan.microbatches) for s in mb.segments if s.job == job and s.global_batch == g - 1]
        assert first == min(pos) and last == max(prev) and first - last < 4
    with pytest.raises(InputError, match=r"^plan: made for 1 stages: .* fewer than 4 after \d+, on 4 pipeline stages "
                                         r"\(one per rank: NPROC / --world\) - re-plan with stages >= 4"):
        check_plan(plan, model, 4)
    with pytest.raises(InputError, match=r"^my_plan.json: made for 1 stages"):  # the plan named by its file
        check_plan(plan, model, 4, where="my_plan.json")


def _with_lengths(plan, lengths):
    """The plan with other sample lengths, its segments' token counts following them."""
    from adasched.planner.lorafusion.costmodel import padded

    plan = plan.model_copy(deep=True, update={"lengths": list(lengths)})
    for mb in plan.microbatches:
        for seg in mb.segments:
            seg.tokens = sum(plan.lengths[s] for s in seg.samples)
            seg.padded_tokens = padded(seg.tokens)
        mb.padded_tokens = sum(seg.padded_tokens for seg in mb.segments)
    return plan.resimulated()


def test_a_global_batch_without_targets_takes_no_step_and_reports_no_loss():
    """Job jb's second global batch holds only 1-token samples (no target): no optimizer step for it (AdamW would
    move the adapter on its old moments alone; the gradients are zero), its loss is None (a mean over nothing), the
    other batches train as before."""
    plan = make_plan(0.0, 0.0)
    ids = plan.batches()[(1, 1)]
    lengths = list(plan.lengths)
    for s in ids:
        lengths[s] = 1
    plan = _with_lengths(plan, lengths)
    assert plan.verify() == []
    last_of = {}
    for i, mb in enumerate(plan.microbatches):
        for seg in mb.segments:
            last_of[(seg.job, seg.global_batch)] = i
    data = SyntheticLoRAData(CFG.vocab_size, seed=3)
    model = TinyCausalLM(CFG)
    ads = build_adapters(model, plan, seed=1, init_b="random")
    seen = {}

    def snap(k):
        seen[k] = {n: t.detach().clone() for n, t in ads[1].peft_state_dict().items()}

    snap(0)                                     # before training
    res = train_plan(model, ads, plan, data, fused=False, seed=9, checkpoint_every=1, on_checkpoint=snap)
    assert res.steps == {0: 2, 1: 1}
    losses = res.by_job(plan)
    assert losses["jb"][1] is None and all(isinstance(x, float) and x > 0 for x in losses["ja"] + losses["jb"][:1])
    after_first = seen[last_of[(1, 0)] + 1]
    assert any(not torch.equal(after_first[n], t) for n, t in seen[0].items())  # gb 0 did move it
    for n, t in seen[len(plan.microbatches)].items():
        assert torch.equal(t, after_first[n]), n


@pytest.mark.parametrize("what", ["zero-length sample", "empty segment"])
def test_verify_refuses_what_the_trainer_cannot_pack(what):
    plan = make_plan(0.0, 0.0)
    if what == "zero-length sample":
        lengths = list(plan.lengths)
        lengths[plan.microbatches[0].segments[0].samples[0]] = 0
        errors = _with_lengths(plan, lengths).verify()
        assert errors and "has 0 tokens (at least 1)" in errors[0], errors
    else:
        plan = plan.model_copy(deep=True)
        seg = plan.microbatches[0].segments[0].model_copy(update={"samples": [], "tokens": 0, "padded_tokens": 0})
        plan.microbatches[0].segments.append(seg)
        assert any("holds no samples" in e for e in plan.verify()), plan.verify()


def test_losses_json_lists_a_job_that_took_no_step(tmp_path):
    """A job whose every global batch has no target took no step and was left out of optimizer_steps ({'ja': 2}),
    while per_global_batch listed it: every job is listed, 0 steps included."""
    plan = make_plan(0.0, 0.0)
    lengths = list(plan.lengths)
    for (j, _), ids in plan.batches().items():
        if j == 1:
            for s in ids:
                lengths[s] = 1
    plan = _with_lengths(plan, lengths)
    model = TinyCausalLM(CFG)
    ads = build_adapters(model, plan, seed=1, init_b="random")
    res = train_plan(model, ads, plan, SyntheticLoRAData(CFG.vocab_size, seed=3), fused=False, seed=9)
    save_adapters(tmp_path, plan, ads, result=res)
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["optimizer_steps"] == {"ja": 2, "jb": 0}, losses["optimizer_steps"]
    assert losses["per_global_batch"]["jb"] == [None, None]


def test_losses_json_is_strict_json_when_the_run_diverged(tmp_path):
    """CLI hunt: a diverged run wrote NaN into losses.json, which strict JSON parsers refuse; NaN is null now."""
    plan = make_plan(0.0, 0.0)
    model = TinyCausalLM(CFG)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))  # every loss NaN, as after a divergence
    ads = build_adapters(model, plan, seed=1, init_b="random")
    res = train_plan(model, ads, plan, SyntheticLoRAData(CFG.vocab_size, seed=3), fused=False, seed=9)
    save_adapters(tmp_path, plan, ads, result=res)
    text = (tmp_path / "losses.json").read_text()

    def refuse(name):
        raise ValueError(f"{name} in losses.json")

    losses = json.loads(text, parse_constant=refuse)
    assert losses["per_global_batch"] == {"ja": [None, None], "jb": [None, None]}, losses["per_global_batch"]


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_a_job_trains_the_same_alone_and_packed_after_another(tmp_path, fused):
    """31st session (LoRA runtime hunt): the synthetic data, its per-job rule and each adapter's init were keyed by
    the job's position in the jobs file and by plan-wide sample ids, so job B trained alone and job B after job A
    gave adapters 0.39 apart. Now keyed by the job's name and the sample's index within the job: B's adapter and
    losses are the same alone, after A (sharing microbatches with it) and before A. Dropout 0 (the masks are
    drawn over the packed rows: with dropout a job's masks depend on the rows before it)."""
    import random

    seed = random.randrange(10**6)
    print("seed", seed)
    rng = random.Random(seed)
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("\n".join(str(rng.randint(3, 40)) for _ in range(6)) + "\n")
    job = {"a": {"name": "ja", "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                 "lengths": "a.txt", "global_batch_size": 3, "lr": 0.02},
           "b": {"name": "jb", "adapter": {"r": 2, "alpha": 4, "target_modules": ["v_proj", "down_proj"],
                                           "use_rslora": True},
                 "lengths": "b.txt", "global_batch_size": 2, "lr": 0.03}}
    data = SyntheticLoRAData(CFG.vocab_size, seed=rng.randrange(100))
    model = TinyCausalLM(CFG)
    runs = {}
    for order in ("ab", "b", "ba"):
        cfg = parse_jobs({"capacity": 256, "stages": 1, "global_batches": 2, "seed": 11, "layers": 2,
                          "jobs": [job[c] for c in order]})
        plan = build_plan(build_workload(cfg, base=tmp_path, label="t"), load_profile("h100-sxm"), use_milp=False)
        if order == "ab":
            assert any(len(mb.segments) > 1 for mb in plan.microbatches)  # B shares microbatches with A
        ads = build_adapters(model, plan, seed=4, init_b="random")
        res = train_plan(model, ads, plan, data, fused=fused, seed=1)
        b = [j.name for j in plan.jobs].index("jb")
        runs[order] = (res.by_job(plan)["jb"], ads[b].peft_state_dict())
    for order in ("ab", "ba"):
        assert runs[order][0] == pytest.approx(runs["b"][0], rel=1e-5), order
        _close(runs[order][1], runs["b"][1], atol=1e-5)

"""32nd session's profiler hunt: a profile file without `created` was stamped at load time, so the same file had
another digest on every load (a resumed train_lora refused its own --profile); a two-level estimate summed from
valid fits failed its own bounds with a pydantic line naming no file; gemm_tflops / copy_GBps had no floor
(1e-300 TFLOP/s planned a 5e295 ms MoE step); a one-GPU MoE plan needed collectives it never prices."""
from __future__ import annotations

import json
import random
import time

import pytest

from adasched.planner.cli import main
from adasched.planner.plan import profile_ref
from adasched.profiler.builtins import builtin_profile
from adasched.profiler.profile import ClusterProfile, load_profile


def _h100(tmp_path, name="p.json", edit=None):
    d = json.loads(builtin_profile("h100-sxm").model_dump_json())
    d["name"] = "edited"
    if edit:
        edit(d)
    f = tmp_path / name
    f.write_text(json.dumps(d))
    return f


def test_a_profile_without_created_has_one_digest(tmp_path):
    f = _h100(tmp_path, edit=lambda d: d.pop("created"))
    a = load_profile(str(f))
    time.sleep(1.1)  # (the load-time stamp has whole seconds)
    b = load_profile(str(f))
    assert a.created is None and b.created is None
    assert profile_ref(a).digest == profile_ref(b).digest
    # written back, it still has none
    assert json.loads(a.model_dump_json())["created"] is None


def test_a_made_profile_is_stamped():
    from datetime import datetime, timezone

    from adasched.profiler.local import _assemble  # (the one place a measured profile is made)

    prof = _assemble(quick=True, device=builtin_profile("h100-sxm").device, host={}, micro=None, coll=None,
                     ranks_per_node=1, num_nodes=1, name="t")
    age = datetime.now(timezone.utc) - datetime.fromisoformat(prof.created)
    assert 0 <= age.total_seconds() < 60


def test_a_two_level_estimate_past_a_measured_fits_bound_plans(tmp_path, capsys):
    """all_to_all x64 at 0.2 ms/byte (within the bounds) made the ZeRO-3 estimate's beta 1.6: refused, naming
    'beta_ms_per_byte' and no file."""
    beta = random.uniform(0.5, 0.9)

    def slow(d):
        for c in d["collectives"]:
            if c["op"] == "all_to_all" and c["group_size"] == 64:
                c["beta_ms_per_byte"] = beta

    prof = load_profile(str(_h100(tmp_path, edit=slow)))
    fit = prof.collective_two_level("all_gather", 64)
    assert fit.source.startswith("two-level estimate") and fit.beta_ms_per_byte > 1.0
    assert fit.time_ms(1e6) == pytest.approx(fit.alpha_ms + fit.beta_ms_per_byte * 1e6, rel=1e-12)
    f = tmp_path / "p.json"
    out = tmp_path / "tl.json"
    assert main(["plan", "sp", "--profile", str(f), "--seqlens", "lognormal:4096,1", "--global-batch", "32",
                 "--no-milp", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["kind"] == "sp"


@pytest.mark.parametrize("field", ["gemm_tflops", "copy_GBps"])
@pytest.mark.parametrize("value", [1e-300, 5e-324, 1e-7])
def test_compute_rates_have_a_floor(tmp_path, capsys, field, value):
    f = _h100(tmp_path, edit=lambda d: d.update({field: value}))
    out = tmp_path / "gm.json"
    assert main(["plan", "moe", "--profile", str(f), "--config", "mixtral-8x7b", "--gpus", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}: {field}: ") and err.count("\n") == 1, err
    assert not out.exists()
    ok = dict(json.loads(f.read_text()), **{field: 1e-6})
    ClusterProfile.model_validate(ok)  # the floor itself loads


def test_one_gpu_moe_plans_without_collectives(tmp_path, capsys):
    f = _h100(tmp_path, edit=lambda d: d.update(collectives=[], num_nodes=1, gpus_per_node=1))
    out = tmp_path / "x.json"
    assert main(["plan", "moe", "--profile", str(f), "--config", "mixtral-8x7b", "--gpus", "1", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    for c in plan["configs"]:
        assert c["grad_exposed_ms"] == 0 and c["grad_exposed_at_end_ms"] == 0
        assert "all_reduce: none (one GPU: no data-parallel gradients)" in c["stage_notes"]
        assert not [n for n in c["stage_notes"] if "ranks" in n and n.startswith("all_reduce")]
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    # two GPUs still need them
    g = _h100(tmp_path, "g.json", edit=lambda d: d.update(collectives=[], num_nodes=1, gpus_per_node=2))
    assert main(["plan", "moe", "--profile", str(g), "--config", "mixtral-8x7b", "--gpus", "2", "--out",
                 str(tmp_path / "y.json")]) == 2
    assert capsys.readouterr().err == f"error: {g}: lacks 'collectives', which the FSMoE planner needs\n"


@pytest.mark.parametrize("bench", ["bench_attention", "bench_linear"])
def test_noise_that_does_not_fit_is_one_line(monkeypatch, bench):
    """A busy host's timings (slowest at the smallest size) fitted attention 754x off: a pydantic traceback at
    the end of `adasched profile` (fit_rel_error <= 100). Now a ValueError naming the measurement and its times."""
    from adasched.profiler import microbench

    tiny = microbench.MicrobenchConfig(device="cpu", dtype="float32", gemm_n=32, copy_bytes=1 << 16,
                                       attn_seqlens=(16, 32, 64), attn_heads=1, attn_head_dim=8, linear_hidden=16,
                                       linear_ffn=32, linear_tokens=(8, 16, 32), warmup=0, repeats=1)
    slow = random.uniform(1.0, 5.0)
    quick = random.uniform(1e-6, 1e-5)
    times = iter([slow, quick, quick])  # (no growth with size: the fits' fallbacks, far off the small times)
    monkeypatch.setattr(microbench, "time_ms", lambda fn, device, warmup, repeats: (fn(), next(times))[1])
    with pytest.raises(ValueError) as err:
        getattr(microbench, bench)(tiny)
    what = "attention (causal SDPA fwd+bwd)" if bench == "bench_attention" else \
        "linear layers (QKV+O+SwiGLU MLP fwd+bwd)"
    msg = str(err.value)
    assert msg.startswith(f"{what}: the fit's mean relative error is ") and f"{slow:.3g}, " in msg
    assert "\n" not in msg and not isinstance(err.value, __import__("pydantic").ValidationError)

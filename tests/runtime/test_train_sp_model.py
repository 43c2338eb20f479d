"""The SP plan's model name and the runtime's tiny GPT: one description of the model for the plan check, the
host-memory check and the model train_sp builds."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adasched.launch.train_sp import main
from adasched.planner.flexsp.plan import SPPlan, known_models
from adasched.planner.plan import load_plan, save_plan
from adasched.profiler.io import InputError
from adasched.runtime import sp_model_spec as spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_sp import _plan  # noqa: E402  (the hand-written 4-rank plan)


def _write(tmp_path, data) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name", ["gpt-8b", "tiny", "GPT-7B"])
def test_unknown_model_name_refused_with_one_line(tmp_path, monkeypatch, capsys, name):
    """Any name was accepted (nothing is built from it); a name that is neither a planner preset nor the runtime's
    tiny GPT, without the sizes of the model in model_shape, is now one error line naming the file, exit 2."""
    data = _plan().model_dump(mode="json")
    data["model"] = name
    path = _write(tmp_path, data)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main(["--plan", str(path), "--check-plan-only"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}: model: unknown model {name!r} (known: gpt-7b, gpt-13b, gpt-30b, tiny-gpt; "
                   f"a plan for another model lists its sizes in model_shape)\n"), err
    with pytest.raises(InputError, match="unknown model"):
        load_plan(path, expect=SPPlan)


def test_known_names_and_model_shape(tmp_path):
    assert known_models() == ["gpt-7b", "gpt-13b", "gpt-30b", spec.MODEL_NAME]
    data = _plan().model_dump(mode="json")
    for name in known_models():  # every preset and the runtime's model load without sizes
        data["model"] = name
        assert load_plan(_write(tmp_path, data), expect=SPPlan).model == name
    shape = dict(name="my-llm", hidden=96, layers=3, heads=6, vocab=500, act_bytes_per_token=1234.5, zero_stage=3,
                 state_bytes_per_param=16)
    data.update(model="my-llm", model_shape=shape)
    got = load_plan(_write(tmp_path, data), expect=SPPlan)
    assert got.model_shape is not None and got.model_shape.model_dump() == shape
    data["model_shape"] = dict(shape, name="other")
    with pytest.raises(InputError, match="model_shape.name: 'other' is not the plan's model 'my-llm'"):
        load_plan(_write(tmp_path, data), expect=SPPlan)


def test_plan_sp_records_the_shape_of_a_model_that_is_no_preset(tmp_path):
    """The library's plan_sp with its own ModelShape writes a plan that loads (and says what the model is);
    a preset's plan carries no shape."""
    import dataclasses

    from adasched.planner.flexsp import PlannerConfig, plan_sp
    from adasched.planner.flexsp.costmodel import MODEL_PRESETS
    from adasched.profiler.profile import load_profile

    prof = load_profile("h100-sxm")  # derives a model's terms from its sizes (the A100 one has published presets)
    lens = np.random.default_rng(7).integers(100, 4000, 40)
    cfg = PlannerConfig(time_limit=0.05, use_milp=False, max_evals=3)
    custom = dataclasses.replace(MODEL_PRESETS["gpt-7b"], name="gpt-7b-wide", heads=64)
    for model, shape in (("gpt-7b", None), (custom, custom)):
        plan, _ = plan_sp(prof, model, lens, gpus=8, global_batch=8, steps=1, seed=1, config=cfg)
        save_plan(plan, tmp_path / "p.json")
        got = load_plan(tmp_path / "p.json", expect=SPPlan)
        assert got.model == (shape.name if shape else model)
        assert (got.model_shape.model_dump() if got.model_shape else None) == (
            dataclasses.asdict(shape) if shape else None)


def test_tiny_gpt_defaults_and_param_count_agree_with_the_model():
    """sp_model_spec is the one description of the tiny GPT: the config's defaults and the exact parameter count
    (train_sp's memory check hard-coded vocab 256 and counted 12 L h^2 + (2 V + max_len) h)."""
    from adasched.runtime.sp_model import TinyGPT, TinyGPTConfig

    cfg = TinyGPTConfig()
    assert (cfg.vocab, cfg.hidden, cfg.heads, cfg.layers, cfg.max_len, cfg.mlp_ratio) == (
        spec.VOCAB, spec.HIDDEN, spec.HEADS, spec.LAYERS, spec.MAX_LEN, spec.MLP_RATIO)
    rng = np.random.default_rng(0)
    for _ in range(4):
        heads = int(rng.integers(1, 5))
        c = TinyGPTConfig(vocab=int(rng.integers(2, 300)), hidden=heads * int(rng.integers(1, 9)), heads=heads,
                          layers=int(rng.integers(1, 4)), max_len=int(rng.integers(1, 64)),
                          mlp_ratio=int(rng.integers(1, 5)))
        n = sum(p.numel() for p in TinyGPT(c).parameters())
        assert c.params == n == spec.param_count(c.hidden, c.layers, c.max_len, c.vocab, c.mlp_ratio), c


def test_memory_check_counts_the_model_train_sp_builds(tmp_path, monkeypatch):
    """check_model_fits counts exactly the parameters of the TinyGPT _train builds for the same options."""
    import adasched.launch.train_sp as ts
    from adasched.runtime.sp_model import TinyGPT, TinyGPTConfig

    seen = []
    monkeypatch.setattr(ts, "check_model_memory", lambda params, *a: seen.append(params))
    path = tmp_path / "plan.json"
    save_plan(_plan(), path)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    argv = ["--layers", "3", "--head-dim", "5", "--heads", "8", "--max-len", "40", "--backend", "gloo"]
    assert main(["--plan", str(path), "--check-plan-only", *argv]) == 0
    built = TinyGPT(TinyGPTConfig(hidden=8 * 5, heads=8, layers=3, max_len=40))
    assert seen == [sum(p.numel() for p in built.parameters())]


@pytest.mark.parametrize("backend", [["--backend", "gloo"], []], ids=["gloo", "no-backend"])
def test_check_plan_only_stays_free_of_torch(tmp_path, backend):
    """--check-plan-only validates plan and model size without importing torch - also without --backend, what
    launch/train_sp.sh's pre-check runs (it imported torch to ask for CUDA; bug hunt)."""
    path = tmp_path / "plan.json"
    save_plan(_plan(), path)
    code = ("import sys; from adasched.launch.train_sp import main; "
            f"rc = main(['--plan', {str(path)!r}, '--check-plan-only', '--world', '4', *{backend!r}]); "
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "0 False", r.stdout + r.stderr


def test_the_planner_knows_the_runtime_model_by_name():
    """The planner names the tiny GPT itself (it never imports the runtime): the two names are one."""
    from adasched.planner.flexsp.plan import RUNTIME_MODEL_NAME

    assert RUNTIME_MODEL_NAME == spec.MODEL_NAME

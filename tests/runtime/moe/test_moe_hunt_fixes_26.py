"""Findings of the 26th session's MoE runtime hunt in train_moe's options, each a test that fails on the code
before the fix."""
from __future__ import annotations

import random

import pytest

from adasched.launch.train_moe import layer_routers, main


@pytest.mark.parametrize("argv, message", [
    (["--router", "gshard", "--top-p", "0.3"],
     "error: --top-p: has no effect without a top_p --router (it is that router's threshold; --router gshard)\n"),
    (["--router", "expert_choice,gshard", "--top-p", "0.3"],
     "error: --top-p: has no effect without a top_p --router (it is that router's threshold; --router "
     "expert_choice,gshard)\n"),
    (["--hierarchical"],
     "error: --hierarchical: has no effect with an expert-parallel group of 1 rank (nothing is exchanged); drop it, "
     "or run more ranks / a larger --ep-size\n"),
])
def test_options_the_run_would_ignore_are_refused(argv, message, monkeypatch, capsys):
    """Both were accepted (exit 0) and did nothing; the README says an option the command would ignore is refused."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main([*argv, "--validate-only"]) == 2
    assert capsys.readouterr().err == message
    assert main(["--router", "top_p,gshard", "--top-p", "0.3", "--validate-only"]) == 0  # a top_p router: used


@pytest.mark.parametrize("router, kw", [
    ("gshard", {"lo": 3}), ("top_p", {"hi": 1}), ("gshard", {"experts": 1}), ("switch", {"hi": 6}),
    ("switch", {"lo": 12}),
])
def test_the_default_budget_fits_the_bounds_given(router, kw, monkeypatch, capsys):
    """`--experts 1` (or --cap-lo 3, --cap-hi 6 for switch) was refused as "--budget: 8 cannot be met by 4 layers
    within --cap-lo 1 and --cap-hi 1" - an option never given. The default budget moves into the bounds."""
    layers = random.randint(2, 6)
    experts = kw.pop("experts", 8)
    _, caps = layer_routers(router, random.choice(["uniform", "pyramid", "descending"]), layers, experts, **kw)
    lo, hi = kw.get("lo"), kw.get("hi")
    default = layers * experts if router == "switch" else 2 * layers
    lo_eff = lo if lo is not None else (max(1, experts // 2) if router == "switch" else 1)
    hi_eff = hi if hi is not None else (2 * experts if router == "switch" else min(4, experts))
    assert sum(caps) == min(max(default, layers * lo_eff), layers * hi_eff)
    assert all(lo_eff <= c <= hi_eff for c in caps), caps
    monkeypatch.setenv("WORLD_SIZE", "1")
    flags = {"lo": "--cap-lo", "hi": "--cap-hi"}
    argv = ["--router", router, "--layers", str(layers), "--experts", str(experts)]
    argv += [x for k, v in kw.items() for x in (flags[k], str(v))]
    assert main([*argv, "--validate-only"]) == 0, capsys.readouterr().err

"""Profiler fixes of a 2026-12-03 hunt: fits with fewer distinct points than coefficients are refused (a quadratic
fit of one 256-token point priced 4x the length 16x, silently), as MicrobenchConfig with repeated values; collective
sizes that round to one message are refused before anything is measured; a profile's huge node count is not
printed in full; "1 node" in the --gpus refusal."""
import json

import numpy as np
import pytest

from adasched.profiler.collectives import CollectiveConfig, spawn_collectives
from adasched.profiler.fit import fit_affine, fit_alpha_beta, fit_quadratic
from adasched.profiler.microbench import MicrobenchConfig
from adasched.planner.cli import main


def _ms(rng, x, coefs):
    x = np.asarray(x, dtype=np.float64)
    return sum(c * x ** (len(coefs) - 1 - k) for k, c in enumerate(coefs)) * rng.uniform(0.98, 1.02, x.size)


@pytest.mark.parametrize("fit,x,k", [(fit_quadratic, [256, 256, 256], 3), (fit_quadratic, [256, 512, 512, 256], 3),
                                     (fit_affine, [1024, 1024], 2), (fit_alpha_beta, [4096, 4096, 4096], 2)])
def test_too_few_distinct_points_are_refused(fit, x, k):
    rng = np.random.default_rng()
    with pytest.raises(ValueError, match=rf"^fit: an? [a-z-]+ fit needs at least {k} distinct"):
        fit(x, rng.uniform(0.5, 2.0, len(x)))


def test_enough_distinct_points_still_fit_exactly():
    rng = np.random.default_rng()
    a1, a2, b = rng.uniform(1e-6, 1e-5), rng.uniform(1e-3, 1e-2), rng.uniform(0.05, 0.5)
    s = rng.permutation([64, 128, 256, 512, 256])  # a repeated length beside 3 distinct ones is fine
    f = fit_quadratic(s, a1 * s * s + a2 * s + b)
    np.testing.assert_allclose(f.coef, (a1, a2, b), rtol=1e-6)
    c, b = rng.uniform(1e-3, 1e-2), rng.uniform(0.1, 1.0)
    t = np.array([300, 300, 900])
    np.testing.assert_allclose(fit_affine(t, c * t + b).coef, (c, b), rtol=1e-9)


def test_microbench_config_counts_distinct_values():
    kw = dict(device="cpu", dtype="float32", gemm_n=64, copy_bytes=1 << 20, attn_heads=1, attn_head_dim=16,
              linear_hidden=32, linear_ffn=64)
    with pytest.raises(ValueError, match=r"distinct attention sequence lengths"):
        MicrobenchConfig(attn_seqlens=(64, 64, 128), linear_tokens=(64, 128), **kw)
    with pytest.raises(ValueError, match=r"distinct token counts"):
        MicrobenchConfig(attn_seqlens=(64, 128, 256), linear_tokens=(64, 64), **kw)
    MicrobenchConfig(attn_seqlens=(64, 128, 256), linear_tokens=(64, 128), **kw)


def test_sizes_that_round_to_one_message_are_refused_before_measuring():
    cfg = CollectiveConfig(sizes=(1 << 20, (1 << 20) + 4), ops=("all_reduce",), warmup=1, repeats=2, timeout_s=60)
    with pytest.raises(Exception, match=r"all round to one message of 1048576 bytes on groups of 2 ranks"):
        spawn_collectives(2, cfg, show_progress=False)


def test_huge_node_count_is_not_printed_in_full(tmp_path, capsys):
    from adasched.profiler.builtins import builtin_profile

    d = json.loads(builtin_profile("h100-sxm").model_dump_json())
    for nodes, gpus, digits in ((10 ** 400, 8, 401), (10 ** 4000, 10 ** 1000, 4001)):  # (str() of the product raised)
        d["num_nodes"], d["gpus_per_node"] = nodes, gpus
        p = tmp_path / "big.json"
        p.write_text(json.dumps(d))
        assert main(["show", str(p)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and f"a number of ~{digits} digits" in err and len(err) < 400, err


def test_one_node_is_singular(tmp_path, capsys):
    from adasched.profiler.builtins import builtin_profile

    d = json.loads(builtin_profile("h100-sxm").model_dump_json())
    d["num_nodes"] = 1
    d["collectives"] = [c for c in d["collectives"] if c["group_size"] <= 8]
    (tmp_path / "one.json").write_text(json.dumps(d))
    rc = main(["plan", "sp", "--profile", str(tmp_path / "one.json"), "--gpus", "16", "--seqlens", "lognormal:2000,1",
               "--global-batch", "16", "--out", str(tmp_path / "sp.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "(1 node x 8)" in err and not (tmp_path / "sp.json").exists(), err

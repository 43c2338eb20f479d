"""The offline compiler report (``kernels.aot`` / ``launch/kernel_report.py``): refuses to run under the
interpreter, and on the real backend reports what the compilers did for each kernel configuration."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_refuses_under_the_interpreter(capsys):
    from adasched.kernels.aot import SIGNATURES, compile_report
    from adasched.kernels import gemm as G
    from adasched.launch import kernel_report

    assert os.environ.get("TRITON_INTERPRET") == "1"  # the test session's setting
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compile_report(G._gemm_kernel, SIGNATURES["gemm"], {}, {})
    assert kernel_report.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: TRITON_INTERPRET=1")


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, "-m", "adasched.launch.kernel_report", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_gemm_report_for_sm90(tmp_path):
    out = tmp_path / "report.json"
    proc = _run(["--only", "gemm", "--json", str(out)], tmp_path)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's bundled ptxas is not runnable here")  # pragma: no cover
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 6 and "kernel report, sm_90" in proc.stdout
    # the two TMA rows read through bulk tensor copies, the four pointer rows do not
    assert [r["tma_loads"] for r in rows] == [r["kernel"].endswith(" tma") for r in rows] == [False] * 4 + [True] * 2
    for r in rows:
        stages = int(re.search(r" s(\d+) ", r["kernel"] + " ").group(1))
        warps = int(re.search(r" w(\d+)", r["kernel"]).group(1))
        assert r["error"] == "" and r["mma"] == "wgmma" and r["async_loads"], r
        assert r["stages"] == stages and r["num_warps"] == warps, r  # the pipeline depth asked for is what we got
        assert 0 < r["regs"] <= 255 and r["spill_bytes"] == 0 and not r["wgmma_serialized"], r
        assert r["shared_bytes"] >= stages * (128 * 64 + 64 * 128) * 2, r  # A and B tiles of every stage


def test_bad_group_is_one_error_line(tmp_path):
    proc = _run(["--only", "lora,conv"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --only: conv not in lora, gemm, moe"
    for empty in ("", " "):  # '' meant every group; ' ' said "--only:  not in"
        proc = _run(["--only", empty], tmp_path)
        assert proc.returncode == 2 and proc.stderr.strip() == "error: --only: '' not in lora, gemm, moe", proc.stderr


def test_lora_cases_cover_wide_rank_columns():
    """kernel_report compiled the LoRA kernels at BLOCK_R = 16 only (the dY kernel's spill at 128 columns on 4
    warps was found by hand): the forward GEMM, dropout/S and dY rows come again at 64 and 128 columns, the dY
    rows at the warps dy_knobs launches them with."""
    from adasched.kernels import lora as L
    from adasched.kernels.aot import kernel_cases

    cases = kernel_cases(["lora"], 90)
    wide = {label: (consts, opts) for _, label, _, _, consts, opts, _ in cases if consts.get("BLOCK_R") != 16}
    assert len(wide) == 6, sorted(wide)
    for r in (64, 128):
        rows = {label: v for label, v in wide.items() if label.endswith(f" r{r}") or f" r{r} " in label}
        assert len(rows) == 3, sorted(wide)
        assert sorted(label.split(" ")[1] for label in rows) == ["GEMM", "dY", "down:"], sorted(rows)
        for label, (consts, opts) in rows.items():
            assert consts["BLOCK_R"] == r, label
            if label.startswith("lora dY"):
                assert opts["num_warps"] == L.dy_knobs(r)["warps"] == (8 if r > 64 else 4), label
                assert label.endswith(f" w{opts['num_warps']}"), label
            if label.startswith("lora down"):  # (they compiled at 4 warps, the runtime launches 8 there)
                assert opts["num_warps"] == L.down_knobs(r, True)["warps"] == 8, label
                assert label.endswith(f" w{opts['num_warps']}"), label

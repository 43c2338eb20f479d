"""GradNormRecorder fixes of a 2026-12-03 hunt: the recorder logged the clipped norms (clip_grad_norm_ at 1.0, or
DeepSpeed's default gradient_clipping 1.0: every row 1.0, a linear 'refined' schedule) - capture() logs them before
clipping and `schedules refine` notes a constant column; recording() checks its path on entry and lets the block's
own exception through; a recording with no rows replaces an older CSV; a refined JSON given to `refine` says so."""
import numpy as np
import pytest
import torch

from adasched.planner.cli import main
from adasched.profiler.io import InputError
from adasched.schedules import GradNormRecorder, read_norms_csv, write_norms_csv


def _flat_norms(model):
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    return float(flat.norm()), float(flat.abs().sum())


@pytest.mark.parametrize("capture", [True, False])
def test_capture_logs_the_norms_before_clipping(tmp_path, capture):
    torch.manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    want = []
    with GradNormRecorder(opt).recording(tmp_path / "n.csv") as rec:
        for _ in range(4):
            opt.zero_grad()
            (10 * (model(torch.randn(5, 6)) - torch.randn(5, 3)).pow(2).sum()).backward()
            want.append(_flat_norms(model))
            if capture:
                rec.capture()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            assert float(total) == pytest.approx(want[-1][0], rel=1e-5) and want[-1][0] > 0.5
            opt.step()
    if capture:
        np.testing.assert_allclose(rec.l2, [w[0] for w in want], rtol=1e-9)
        np.testing.assert_allclose(rec.l1, [w[1] for w in want], rtol=1e-9)
    else:  # the step's gradients: clipped to 0.5
        np.testing.assert_allclose(rec.l2, [0.5] * 4, rtol=1e-6)
    np.testing.assert_allclose(read_norms_csv(tmp_path / "n.csv"), rec.l2, rtol=1e-15)


def test_capture_with_grad_scaler_skips_the_inf_step():
    torch.manual_seed(5)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    want = []
    with GradNormRecorder(opt).recording() as rec:
        for step in range(3):
            opt.zero_grad()
            scaler.scale((model(torch.randn(6, 5)) - torch.randn(6, 3)).pow(2).mean()).backward()
            if step == 1:
                model.bias.grad[0] = float("inf")
            scaler.unscale_(opt)
            rec.capture()
            if step != 1:
                want.append(_flat_norms(model)[0])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            scaler.step(opt)  # (skipped at step 1: no optimizer.step(), no row; step 2's capture replaces it)
            scaler.update()
    np.testing.assert_allclose(rec.l2, want, rtol=1e-9)


def test_capture_needs_an_attached_recorder():
    model = torch.nn.Linear(2, 2)
    rec = GradNormRecorder(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="attach"):
        rec.capture()


def test_recording_checks_its_path_first_and_keeps_the_blocks_exception(tmp_path, capsys):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "adir.csv").mkdir()
    ran = []
    with pytest.raises(InputError, match="is a directory"):
        with GradNormRecorder(opt).recording(tmp_path / "adir.csv"):
            ran.append(1)
    assert not ran  # refused before the run
    sub = tmp_path / "sub"
    sub.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with GradNormRecorder(opt).recording(sub / "n.csv"):
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            sub.rmdir()
            sub.write_text("now a file")  # the CSV cannot be written any more
            raise KeyboardInterrupt
    assert "warning: GradNormRecorder: the norms CSV was not written" in capsys.readouterr().err


def test_a_recording_without_rows_replaces_an_older_csv(tmp_path):
    p = tmp_path / "n.csv"
    write_norms_csv(p, [9.0], [9.0])
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with GradNormRecorder(opt).recording(p):
        pass  # no step
    assert p.read_text() == "step,l2,l1\n"
    with pytest.raises(InputError, match="no gradient norms"):
        read_norms_csv(p)


def test_refine_notes_a_constant_column_and_names_a_json_input(tmp_path, capsys):
    n = tmp_path / "n.csv"
    write_norms_csv(n, [1.0] * 6, list(np.random.default_rng().uniform(1, 2, 6)))
    assert main(["schedules", "refine", str(n), "--out", str(tmp_path / "r.json")]) == 0
    assert f"note: {n}: every l2 norm is 1: were the gradients clipped" in capsys.readouterr().err
    assert main(["schedules", "refine", str(tmp_path / "r.json"), "--out", str(tmp_path / "r2.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'r.json'}: is JSON, not a norms CSV") and err.count("\n") == 1
    assert not (tmp_path / "r2.json").exists()

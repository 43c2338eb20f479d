"""GradNormRecorder (optimizer step pre-hook) and the norms CSV: values against a direct computation on two
param groups, CSV round trip, bad files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adasched.profiler.io import InputError
from adasched.schedules import GradNormRecorder, Refined, read_norms_csv, write_norms_csv
from adasched.schedules.gradnorm import load_norms_file


def test_recorder_logs_l2_l1_per_step_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-2},
                             {"params": model[2].parameters(), "lr": 3e-3}])
    rec = GradNormRecorder(opt)
    want_l2, want_l1 = [], []
    path = tmp_path / "norms.csv"
    with rec.recording(path):
        for _ in range(13):
            loss = model(torch.randn(9, 7)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            flat = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
            want_l2.append(float(flat.norm()))
            want_l1.append(float(flat.abs().sum()))
            opt.step()
    opt.step()  # after the block: detached, not recorded
    assert len(rec) == 13
    np.testing.assert_allclose(rec.l2, want_l2, rtol=1e-12)
    np.testing.assert_allclose(rec.l1, want_l1, rtol=1e-12)
    assert path.read_text().splitlines()[0] == "step,l2,l1"
    assert read_norms_csv(path, "l2") == rec.l2 and read_norms_csv(path, "l1") == rec.l1
    # the file drives Refined exactly like the in-memory norms
    o1 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    o2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    a = Refined.from_file(o1, path, norm="l1", smoothing=0.2)
    b = Refined(o2, want_l1, norm="l1", smoothing=0.2)
    np.testing.assert_allclose([a.lr_at(t) for t in range(14)], [b.lr_at(t) for t in range(14)], rtol=1e-12)


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("step,l2,l1\n", "no gradient norms"),
    ("step,l1\n0,1.0\n", "no column 'l2'"),
    ("step,l2,l1\n0,1.0,2.0\n1,abc,2.0\n", "line 3"),
    ("step,l2,l1\n0,1.0,2.0\n1,nan,2.0\n", "line 3"),
    ("step,l2,l1\n0,1.0,2.0\n1,inf,2.0\n", "finite"),
    ("step,l2,l1\n0,-1.0,2.0\n", ">= 0"),
])
def test_bad_norm_files(tmp_path, text, needle):
    p = tmp_path / "n.csv"
    p.write_text(text)
    with pytest.raises(InputError, match=needle) as err:
        read_norms_csv(p, "l2")
    assert str(err.value).startswith(str(p))
    with pytest.raises(InputError):
        read_norms_csv(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="^norm:"):
        read_norms_csv(p, "linf")


def test_wrong_length_and_json_checks(tmp_path):
    g = np.random.default_rng(0).lognormal(size=12)
    p = write_norms_csv(tmp_path / "n.csv", g.tolist(), (g * 3).tolist())
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="wrong length") as err:
        Refined.from_file(opt, p, total_steps=20)
    assert "n.csv" in str(err.value)
    bad = tmp_path / "x.json"
    bad.write_text('{"kind": "something_else"}')
    with pytest.raises(InputError, match="refined_lr_schedule"):
        load_norms_file(bad)
    with pytest.raises(ValueError, match="^l1:"):
        write_norms_csv(tmp_path / "y.csv", [1.0, 2.0], [1.0])
    assert math.isclose(read_norms_csv(p)[3], g[3], rel_tol=1e-15)


def test_get_schedule_refined_from_path(tmp_path):
    from adasched.schedules import get_schedule

    g = np.random.default_rng(2).lognormal(size=30)
    p = write_norms_csv(tmp_path / "n.csv", (g / 3).tolist(), g.tolist())
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(2))], lr=0.2)
    s = get_schedule("refined", opt, 3, 30, path=p, norm="l1", min_lr_ratio=0.1)
    o2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    ref = Refined(o2, g, warmup_steps=3, norm="l1", min_lr_ratio=0.1)
    np.testing.assert_allclose([s.lr_at(t)[0] for t in range(31)], [ref.lr_at(t)[0] for t in range(31)], rtol=1e-12)
    with pytest.raises(ValueError, match="wrong length"):
        get_schedule("refined", opt, 3, 31, path=p)


def test_closure_step_records_the_gradients_its_closure_computed():
    """LBFGS computes its gradients inside step(closure): the row must be those (a pre-step hook saw the previous
    call's, or none at the first step)."""
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 2)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=1)
    x, y = torch.randn(16, 5), torch.randn(16, 2)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    want = []
    with GradNormRecorder(opt) as rec:
        for _ in range(4):
            probe = torch.nn.Linear(5, 2)
            probe.load_state_dict(model.state_dict())
            (probe(x) - y).pow(2).mean().backward()  # max_iter=1: the closure runs once, at the current weights
            flat = torch.cat([p.grad.reshape(-1) for p in probe.parameters()]).double()
            want.append((float(flat.norm()), float(flat.abs().sum())))
            opt.step(closure)
        opt.step(closure=closure)  # keyword form too
    assert len(rec) == 5
    np.testing.assert_allclose(rec.l2[:4], [w[0] for w in want], rtol=1e-6)
    np.testing.assert_allclose(rec.l1[:4], [w[1] for w in want], rtol=1e-6)


def test_step_without_closure_records_before_the_update_changes_the_gradients():
    """A plain step() is recorded before it runs: SGD's foreach nesterov update adds the momentum buffer to p.grad in
    place, so a row taken after the step (every step was taken for a closure step: torch passes the hooks the
    optimizer as args[0]) logged (1 + momentum) x the gradient at the first step."""
    torch.manual_seed(2)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True)
    want = []
    with GradNormRecorder(opt) as rec:
        for _ in range(3):
            opt.zero_grad()
            (model(torch.randn(8, 6)) - torch.randn(8, 3)).pow(2).mean().backward()
            flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
            want.append((float(flat.norm()), float(flat.abs().sum())))
            opt.step()
    np.testing.assert_allclose(rec.l2, [w[0] for w in want], rtol=1e-12)
    np.testing.assert_allclose(rec.l1, [w[1] for w in want], rtol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_grad_scaler_rows_are_unscaled_and_a_skipped_step_has_none(tmp_path, fused):
    """GradScaler: with a fused optimizer the step gets the still-scaled gradients (it unscales inside, told by
    optimizer.grad_scale / found_inf): the rows were the norms times the scale (7570.6 for 7.39 at 1024) and a step
    skipped on inf gradients logged an inf row (the CSV then failed to load). Rows now equal the unscaled norms,
    and the skipped step has none, as on the unfused path where GradScaler does not call step()."""
    torch.manual_seed(3)
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    want = []
    with GradNormRecorder(opt).recording(tmp_path / "n.csv") as rec:
        for step in range(3):
            opt.zero_grad()
            loss = (model(torch.randn(6, 5)) - torch.randn(6, 3)).pow(2).mean()
            g = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
            scaler.scale(loss).backward()
            if step == 1:
                model.bias.grad[0] = float("inf")      # this step is skipped
            else:
                flat = torch.cat([t.reshape(-1) for t in g]).double()
                want.append((float(flat.norm()), float(flat.abs().sum())))
            scaler.step(opt)
            scaler.update()
    assert len(rec) == 2
    np.testing.assert_allclose(rec.l2, [w[0] for w in want], rtol=1e-6)
    np.testing.assert_allclose(rec.l1, [w[1] for w in want], rtol=1e-6)
    np.testing.assert_allclose(read_norms_csv(tmp_path / "n.csv"), [w[0] for w in want], rtol=1e-6)


def test_recorder_refuses_a_non_torch_optimizer():
    class Wrapper:  # what deepspeed.initialize returns under ZeRO: not a torch.optim.Optimizer
        param_groups = []

    with pytest.raises(ValueError, match="optimizer: Wrapper is not a torch.optim.Optimizer"):
        GradNormRecorder(Wrapper())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "zero2", "zero1", "zero2-groups", "zero3-groups", "zero2-groups-inner",
                                  "zero2-groups-clip", "zero3-groups-clip", "zero0-capture-clip"])
def test_sharded_gradients_give_the_whole_gradients_norms(tmp_path, mode):
    """2 gloo ranks: FSDP2 (DTensor gradients) and DeepSpeed ZeRO-1/2 (each rank's fp32 partition, with
    process_group) log the norms of the whole averaged gradient on every rank - before, each rank logged its own
    shard's norms (l2 0.41 against 0.82, l1 2.79 / 2.13 against 4.92 on the first FSDP2 step). With two parameter
    groups ZeRO steps the torch optimizer once per group (ZeRO-1/2) or sub-group (ZeRO-3), each call seeing only
    its part: 3 steps logged 6 rows of partial norms (l2 0.613, 0.542 for a whole 0.818); the recorder on
    engine.optimizer sums the parts into one row per step, and on the torch optimizer inside it refuses. With
    DeepSpeed's gradient_clipping below the norm ("-clip"), the rows on engine.optimizer are the norms before the
    clipping (they were the clipped ones: every l2 row read the clip value)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from adasched.runtime.dist import free_port

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DS_BUILD_OPS="0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "adasched" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(Path(__file__).with_name("test_gradnorm_dsworker.py")), mode, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        if mode.endswith("-inner"):
            assert got["error"].startswith("GradNormRecorder: optimizer.step() ran on 1 of its 2 parameter groups") \
                and got["rows"] == 0, got
            continue
        assert len(got["l2"]) == 3 and got.get("restored", True)
        # clipped: DeepSpeed's fp32 clip factor and the fp32 gradients it scaled (1e-9 where nothing is scaled)
        rtol = 1e-6 if mode.endswith("-clip") else 1e-9
        if mode.endswith("-clip"):
            assert got["clipped"] == [True] * 3 and min(got["l2"]) > 2 * 0.1, got  # (the clip value is 0.1)
        np.testing.assert_allclose(got["l2"], [w[0] for w in got["want"]], rtol=rtol)
        np.testing.assert_allclose(got["l1"], [w[1] for w in got["want"]], rtol=rtol)


def test_sparse_gradients_are_recorded_by_their_coalesced_values():
    """nn.Embedding(sparse=True) with SGD/SparseAdam: vector_norm has no sparse kernel, so the recorder's pre-hook
    raised NotImplementedError inside optimizer.step(). The norms are those of the dense gradient (duplicate
    indices summed first)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    emb = torch.nn.Embedding(11, 5, sparse=True)
    lin = torch.nn.Linear(5, 3)
    opt = torch.optim.SGD(list(emb.parameters()) + list(lin.parameters()), lr=0.1)
    rec = GradNormRecorder(opt)
    want = []
    with rec.recording():
        for _ in range(3):
            idx = torch.randint(0, 11, (16,), generator=gen)  # repeated indices: an uncoalesced gradient
            lin(emb(idx)).pow(2).mean().backward()
            dense = torch.cat([emb.weight.grad.to_dense().reshape(-1), lin.weight.grad.reshape(-1),
                               lin.bias.grad]).double()
            want.append([float(dense.norm()), float(dense.abs().sum())])
            opt.step()
            opt.zero_grad()
    np.testing.assert_allclose(rec.l2, [w[0] for w in want], rtol=1e-12)
    np.testing.assert_allclose(rec.l1, [w[1] for w in want], rtol=1e-12)


class _PartStepper:
    """A ZeRO-1/2-like wrapper: steps its torch optimizer once per parameter group, each call seeing that group."""

    def __init__(self, opt):
        self.optimizer = opt

    def step(self):
        groups = self.optimizer.param_groups
        for g in list(groups):
            self.optimizer.param_groups = [g]
            self.optimizer.step()
        self.optimizer.param_groups = groups


def test_recorder_on_a_part_stepping_wrapper_logs_one_row_per_step_and_unhooks():
    lin = torch.nn.Linear(7, 5)
    opt = torch.optim.SGD([{"params": [lin.weight]}, {"params": [lin.bias], "lr": 0.01}], lr=0.1)
    wrapper = _PartStepper(opt)
    rec = GradNormRecorder(wrapper)
    assert rec.optimizer is opt and rec.outer is wrapper
    want = []
    with rec.recording():
        for _ in range(3):
            lin(torch.randn(4, 7)).pow(2).sum().backward()
            g = torch.cat([lin.weight.grad.reshape(-1), lin.bias.grad]).double()
            want.append((float(g.norm()), float(g.abs().sum())))
            wrapper.step()
            opt.zero_grad()
    np.testing.assert_allclose(rec.l2, [w[0] for w in want], rtol=1e-12)
    np.testing.assert_allclose(rec.l1, [w[1] for w in want], rtol=1e-12)
    assert "step" not in wrapper.__dict__  # the class's step again
    # the torch optimizer inside refuses the part-steps instead of logging partial rows
    inner = GradNormRecorder(opt)
    with inner.recording(), pytest.raises(RuntimeError, match=r"ran on 1 of its 2 parameter groups"):
        lin(torch.randn(4, 7)).sum().backward()
        wrapper.step()


def test_two_recorders_on_one_wrapper_detached_out_of_order_leave_no_rows_behind():
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [lin.weight]}, {"params": [lin.bias]}], lr=0.1)
    wrapper = _PartStepper(opt)
    a, b = GradNormRecorder(wrapper).attach(), GradNormRecorder(wrapper).attach()
    lin(torch.randn(2, 3)).sum().backward()
    wrapper.step()
    assert len(a) == len(b) == 1 and a.l2 == pytest.approx(b.l2, rel=1e-12)
    a.detach()  # out of order: b's wrapper stays (a's detach deleted it: b then logged a row per group)
    wrapper.step()
    assert len(a) == 1 and len(b) == 2
    b.detach()
    wrapper.step()  # a's pass-through wrapper may remain; neither records
    assert len(a) == 1 and len(b) == 2


def test_a_wrapper_without_instance_dict_is_refused():
    class Slotted:
        __slots__ = ("optimizer",)

        def __init__(self, opt):
            self.optimizer = opt

        def step(self):
            self.optimizer.step()

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^optimizer: Slotted wraps a torch optimizer but its step cannot be hooked"):
        GradNormRecorder(Slotted(opt))


@pytest.mark.parametrize("positional", [True, False])
def test_closure_step_records_before_the_update_changes_the_gradients(positional):
    """A closure step was recorded after the step: SGD's foreach nesterov update (the default on CUDA) adds the
    momentum buffer to p.grad in place, so the rows were 2.10, 2.47, 2.47 where the closure computed 1.10, 0.83,
    0.53. The norms are taken right after the closure's backward now."""
    torch.manual_seed(4)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    seen = []

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        seen.append((float(flat.norm()), float(flat.abs().sum())))
        return loss

    with GradNormRecorder(opt) as rec:
        for _ in range(3):
            loss = opt.step(closure) if positional else opt.step(closure=closure)
            assert isinstance(loss, torch.Tensor)  # the closure's value still comes back from step()
    assert len(rec) == len(seen) == 3
    np.testing.assert_allclose(rec.l2, [w[0] for w in seen], rtol=1e-12)
    np.testing.assert_allclose(rec.l1, [w[1] for w in seen], rtol=1e-12)


def test_accelerate_optimizer_is_recorded():
    """transformers.Trainer's optimizer is accelerate's AcceleratedOptimizer: a torch.optim.Optimizer subclass that
    never ran Optimizer.__init__, so registering the step hooks on it raised AttributeError
    ('_optimizer_step_pre_hooks'). It is recorded through the optimizer it wraps now, one row per step."""
    accelerate = pytest.importorskip("accelerate")  # (peft, a requirement, depends on it)
    torch.manual_seed(5)
    acc = accelerate.Accelerator(cpu=True)
    module = torch.nn.Linear(4, 2)
    model, opt = acc.prepare(module, torch.optim.AdamW(module.parameters(), lr=1e-2))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    want = []
    with GradNormRecorder(opt) as rec:
        for _ in range(3):
            acc.backward(model(torch.randn(8, 4)).pow(2).mean())
            flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
            want.append((float(flat.norm()), float(flat.abs().sum())))
            opt.step()
            opt.zero_grad()
    np.testing.assert_allclose(rec.l2, [w[0] for w in want], rtol=1e-12)
    np.testing.assert_allclose(rec.l1, [w[1] for w in want], rtol=1e-12)


def test_a_recorded_zero_gradient_step_refines_through_the_median_filter(tmp_path):
    """(34th session's README walk) GradNormRecorder writes 0 for a step whose gradient vanished (a fully masked
    batch); read_norms_csv refused its own recorder's file ("must be finite and > 0"). A zero the median filter
    removes is fine now; one that survives it is a ValueError naming the decay step."""
    from adasched.schedules import GradNormRecorder, Refined, refined_multipliers, smooth_norms

    rng = np.random.default_rng(34)
    p = torch.nn.Parameter(torch.from_numpy(rng.normal(size=5)))
    opt = torch.optim.SGD([p], lr=1e-3)
    path = tmp_path / "n.csv"
    with GradNormRecorder(opt).recording(path):
        for i in range(30):
            opt.zero_grad()
            scale = 0.0 if i == 7 else float(rng.uniform(0.5, 2.0))
            (scale * (p * torch.from_numpy(rng.normal(size=5))).sum()).backward()
            opt.step()
    g = read_norms_csv(path, "l2")
    assert len(g) == 30 and g[7] == 0.0 and min(g[:7] + g[8:]) > 0
    sched = Refined.from_file(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0), path, smoothing=0.1)
    # the independent recomputation: a 3-wide median (0.1 x 30), mirror-padded; w = 1/g^2; m_k ~ w_k sum_{p>k} w_p
    pad = np.concatenate([[g[1]], g, [g[-2]]])
    med = np.array([np.median(pad[k:k + 3]) for k in range(30)])
    assert np.all(med > 0)
    np.testing.assert_allclose(smooth_norms(g, 0.1), med, rtol=0, atol=0)
    w = 1.0 / med**2
    w_ext = np.append(w, w[-1])
    m = np.array([w[k] * w_ext[k + 1:].sum() for k in range(30)] + [0.0])
    np.testing.assert_allclose(sched.decay_table, m / m.max(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"^grad_norms: the norm at decay step 7 is 0 even after the median filter "
                                         r"\(smoothing 0; 1 such step"):
        refined_multipliers(g, "l2", 0.0)
    with pytest.raises(InputError, match="decay step 7 is 0"):
        Refined.from_file(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0), path, smoothing=0.0)
    with pytest.raises(ValueError, match=r"must be >= 0, got -1.0 at step 2"):
        refined_multipliers([1.0, 2.0, -1.0], "l2")

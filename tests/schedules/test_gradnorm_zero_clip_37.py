"""GradNormRecorder on a ZeRO-like wrapper that clips inside its step (DeepSpeed's gradient_clipping, 1.0 by default):
the rows are the norms before the clipping - they were the clipped ones (every l2 row the clip value, and the
refined schedule a plain linear decay). The 2-rank DeepSpeed runs are test_gradnorm.py's "-clip" modes."""
import numpy as np
import pytest
import torch

from adasched.schedules import GradNormRecorder


class _ClippingPartStepper:
    """What DeepSpeed ZeRO-1/2's step does: the global norm (``_global_grad_norm``), every gradient divided by
    max(1, (norm + 1e-6) / clip_grad), then the torch optimizer stepped once per parameter group."""

    def __init__(self, opt, clip_grad):
        self.optimizer = opt
        self.clip_grad = clip_grad
        self._global_grad_norm = 0.0

    def step(self):
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.linalg.vector_norm(torch.cat([x.reshape(-1) for x in grads]))
        self._global_grad_norm = norm  # (a tensor, as ZeRO's: the recorder must not need a host sync)
        if self.clip_grad > 0:
            f = torch.clamp((norm + 1e-6) / self.clip_grad, min=1.0)
            for x in grads:
                x.div_(f)
        groups = self.optimizer.param_groups
        for g in list(groups):
            self.optimizer.param_groups = [g]
            self.optimizer.step()
        self.optimizer.param_groups = groups


@pytest.mark.parametrize("clip", [0.0, 0.05, 1e6])
def test_rows_are_the_norms_before_zero_clips(clip):
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    lin = torch.nn.Linear(7, 5).double()
    opt = torch.optim.SGD([{"params": [lin.weight]}, {"params": [lin.bias], "lr": 0.01}], lr=0.1)
    wrapper = _ClippingPartStepper(opt, clip)
    rec = GradNormRecorder(wrapper)
    want, applied = [], []
    with rec.recording():
        for _ in range(4):
            x = torch.randn(4, 7, generator=gen, dtype=torch.float64)
            lin(x).pow(2).sum().backward()
            g = torch.cat([lin.weight.grad.reshape(-1), lin.bias.grad])
            want.append((float(g.norm()), float(g.abs().sum())))
            wrapper.step()
            applied.append(float(torch.cat([lin.weight.grad.reshape(-1), lin.bias.grad]).norm()))
            opt.zero_grad()
    if clip == 0.05:
        assert all(a == pytest.approx(0.05, rel=1e-4) for a in applied)  # (every step was clipped)
    np.testing.assert_allclose(rec.l2, [w[0] for w in want], rtol=1e-12)
    np.testing.assert_allclose(rec.l1, [w[1] for w in want], rtol=1e-12)


def test_capture_on_the_wrapper_says_it_is_not_needed():
    lin = torch.nn.Linear(3, 2)
    rec = GradNormRecorder(_ClippingPartStepper(torch.optim.SGD(lin.parameters(), lr=0.1), 1.0))
    with rec.recording(), pytest.raises(RuntimeError, match="not needed there: its rows are the norms before"):
        rec.capture()

"""Budget-aware learning-rate schedules as torch ``LRScheduler`` subclasses: REX, UBA, linear decay, and the
schedule refined from a previous run's gradient norms (Defazio et al. 2023).

Conventions shared by every schedule here (``step`` = the scheduler's ``last_epoch``, i.e. optimizer steps done):

* ``total_steps`` counts every optimizer step, warmup included (the transformers convention
  ``num_training_steps``). Warmup is linear from 0: ``lr = base_lr * step / warmup_steps`` for
  ``step < warmup_steps``. The decay phase has ``K = total_steps - warmup_steps`` steps and progress
  ``z = (step - warmup_steps) / K``; ``lr = min_lr + (base_lr - min_lr) * multiplier(z)``; ``step >= total_steps``
  stays at ``min_lr``. ``warmup_steps == total_steps`` is all warmup (K = 0): ``min_lr`` from step
  ``total_steps`` on, as transformers' linear schedule gives (the refined schedule needs K >= 1).
* ``base_lr`` is each param group's ``initial_lr`` (its lr when the scheduler was made), so groups keep their ratio.
* Floor: ``min_lr`` is an ABSOLUTE learning rate (the same for every group, or a list with one per group);
  ``min_lr_ratio`` is a FRACTION of each group's base lr. Give at most one of them.
* Closed form (:meth:`_get_closed_form_lr`, also used by ``SequentialLR`` at a milestone and by ``step(epoch)``)
  and chainable form (:meth:`get_lr`) agree: ``get_lr`` evaluates the closed form at ``last_epoch`` and multiplies
  it by the factor other schedulers applied to the group since our last update (``group["lr"] / our_last_value``),
  so ``ChainedScheduler([ours, ExponentialLR(g)])`` gives ``ours(t) * g**t``. It never divides by a multiplier
  that may be 0: when our last value was 0 (warmup start, end of decay) the external factor cannot be observed
  and the previous one is kept. Alone, the factor is exactly 1.0 and both forms give identical floats (a tensor
  lr holds the closed form rounded to its dtype).
  With warmup (our value 0 at step 0) in a ``ChainedScheduler``, a factor another scheduler applies in that step
  multiplies 0 and is lost to every chainable scheduler, ours and torch's alike (``[ours, LinearLR(0.5, 1)]`` ends
  up twice the product; ``[REX(W=2), UBA(W=3)]`` too, 1.87x the base lr at its peak): warm up with
  ``SequentialLR([LinearLR, ours])`` or with ``warmup_steps`` in the chain's first scheduler only. A scheduler
  that finds the lr changed from the 0 it wrote warns once (the lost factor is not always visible: ``[REX(W=0),
  UBA(W=3)]`` runs ~5 % high silently). Rebuild a chain with ``load_state_dict``, not ``last_epoch=``: each member
  built with ``last_epoch`` writes its own closed form, the next reads that as the others' factor (100x off the
  product in a review's ``[REX(W=100), UBA]`` case).
* A factor found at construction (group lr below ``initial_lr``) is kept only on an optimizer that has not
  stepped yet (another scheduler built before us in a chain); a group lr of 0 there hides it: step 0 keeps the 0
  and the next step reads the factor (still 0: none - an abandoned scheduler's warmup start); on one that has
  trained, the schedule starts from its closed form (a second stage, or a resumed run stepping a fresh scheduler
  to catch up). "Stepped" is read from the optimizer's state (step counters; state without one, as SGD momentum
  buffers; plain SGD without momentum keeps none: resume its scheduler with ``load_state_dict``).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "REX", "UBA", "LinearDecay", "Refined", "WarmupDecay", "get_schedule", "SCHEDULE_NAMES",
    "linear_multiplier", "cosine_multiplier", "rex_multiplier", "uba_multiplier", "refined_multipliers",
    "smooth_norms", "warmup_decay_multiplier", "UBA_DEFAULT_PHI",
]

#: UBA default phi: 0.5, the best of {0.5, 1, 2, 4} in `adasched bench schedules` (mean rank of test loss over
#: 16 digits settings; lower phi was better monotonically there). See BENCHMARKS.md, section schedules.
UBA_DEFAULT_PHI = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Pure multipliers of progress z in [0, 1] (1 at z = 0, 0 at z = 1): for plots and LambdaLR users.
# ----------------------------------------------------------------------------------------------------------------
def _clip01(z: float) -> float:
    return 0.0 if z < 0.0 else 1.0 if z > 1.0 else float(z)


def linear_multiplier(z: float) -> float:
    """Linear decay ``1 - z``."""
    return 1.0 - _clip01(z)


def cosine_multiplier(z: float) -> float:
    """Cosine annealing ``(1 + cos(pi z)) / 2``."""
    return 0.5 * (1.0 + math.cos(math.pi * _clip01(z)))


def rex_multiplier(z: float) -> float:
    """REX (Chen et al., MLSys 2022): ``(1 - z) / (1/2 + (1 - z)/2)``; 0.667 at z = 0.5."""
    z = _clip01(z)
    return (1.0 - z) / (0.5 + 0.5 * (1.0 - z))


_UNSEEN = -1.0
"""External factor of a group whose lr was 0 when the schedule was built: not observable yet (lrs are >= 0, so no
real factor takes this value); the step after resolves it (:func:`_next_factor`)."""


def _next_factor(lr: float, own: float, prev: float) -> float:
    """The external factor after a step: the group's lr over our last value; when that value was 0 the factor
    cannot be seen and ``prev`` is kept, except an unseen one (:data:`_UNSEEN`), which becomes 1 when the lr is
    still 0 (nobody else changes it: an abandoned scheduler's 0) or cannot be read."""
    if prev == _UNSEEN:
        return lr / own if lr != 0 and own != 0 else 1.0
    return lr / own if own != 0 else prev


def _group_lr(lr, own: float, prev: float) -> float:
    """A group's lr as a float; a tensor lr (float32) holding exactly what this scheduler wrote last (``own`` times
    the factor ``prev``), rounded to its dtype, reads as the float written: its rounding read as another scheduler's
    factor and compounded (1.6e-6 off the closed form after 5,000 REX steps)."""
    if isinstance(lr, torch.Tensor):
        wrote = own if prev == 1.0 else own * (0.0 if prev == _UNSEEN else prev)
        if lr.item() == torch.tensor(wrote, dtype=lr.dtype).item():
            return wrote
    return float(lr)


def _check_phi(phi: float) -> float:
    if isinstance(phi, bool) or not isinstance(phi, numbers.Real) or not math.isfinite(phi) or phi <= 0:
        raise ValueError(f"phi: must be a finite number > 0, got {phi!r}")
    return float(phi)


def uba_multiplier(z: float, phi: float = UBA_DEFAULT_PHI) -> float:
    """UBA (Tang et al., NeurIPS 2025): ``2 u / (2 phi + (2 - phi) u)`` with ``u = 1 + cos(pi z)``.
    phi = 2 is exactly cosine; phi < 2 stays high longer; phi > 2 decays faster.

    Computed as the same ``c^2 / (c^2 + (phi / 2) s^2)``, c = cos(pi z / 2), s = sin(pi z / 2) (u = 2 c^2,
    2 - u = 2 s^2), for phi >= 2 with c^2 + s^2 = 1 (``c^2 / (1 + (phi / 2 - 1) s^2)``: exactly cosine at phi = 2):
    sums of positive terms, where the published form cancels for large phi (phi >= 2**53: 0 / 0 at z = 0, a
    ZeroDivisionError traceback from `schedules plot uba:1e17`; nan at 1e308)."""
    phi = _check_phi(phi)
    z = _clip01(z)
    c2, s2 = 0.5 * (1.0 + math.cos(math.pi * z)), math.sin(0.5 * math.pi * z) ** 2  # (c2 exactly 0 at z = 1)
    if c2 == 0.0:  # the end: 0 for every phi (phi = 5e-324 made 0.5 phi s2 underflow: 0 / 0, a traceback)
        return 0.0
    return c2 / (c2 + 0.5 * phi * s2) if phi < 2.0 else c2 / (1.0 + (0.5 * phi - 1.0) * s2)


def warmup_decay_multiplier(step: int, warmup_steps: int, total_steps: int,
                            decay: Callable[[float], float]) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (>= 0): linear warmup from 0, then ``decay(z)``
    (``min_lr`` = 0), for 0 <= ``warmup_steps`` <= ``total_steps`` (warmup 10 of 8 ramped to 0.9, then fell to
    0 without reaching the peak; step -1 without warmup divided by zero)."""
    step = _check_int("step", step, 0)
    total_steps = _check_int("total_steps", total_steps, 1)
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps: must be <= total_steps={total_steps}, got {warmup_steps}")
    if step < warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return decay(1.0)
    return decay((step - warmup_steps) / (total_steps - warmup_steps))


# ----------------------------------------------------------------------------------------------------------------
# Refinement from gradient norms (Defazio, Cutkosky, Mehta, Mishchenko 2023).
# ----------------------------------------------------------------------------------------------------------------
def _check_norms(grad_norms: Sequence[float] | np.ndarray | torch.Tensor, name: str = "grad_norms") -> np.ndarray:
    if isinstance(grad_norms, torch.Tensor):
        grad_norms = grad_norms.detach().cpu().double().numpy()
    try:
        g = np.asarray(grad_norms, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a sequence of numbers") from None
    if g.ndim != 1:  # a [steps, 2] table (l2, l1) would have been flattened into twice the steps
        raise ValueError(f"{name}: must be one number per optimizer step (1-D), got shape {tuple(g.shape)}")
    if g.size == 0:
        raise ValueError(f"{name}: is empty; need one gradient norm per optimizer step")
    bad = np.flatnonzero(~np.isfinite(g))
    if bad.size:
        raise ValueError(f"{name}: non-finite value {g[bad[0]]} at step {int(bad[0])} ({bad.size} in all)")
    bad = np.flatnonzero(g < 0)  # (a zero is a step whose gradient vanished, e.g. a fully masked batch: the median
    if bad.size:               # filter usually removes it; refined_multipliers refuses one that survives)
        raise ValueError(f"{name}: gradient norms must be >= 0, got {g[bad[0]]} at step {int(bad[0])}")
    return g


def _check_smoothing(smoothing: float) -> float:
    if not isinstance(smoothing, numbers.Real) or not math.isfinite(smoothing) or not 0 <= smoothing < 1:
        raise ValueError(f"smoothing: must be a fraction of the run in [0, 1), got {smoothing!r}")
    return float(smoothing)


def smooth_norms(grad_norms, smoothing: float = 0.1) -> np.ndarray:
    """Median filter about ``smoothing`` of the run wide (odd window, >= 1 step), reflect-padded at both ends."""
    g = _check_norms(grad_norms)
    width = int(round(_check_smoothing(smoothing) * g.size))
    if width <= 1 or g.size < 2:
        return g.copy()
    width += 1 - width % 2  # odd, centred
    # scipy's "mirror" is numpy's "reflect" padding; numpy's median over a sliding_window_view copied the n x width
    # windows (100k steps at smoothing 0.1: a 7.45 GiB MemoryError); a window of at most n + 1 needs one reflection
    from scipy.ndimage import median_filter

    return median_filter(g, size=width, mode="mirror")


def refined_multipliers(grad_norms, norm: str = "l2", smoothing: float = 0.1) -> np.ndarray:
    """Decay multipliers at decay steps ``k = 0..K`` from the norms ``g_0..g_{K-1}`` of a previous run.

    ``w_k = 1/g_k**2`` (``norm="l2"``, SGD) or ``1/g_k`` (``norm="l1"``, Adam-type), after the median filter
    (a zero norm - a step whose gradient vanished - must be filtered away by it: ValueError otherwise);
    ``m_k ∝ w_k * sum_{p=k+1..K} w_p``, ``m_K = 0``, normalised to ``max m = 1``. The end position K (the state
    after the last step, never measured) takes the last filtered norm, so constant norms give exactly the linear
    decay ``1 - k/K``. Returns ``K + 1`` float64 values."""
    if norm not in ("l2", "l1"):
        raise ValueError(f"norm: must be 'l2' (SGD) or 'l1' (Adam-type), got {norm!r}")
    g = smooth_norms(grad_norms, smoothing)
    zero = np.flatnonzero(g == 0)
    if zero.size:  # its weight 1/0 would put the whole schedule's peak on that one step
        raise ValueError(f"grad_norms: the norm at decay step {int(zero[0])} is 0 even after the median filter "
                         f"(smoothing {smoothing:g}; {zero.size} such step(s)): a zero gradient has no refinement "
                         f"weight; raise smoothing, or record a run whose zero-gradient steps are isolated")
    # weights in the log domain, scaled so the largest is 1: the schedule is invariant to the norms' scale, so
    # 1/g**2 must not overflow for tiny norms (1e-200) nor underflow to 0 for huge ones; a weight more than ~1e308
    # below the largest underflows to 0 (its step's lr is that much below the peak anyway).
    logw = (-2.0 if norm == "l2" else -1.0) * np.log(g)
    w = np.exp(logw - logw.max())
    w_ext = np.append(w, w[-1])  # position K
    tail = np.cumsum(w_ext[::-1])[::-1]  # tail[k] = sum_{p >= k} w_p
    m = np.zeros(g.size + 1)
    m[:-1] = w * tail[1:]
    top = m.max()
    if np.isfinite(top) and top > 0 and np.all((m[:-1] > 0) | (w == 0)):
        return m / top
    # a product w_k * tail underflowed (norms spanning ~1e154, l2: every one did, and the whole schedule was
    # refused as degenerate where its peak is well defined): log m_k = log w_k + log sum_{p > k} w_p, the largest
    # subtracted before exp
    logw_ext = np.append(logw, logw[-1])
    log_tail = np.logaddexp.accumulate(logw_ext[::-1])[::-1]  # log_tail[k] = log sum_{p >= k} w_p
    logm = logw + log_tail[1:]
    top = logm.max()
    if not np.isfinite(top):
        raise ValueError("grad_norms: refinement is degenerate (norms too large or too small to invert)")
    m[:-1] = np.exp(logm - top)
    return m


# ----------------------------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------------------------
def _check_int(name: str, value, lo: int) -> int:
    """An int >= ``lo``; a float with an integral value (``len(loader) * epochs / accum`` = 1000.0) is taken as
    that int, as transformers does, a fractional one (999.5) is refused."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name}: must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_last_epoch(value) -> int:
    """An integer >= -1 (torch's "fresh start" is -1): -2, 1.5, True or "3" failed inside torch as a KeyError about
    'initial_lr' (h55), which points a user at resuming."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < -1:
        raise ValueError(f"last_epoch: must be an integer >= -1, got {value!r}")
    return int(value)


def _has_stepped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` has taken a step: a step counter above 0 in its state (Adam, AdamW, Adagrad... -
    Adagrad fills its state, step 0, when it is made), per-parameter state without a step counter (SGD with
    momentum keeps only ``momentum_buffer``, LBFGS ``func_evals``/``n_iter``: torch creates them in the first
    step), or a step seen by a scheduler's step wrapper in this process. Plain SGD (no momentum) keeps no state,
    so a plain-SGD optimizer restored from a checkpoint reads as fresh: resume its scheduler with
    ``load_state_dict`` (or ``last_epoch``) rather than by stepping a fresh one to catch up."""
    if getattr(optimizer, "_opt_called", False):
        return True
    for st in optimizer.state.values():
        if not isinstance(st, dict) or not st:
            continue
        step = st.get("step")
        if step is None or float(step) > 0:
            return True
    return False


class WarmupDecay(LRScheduler):
    """Base: linear warmup then ``min_lr + (base_lr - min_lr) * self.decay_multiplier(k, K)``.
    Subclasses define :meth:`decay_multiplier` (decay step ``k`` of ``K``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr: float | Sequence[float] = 0.0, last_epoch: int = -1, *, min_lr_ratio: float | None = None):
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps: must be <= total_steps={self.total_steps}, got {self.warmup_steps}")
        bases = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        bad = next((i for i, b in enumerate(bases) if not (math.isfinite(b) and b >= 0)), None)
        if bad is not None:  # (SGD takes lr=nan: every lr of the schedule was nan)
            raise ValueError(f"optimizer: param group {bad} has lr {bases[bad]}; a schedule needs a finite lr >= 0")
        self.min_lrs = self._resolve_min_lrs(bases, min_lr, min_lr_ratio)
        # floor rule for a param group added after construction (optimizer.add_param_group): the same ratio, or
        # the same absolute min_lr; None when min_lr was a per-group list (no value for a new group)
        self._new_group_min = (("ratio", float(min_lr_ratio)) if min_lr_ratio is not None else
                               None if isinstance(min_lr, (list, tuple)) else ("abs", float(min_lr)))
        self._own_lrs: list[float] | None = None  # our last unscaled values (closed form)
        self._ext_scales: list[float] = [1.0] * len(bases)  # factors applied by other schedulers
        # A group lr below its initial_lr at a fresh start is another scheduler's factor (a chain built before us)
        # only on an optimizer that has not trained yet; on one that has (a second training stage, a resumed run
        # stepping a fresh scheduler to catch up) it is what an earlier schedule left - 0 at its end - and was kept
        # for the whole run. Then we start from the closed form, as transformers' LambdaLR schedules do.
        self._keep_prior_factor = not _has_stepped(optimizer)
        super().__init__(optimizer, check_last_epoch(last_epoch))

    @staticmethod
    def _resolve_min_lrs(bases: list[float], min_lr, min_lr_ratio) -> list[float]:
        is_abs = not (isinstance(min_lr, numbers.Real) and min_lr == 0.0)
        if min_lr_ratio is not None:
            if is_abs:
                raise ValueError("min_lr: give either min_lr (absolute) or min_lr_ratio (fraction of base), not both")
            r = min_lr_ratio
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(r) or not 0 <= r <= 1:
                raise ValueError(f"min_lr_ratio: must be in [0, 1], got {r!r}")
            return [float(r) * b for b in bases]
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(bases):
                raise ValueError(f"min_lr: got {len(min_lr)} values for {len(bases)} param groups")
            mins = [float(m) for m in min_lr]
        elif isinstance(min_lr, numbers.Real) and not isinstance(min_lr, bool):
            mins = [float(min_lr)] * len(bases)
        else:
            raise ValueError(f"min_lr: must be a number or one number per param group, got {min_lr!r}")
        for i, (m, b) in enumerate(zip(mins, bases)):
            if not math.isfinite(m) or m < 0 or m > b:
                raise ValueError(f"min_lr: must be in [0, base lr {b}] for param group {i}, got {m}")
        return mins

    # -- schedule ------------------------------------------------------------------------------------------------
    def decay_multiplier(self, k: int, num_decay_steps: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def multiplier(self, step: int) -> float:
        """Fraction of the way from ``min_lr`` (0) to ``base_lr`` (1) at optimizer step ``step``; warmup steps give
        ``step / warmup_steps`` of the base lr."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        num_decay = self.total_steps - self.warmup_steps
        if num_decay == 0:           # all warmup (transformers allows it): the decay's end, min_lr, from step T on
            return 0.0
        return self.decay_multiplier(min(step - self.warmup_steps, num_decay), num_decay)

    def lr_at(self, step: int) -> list[float]:
        """The closed-form learning rate of every param group at optimizer step ``step``."""
        step = max(int(step), 0)
        bases = [float(b) for b in self.base_lrs]  # (torch keeps a tensor lr's initial_lr as a float32 tensor)
        if step < self.warmup_steps:
            f = step / self.warmup_steps
            return [b * f for b in bases]
        m = self.multiplier(step)
        return [lo + (b - lo) * m for b, lo in zip(bases, self.min_lrs)]

    # -- torch LRScheduler protocol -----------------------------------------------------------------------------
    def _sync_groups(self, floors: Sequence[float] | None = None) -> None:
        """Adopt param groups added to the optimizer after this scheduler was made (``add_param_group``, e.g. a
        module unfrozen mid-run): their lr at that time becomes their base lr (``initial_lr``), their floor follows
        ``min_lr_ratio`` / the scalar ``min_lr``; from then on they follow the schedule like the others (torch's
        own schedulers fail on them with ``zip() argument 2 is shorter than argument 1``). ``floors``: the floor of
        each group by index, where known (the min_lrs of the scheduler a checkpoint was loaded into)."""
        groups = self.optimizer.param_groups
        n = len(self.base_lrs)
        if len(groups) == n:
            return
        if len(groups) < n:
            raise ValueError(f"optimizer: has {len(groups)} param groups but the scheduler was made for {n}; "
                             f"param groups cannot be removed from a scheduled optimizer")
        rule = getattr(self, "_new_group_min", ("abs", 0.0))
        if floors is not None and len(floors) >= len(groups):
            rule = ("given", 0.0)
        if rule is None:
            raise ValueError(f"min_lr: was given per param group ({n} values) but the optimizer now has "
                             f"{len(groups)} groups; build the scheduler after add_param_group, or use min_lr_ratio")
        for i, group in enumerate(groups[n:], start=n):
            base = float(group.setdefault("initial_lr", float(group["lr"])))
            if not (math.isfinite(base) and base >= 0):  # (as at construction: the group's lrs were nan)
                raise ValueError(f"optimizer: param group {i} (added after the scheduler was made) has lr {base}; "
                                 "a schedule needs a finite lr >= 0")
            lo = float(floors[i]) if rule[0] == "given" else rule[1] * base if rule[0] == "ratio" else rule[1]
            if not 0.0 <= lo <= base:
                raise ValueError(f"min_lr: {lo} is above the base lr {base} of param group {i} (added after the "
                                 f"scheduler was made)")
            self.base_lrs.append(base)
            self.min_lrs.append(lo)
            # no other scheduler has scaled it yet: external factor 1 (its current lr counts as our last value)
            if self._own_lrs is not None:
                self._own_lrs.append(float(group["lr"]))
            self._ext_scales.append(1.0)

    def _get_closed_form_lr(self) -> list[float]:
        self._sync_groups()
        values = self.lr_at(self.last_epoch)
        self._own_lrs = list(values)
        self._ext_scales = [1.0] * len(values)
        self._groups_id = id(self.optimizer.param_groups)
        return values

    def get_lr(self) -> list[float]:
        if not self._is_initial:
            self._sync_groups()
        target = self.lr_at(self.last_epoch)
        groups = self.optimizer.param_groups
        if self._is_initial or self._own_lrs is None:
            if self.last_epoch == 0 and self._keep_prior_factor:  # fresh start: keep another scheduler's factor
                # an lr of 0 (a warmup's first step) hides the factor: step 0 keeps the 0, the next step decides
                # (_UNSEEN). Taken as a factor 0 it held the lr at 0 all run when the 0 was nobody's to change (this
                # schedule built a second time over its own first value); taken as 1, a chain's step 0 ran at the
                # full lr where the product is 0
                # in floats: with tensor lrs, base_lrs are tensors, and a float over a tensor divides by its
                # reciprocal (1 - 2**-24 for an lr over itself: every step then ran one float32 ulp off)
                scales = [(float(g["lr"]) / float(b) if float(g["lr"]) != 0 else _UNSEEN) if float(b) != 0 else 1.0
                          for g, b in zip(groups, self.base_lrs)]
            else:  # made with last_epoch >= 0 (resume): closed form
                scales = [1.0] * len(target)
        else:
            lrs = [_group_lr(g["lr"], own, s) for g, own, s in zip(groups, self._own_lrs, self._ext_scales)]
            # (the same groups: an optimizer.load_state_dict since our last write installs new ones, and its lrs are
            # a restore, not another scheduler's - a scheduler built before the restore and stepped to catch up)
            if not getattr(self, "_warned_lost", False) and id(groups) == getattr(self, "_groups_id", id(groups)) \
                    and any(own == 0 and lr != 0 for lr, own in zip(lrs, self._own_lrs)):
                # we wrote 0 and the lr is no longer 0: another scheduler set it outright, and the factor it applied
                # in the step we wrote 0 multiplied that 0 (a ChainedScheduler where two schedules warm up from 0:
                # the product came out 2x, 1.87x the base lr at its peak)
                import warnings

                self._warned_lost = True
                warnings.warn(f"{type(self).__name__}: the lr changed from the 0 this schedule wrote (warmup start or "
                              "decay end) to a value it cannot read a factor from: another scheduler's factor in "
                              "that step was lost (ChainedScheduler with a second warmup?); warm up in one scheduler "
                              "only, or use SequentialLR([LinearLR, ...])", UserWarning, stacklevel=2)
            scales = [_next_factor(lr, own, s) for lr, own, s in zip(lrs, self._own_lrs, self._ext_scales)]
        self._own_lrs = list(target)
        self._ext_scales = scales
        self._groups_id = id(groups)
        return [t if s == 1.0 else t * (0.0 if s == _UNSEEN else s) for t, s in zip(target, scales)]


    def state_dict(self) -> dict:
        """torch's state (everything but the optimizer) plus ``group_lrs_at_save``: the lr each param group held
        when saved - the run's lr, every scheduler's factor in it (see :meth:`load_state_dict`)."""
        state = super().state_dict()
        for k in ("_groups_id", "_warned_lost"):  # (this process's bookkeeping, not the schedule's state)
            state.pop(k, None)
        state["group_lrs_at_save"] = [float(g["lr"]) for g in self.optimizer.param_groups]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the schedule; when the optimizer's groups still hold the lrs this freshly built scheduler set
        (a checkpoint resumed without optimizer state: DeepSpeed ``load_optimizer_states=False``, a new
        optimizer), also put the lrs the groups held at the save back into them - the chained update above reads
        the groups' lr, and the fresh one (0 at the start of a warmup) stayed 0 for the rest of the run; so too
        when the groups hold something else (a torch scheduler built after this one in a chain scaled them). With
        the optimizer restored (before this call or after it) they are the same lrs, which in a chain carry the
        other schedulers' factors; an lr changed between restoring the optimizer and this call is replaced by the
        saved one (change it after loading the schedulers). (It put back this scheduler's own last lrs, which are
        the run's only while it is the one stepping: in a SequentialLR past its milestone the finished first
        schedule - built fresh at the base
        lr, which a restored lr of 1.0 matched - wrote its final lr into the groups, and the active one kept it as
        a factor for the rest of the run.)"""
        groups = self.optimizer.param_groups
        fresh = [float(v) for v in getattr(self, "_last_lr", None) or []]
        # this scheduler's floors, one per group it was built on: they give the floor of a group the checkpoint
        # lacks (a per-group min_lr list has no rule for it, only these values)
        built_mins = list(self.min_lrs) if len(getattr(self, "min_lrs", [])) == len(groups) else None
        # the groups still hold what this (just built) scheduler set: the optimizer's state was not restored. When
        # it was, the groups hold the run's lrs - in a chain, other schedulers' factors included - and stay.
        # (over the groups it was built for: groups added since - the run's setup replayed, add_param_group before
        # the load - hold their own fresh lr; comparing every group left group 0 at the warmup's 0 all run)
        untouched = (0 < len(fresh) <= len(groups)
                     and all(math.isclose(float(g["lr"]), f, rel_tol=1e-12, abs_tol=0.0) for g, f in zip(groups, fresh))
                     and all(math.isclose(float(g["lr"]), float(g.get("initial_lr", g["lr"])), rel_tol=1e-12,
                                          abs_tol=0.0) for g in groups[len(fresh):]))
        state_dict = dict(state_dict)
        at_save = state_dict.pop("group_lrs_at_save", None)  # (a checkpoint written before it: None)
        super().load_state_dict(state_dict)
        if built_mins is not None and len(self.base_lrs) < len(groups):
            self._sync_groups(floors=built_mins)
        last = getattr(self, "_last_lr", None)
        if untouched and last is not None:  # a checkpoint with fewer groups: the added ones are adopted later
            if len(last) > len(groups):
                raise ValueError(f"state_dict: has {len(last)} param groups but the optimizer has {len(groups)}")
            n_old = len(last)
            if len(groups) > n_old:  # groups the checkpoint lacks: adopt now, at the checkpoint's step
                self._sync_groups()
                now = self.lr_at(self.last_epoch)
                last = list(last) + now[n_old:]
                if self._own_lrs is not None:
                    self._own_lrs[n_old:] = now[n_old:]
                self._last_lr = list(last)
            if at_save is not None and len(at_save) == n_old:
                last = [float(v) for v in at_save] + list(last[n_old:])
            _set_group_lrs(groups, last)
        elif at_save is not None and last is not None and len(at_save) == len(last) <= len(groups):
            # the groups hold neither this scheduler's fresh lrs nor, necessarily, the run's: a torch scheduler
            # built after this one in a chain scales the lr at construction (ChainedScheduler([REX, LinearLR(0.5)])
            # resumed without optimizer state kept the fresh 0.5 as LinearLR's share and ran at 2/3 of the run's lr
            # from then on). The lrs at the save are the run's either way: a restored optimizer holds the same ones
            # (a no-op), one restored after this call overwrites them with the same again.
            _set_group_lrs(groups[:len(at_save)], [float(v) for v in at_save])


def _set_group_lrs(groups: list[dict], values: list[float]) -> None:
    """Write ``values`` into the groups' lr (in place for a tensor lr)."""
    for group, value in zip(groups, values):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(float(value))
        else:
            group["lr"] = value


class LinearDecay(WarmupDecay):
    """Linear warmup then linear decay to ``min_lr`` at ``total_steps`` (matches megatron-core ``linear`` and
    transformers ``get_linear_schedule_with_warmup``)."""

    def decay_multiplier(self, k: int, num_decay_steps: int) -> float:
        return 1.0 - k / num_decay_steps


class REX(WarmupDecay):
    """REX: ``(1 - z) / (1/2 + (1 - z)/2)`` after linear warmup (Chen, Wolfe, Kyrillidis, MLSys 2022)."""

    def decay_multiplier(self, k: int, num_decay_steps: int) -> float:
        return rex_multiplier(k / num_decay_steps)


class UBA(WarmupDecay):
    """UBA with one parameter ``phi > 0`` (Tang et al., NeurIPS 2025): ``phi = 2`` is cosine annealing, smaller
    phi keeps the rate high longer. Default :data:`UBA_DEFAULT_PHI` (chosen from our digits benchmark)."""

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float | Sequence[float] = 0.0,
                 last_epoch: int = -1, *, phi: float = UBA_DEFAULT_PHI, min_lr_ratio: float | None = None):
        # phi keyword-only: positional arguments in the order of REX, LinearDecay and WarmupDecay (phi third,
        # REX(opt, T, W) -> UBA(opt, T, W) ran with no warmup and phi = W)
        self.phi = _check_phi(phi)
        super().__init__(optimizer, total_steps, warmup_steps, min_lr, last_epoch, min_lr_ratio=min_lr_ratio)

    def decay_multiplier(self, k: int, num_decay_steps: int) -> float:
        return uba_multiplier(k / num_decay_steps, self.phi)


class Refined(WarmupDecay):
    """Schedule refined from the gradient norms of a previous run of the same length (one norm per optimizer
    step, ``total_steps = len(grad_norms)``). With ``warmup_steps = W`` the first W steps warm up linearly and the
    decay phase is refined from ``grad_norms[W:]``. ``norm="l2"`` for SGD (weights 1/||g||_2^2), ``"l1"`` for
    Adam-type optimizers (1/||g||_1). See :func:`refined_multipliers`."""

    def __init__(self, optimizer, grad_norms, warmup_steps: int = 0, min_lr: float | Sequence[float] = 0.0,
                 norm: str = "l2", smoothing: float = 0.1, last_epoch: int = -1, *,
                 min_lr_ratio: float | None = None, total_steps: int | None = None):
        g = _check_norms(grad_norms)
        if total_steps is not None and _check_int("total_steps", total_steps, 1) != g.size:
            raise ValueError(f"grad_norms: has {g.size} steps but total_steps={total_steps}; record the norms of a "
                             f"run with the same number of optimizer steps")
        w = _check_int("warmup_steps", warmup_steps, 0)
        if w >= g.size:
            raise ValueError(f"warmup_steps: must be < total_steps={g.size} (the number of grad_norms), got {w}")
        self.norm = norm
        self.smoothing = _check_smoothing(smoothing)
        self.decay_table: list[float] = refined_multipliers(g[w:], norm, self.smoothing).tolist()
        super().__init__(optimizer, int(g.size), w, min_lr, last_epoch, min_lr_ratio=min_lr_ratio)

    def decay_multiplier(self, k: int, num_decay_steps: int) -> float:
        return self.decay_table[k]

    @classmethod
    def from_file(cls, optimizer, path, *, norm: str | None = None, smoothing: float | None = None,
                  total_steps: int | None = None, **kwargs) -> "Refined":
        """From a norms CSV written by :class:`~adasched.schedules.gradnorm.GradNormRecorder` (columns step,l2,l1)
        or a schedule JSON written by ``adasched schedules refine``. ``norm``/``smoothing`` default to the JSON's
        values, else ``l2``/0.1. ``total_steps``, when given, must equal the file's number of steps."""
        from adasched.profiler.io import InputError

        from .gradnorm import load_norms_file

        info = load_norms_file(path, norm)
        norm = norm or info["norm"]
        smoothing = info.get("smoothing", 0.1) if smoothing is None else smoothing
        n = len(info["grad_norms"])
        if total_steps is not None and total_steps != n:
            raise InputError(path, f"has {n} steps but total_steps={total_steps} (wrong length)")
        try:
            return cls(optimizer, info["grad_norms"], norm=norm, smoothing=smoothing, **kwargs)
        except InputError:
            raise
        except ValueError as err:
            raise InputError(path, str(err)) from None


# ----------------------------------------------------------------------------------------------------------------
# transformers-style factory
# ----------------------------------------------------------------------------------------------------------------
SCHEDULE_NAMES = ("linear", "rex", "uba", "cosine", "refined")


def get_schedule(name: str, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                 num_training_steps: int | None = None, **kw) -> WarmupDecay:
    """Mirror of ``transformers.get_scheduler``: ``name`` in :data:`SCHEDULE_NAMES`; ``num_training_steps``
    includes warmup. ``cosine`` is UBA with phi = 2. ``refined`` takes ``grad_norms=`` or ``path=`` (then
    ``num_training_steps`` may be omitted and must match the file if given). Other keywords go to the class
    (``min_lr``, ``min_lr_ratio``, ``phi``, ``norm``, ``smoothing``, ``last_epoch``)."""
    key = str(getattr(name, "value", name)).lower()  # transformers.SchedulerType.LINEAR -> "linear"
    if key not in SCHEDULE_NAMES:
        raise ValueError(f"name: unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if key == "refined":
        num_warmup_steps = _check_int("num_warmup_steps", num_warmup_steps, 0)
        takes = {"grad_norms", "path", "min_lr", "min_lr_ratio", "last_epoch", "norm", "smoothing"}
        extra = sorted(set(kw) - takes)
        if extra:  # (a TypeError from inside Refined, as for the other schedules below)
            raise ValueError(f"{extra[0]}: not an option of schedule {name!r} (it takes {', '.join(sorted(takes))})")
        if "path" in kw and "grad_norms" in kw:
            raise ValueError("grad_norms: give grad_norms=... or path=..., not both")
        if "path" in kw:
            return Refined.from_file(optimizer, kw.pop("path"), total_steps=num_training_steps,
                                     warmup_steps=num_warmup_steps, **kw)
        if "grad_norms" not in kw:
            raise ValueError("grad_norms: the refined schedule needs grad_norms=... or path=...")
        return Refined(optimizer, kw.pop("grad_norms"), warmup_steps=num_warmup_steps,
                       total_steps=num_training_steps, **kw)
    if num_training_steps is None:
        raise ValueError("num_training_steps: required for schedule " + repr(name))
    if key == "cosine":
        if "phi" in kw:
            raise ValueError("phi: not accepted by 'cosine' (it is UBA with phi=2); use name='uba'")
        kw["phi"] = 2.0
        key = "uba"
    # errors name the factory's arguments (num_training_steps, not the class's total_steps)
    total = _check_int("num_training_steps", num_training_steps, 1)
    warm = _check_int("num_warmup_steps", num_warmup_steps, 0)
    if warm > total:
        raise ValueError(f"num_warmup_steps: must be <= num_training_steps={total}, got {warm}")
    cls = {"linear": LinearDecay, "rex": REX, "uba": UBA}[key]
    takes = {"min_lr", "min_lr_ratio", "last_epoch"} | ({"phi"} if cls is UBA else set())
    extra = sorted(set(kw) - takes)
    if extra:  # (a TypeError from inside the class; through DeepSpeedSchedule only in deepspeed.initialize)
        raise ValueError(f"{extra[0]}: not an option of schedule {name!r} (it takes {', '.join(sorted(takes))})")
    return cls(optimizer, total, warmup_steps=warm, **kw)

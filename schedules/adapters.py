"""Use the schedules where users already plug schedules in: transformers-style ``LambdaLR`` factories,
``deepspeed.initialize(lr_scheduler=...)``, and megatron-core's ``OptimizerParamScheduler`` interface.

None of these imports transformers, deepspeed or megatron: they only follow their conventions.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from .lr import (UBA_DEFAULT_PHI, _check_int, _check_norms, _check_phi, _check_smoothing, check_last_epoch,
                 cosine_multiplier, get_schedule, linear_multiplier, refined_multipliers, rex_multiplier,
                 uba_multiplier)

__all__ = [
    "ScheduleLambda", "get_lambda_schedule", "get_rex_schedule_with_warmup", "get_uba_schedule_with_warmup",
    "get_refined_schedule_with_warmup", "DeepSpeedSchedule", "MegatronParamScheduler", "MEGATRON_STYLES",
]


# ----------------------------------------------------------------------------------------------------------------
# transformers: get_*_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps) -> LambdaLR
# ----------------------------------------------------------------------------------------------------------------
class ScheduleLambda:
    """Picklable ``step -> multiplier of the base lr`` (a callable object, so ``LambdaLR.state_dict`` saves it).
    Linear warmup from 0 over ``num_warmup_steps``, then ``min_lr_ratio + (1 - min_lr_ratio) * decay(z)``."""

    def __init__(self, name: str, num_warmup_steps: int, num_training_steps: int, *, phi: float | None = None,
                 min_lr_ratio: float = 0.0, decay_table: Sequence[float] | None = None):
        self.name = name
        self.num_training_steps = _check_int("num_training_steps", num_training_steps, 1)
        self.num_warmup_steps = _check_int("num_warmup_steps", num_warmup_steps, 0)
        if self.num_warmup_steps > self.num_training_steps or (
                name == "refined" and self.num_warmup_steps == self.num_training_steps):
            raise ValueError(f"num_warmup_steps: must be {'<' if name == 'refined' else '<='} num_training_steps="
                             f"{self.num_training_steps}, got {self.num_warmup_steps}")
        if (isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, numbers.Real)
                or not 0 <= min_lr_ratio <= 1):  # (True read as 1.0; REX refuses it)
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {min_lr_ratio!r}")
        self.min_lr_ratio = float(min_lr_ratio)
        if phi is not None and name != "uba":  # (silently ignored before; get_schedule refuses it)
            raise ValueError(f"phi: only the uba schedule takes phi, not {name!r}")
        self.phi = None if phi is None else _check_phi(phi)
        if name == "refined":
            if decay_table is None or len(decay_table) != self.num_training_steps - self.num_warmup_steps + 1:
                raise ValueError("decay_table: refined needs num_training_steps - num_warmup_steps + 1 values")
            self.decay_table = [float(v) for v in decay_table]
        elif name not in ("linear", "rex", "uba", "cosine"):
            raise ValueError(f"name: unknown schedule {name!r}; choose linear, rex, uba, cosine or refined")

    def decay(self, k: int, num_decay: int) -> float:
        z = k / num_decay
        if self.name == "linear":
            return linear_multiplier(z)
        if self.name == "rex":
            return rex_multiplier(z)
        if self.name == "uba":
            return uba_multiplier(z, self.phi if self.phi is not None else UBA_DEFAULT_PHI)
        if self.name == "cosine":
            return cosine_multiplier(z)
        return self.decay_table[k]

    def __call__(self, step: int) -> float:
        w, T = self.num_warmup_steps, self.num_training_steps
        if step < w:
            return step / w
        m = self.decay(min(step - w, T - w), T - w) if T > w else 0.0   # all warmup: min_lr from step T on
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * m


def get_lambda_schedule(name: str, optimizer: torch.optim.Optimizer, num_warmup_steps: int,
                        num_training_steps: int, *, last_epoch: int = -1, **kw) -> LambdaLR:
    """``LambdaLR`` with a :class:`ScheduleLambda` (``name`` in linear, rex, uba, cosine)."""
    return LambdaLR(optimizer, ScheduleLambda(name, num_warmup_steps, num_training_steps, **kw),
                    check_last_epoch(last_epoch))


def get_rex_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int,
                                 min_lr_ratio: float = 0.0, last_epoch: int = -1) -> LambdaLR:
    """transformers-style REX: linear warmup then REX decay to ``min_lr_ratio * base_lr``."""
    return get_lambda_schedule("rex", optimizer, num_warmup_steps, num_training_steps, min_lr_ratio=min_lr_ratio,
                               last_epoch=last_epoch)


def get_uba_schedule_with_warmup(optimizer, num_warmup_steps: int, num_training_steps: int,
                                 phi: float = UBA_DEFAULT_PHI, min_lr_ratio: float = 0.0,
                                 last_epoch: int = -1) -> LambdaLR:
    """transformers-style UBA (phi = 2 is ``get_cosine_schedule_with_warmup``)."""
    return get_lambda_schedule("uba", optimizer, num_warmup_steps, num_training_steps, phi=phi,
                               min_lr_ratio=min_lr_ratio, last_epoch=last_epoch)


def get_refined_schedule_with_warmup(optimizer, num_warmup_steps: int, grad_norms, norm: str = "l2",
                                     smoothing: float = 0.1, min_lr_ratio: float = 0.0,
                                     last_epoch: int = -1) -> LambdaLR:
    """transformers-style refined schedule; ``num_training_steps = len(grad_norms)``."""
    g = _check_norms(grad_norms)
    w = _check_int("num_warmup_steps", num_warmup_steps, 0)
    if w >= g.size:
        raise ValueError(f"num_warmup_steps: must be < len(grad_norms)={g.size}, got {w}")
    table = refined_multipliers(g[w:], norm, smoothing)
    return get_lambda_schedule("refined", optimizer, w, int(g.size), min_lr_ratio=min_lr_ratio,
                               decay_table=table.tolist(), last_epoch=last_epoch)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed: deepspeed.initialize(..., lr_scheduler=DeepSpeedSchedule("rex", 100, 1000))
# ----------------------------------------------------------------------------------------------------------------
class DeepSpeedSchedule:
    """A callable DeepSpeed accepts as ``lr_scheduler``: the engine calls it with its (basic, torch) optimizer
    and then drives the result (``step()`` after each optimizer step, ``state_dict()`` in checkpoints). The
    arguments are those of :func:`~adasched.schedules.get_schedule`. Passing an already built scheduler object
    works as well; the callable form builds it on the optimizer DeepSpeed actually steps."""

    def __init__(self, name: str, num_warmup_steps: int = 0, num_training_steps: int | None = None, **kw: Any):
        self.name, self.num_warmup_steps, self.num_training_steps, self.kw = name, num_warmup_steps, \
            num_training_steps, kw
        # checked now on a throwaway optimizer: a bad argument surfaced only inside deepspeed.initialize (without
        # last_epoch: a resume needs the real optimizer's initial_lr). A per-group min_lr list gets as many
        # groups, and the groups an lr above every absolute min_lr: the real optimizer's groups and lrs are
        # checked when DeepSpeed calls us (DeepSpeed's usual two groups, with and without weight decay, were
        # refused here, as was an absolute min_lr above 1.0)
        min_lr = kw.get("min_lr", 0.0)
        floors = list(min_lr) if isinstance(min_lr, (list, tuple)) else [min_lr]
        top = max([1.0] + [2.0 * float(v) for v in floors
                           if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)])
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(max(1, len(floors)))]
        if "last_epoch" in kw:  # (its type and range only: its value needs the real optimizer)
            check_last_epoch(kw["last_epoch"])
        get_schedule(name, torch.optim.SGD(groups, lr=top), num_warmup_steps,
                     num_training_steps, **{k: v for k, v in kw.items() if k != "last_epoch"})

    def __call__(self, optimizer: torch.optim.Optimizer):
        return get_schedule(self.name, optimizer, self.num_warmup_steps, self.num_training_steps, **dict(self.kw))


def _norms_digest(norms) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(norms, dtype=np.float64).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# megatron-core: drop-in for megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
# ----------------------------------------------------------------------------------------------------------------
MEGATRON_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD", "rex", "uba", "refined")
MEGATRON_WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


class MegatronParamScheduler:
    """Same constructor, ``step(increment)``, ``get_lr(param_group)``, ``get_wd``, ``state_dict`` and
    ``load_state_dict`` as megatron-core's ``OptimizerParamScheduler``; steps are counted in SAMPLES (megatron
    calls ``step(increment=global_batch_size)``). Warmup is megatron's: ``init_lr -> max_lr`` linearly over
    ``lr_warmup_steps`` (inclusive); decay from ``max_lr`` to ``min_lr`` at ``lr_decay_steps`` (which includes the
    warmup), then ``min_lr``. Param groups may override ``max_lr``/``min_lr``/``start_wd``/``end_wd``/``wd_mult``.

    Styles: ``constant``, ``linear``, ``cosine``, ``inverse-square-root`` and ``WSD`` (with ``wsd_decay_steps``,
    ``lr_wsd_decay_style``) as in megatron-core (same floats), plus ``rex``, ``uba``
    (``phi``) and ``refined`` (``grad_norms`` of a previous run, one per optimizer step, warmup included as
    :class:`~adasched.schedules.GradNormRecorder` writes them; the decay is refined from the norms after the
    warmup's share of them, ``round(len * lr_warmup_steps / lr_decay_steps)``, as :class:`Refined` uses
    ``grad_norms[W:]``; the table is interpolated linearly in progress, so the sample counts need not match)."""

    def __init__(self, optimizer, init_lr: float, max_lr: float, min_lr: float, lr_warmup_steps: int,
                 lr_decay_steps: int, lr_decay_style: str, start_wd: float | None = None,
                 end_wd: float | None = None,
                 wd_incr_steps: int = 1, wd_incr_style: str = "constant",
                 use_checkpoint_opt_param_scheduler: bool = True, override_opt_param_scheduler: bool = False,
                 wsd_decay_steps: int | None = None, lr_wsd_decay_style: str | None = None,
                 *, phi: float | None = None, grad_norms=None, norm: str | None = None,
                 smoothing: float | None = None):
        self.optimizer = optimizer
        # our styles' options, refused where the style has no use for them (a "rex" typed for "uba" with phi=1.0
        # dropped the phi silently; h55), as get_schedule and DeepSpeedSchedule refuse them
        for name, value, owner in (("phi", phi, "uba"), ("grad_norms", grad_norms, "refined"),
                                   ("norm", norm, "refined"), ("smoothing", smoothing, "refined")):
            if value is not None and lr_decay_style != owner:
                raise ValueError(f"{name}: not an option of lr_decay_style {lr_decay_style!r} (only of {owner!r})")
        phi = UBA_DEFAULT_PHI if phi is None else phi
        norm = "l2" if norm is None else norm
        smoothing = 0.1 if smoothing is None else smoothing
        for name, value in (("init_lr", init_lr), ("max_lr", max_lr), ("min_lr", min_lr)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # (None: float()'s TypeError)
                raise ValueError(f"{name}: must be a number, got {value!r}")
        self.init_lr, self.max_lr, self.min_lr = float(init_lr), float(max_lr), float(min_lr)
        if not (math.isfinite(self.max_lr) and self.max_lr >= 0.0):
            raise ValueError(f"max_lr: must be a finite number >= 0, got {max_lr!r}")
        if not (0.0 <= self.min_lr <= self.max_lr):
            raise ValueError(f"min_lr: must be in [0, max_lr={self.max_lr}], got {self.min_lr}")
        if not (0.0 <= self.init_lr <= self.max_lr):
            raise ValueError(f"init_lr: must be in [0, max_lr={self.max_lr}], got {self.init_lr}")
        self.lr_decay_steps = _check_int("lr_decay_steps", lr_decay_steps, 1)
        self.lr_warmup_steps = _check_int("lr_warmup_steps", lr_warmup_steps, 0)
        if self.lr_warmup_steps >= self.lr_decay_steps:
            raise ValueError(f"lr_warmup_steps: must be < lr_decay_steps={self.lr_decay_steps}, "
                             f"got {self.lr_warmup_steps}")
        if lr_decay_style not in MEGATRON_STYLES:
            raise ValueError(f"lr_decay_style: {lr_decay_style!r} not supported; choose {', '.join(MEGATRON_STYLES)}")
        self.lr_decay_style = lr_decay_style
        self.wsd_decay_steps, self.lr_wsd_decay_style = wsd_decay_steps, lr_wsd_decay_style
        if lr_decay_style == "WSD":  # other styles ignore them (megatron passes both for every style)
            self._check_wsd()
        self.phi = _check_phi(phi)
        self.decay_table = None
        self._refine = None                          # (norms, norm, smoothing): the table follows W and D
        if lr_decay_style == "refined":
            if grad_norms is None:
                raise ValueError("grad_norms: lr_decay_style='refined' needs the norms of a previous run")
            self._refine = (_check_norms(grad_norms), norm, _check_smoothing(smoothing))
            self._build_decay_table()
        # weight decay: megatron-core takes start_wd/end_wd always; left out here (both None) the param groups keep
        # their own weight_decay (the defaults of 0.0 set every group's weight decay to 0 - AdamW's 0.1 gone).
        # The state_dict then holds None for them, which megatron-core's own scheduler cannot load: give both to
        # move checkpoints between the two
        if (start_wd is None) != (end_wd is None):
            raise ValueError(f"{'start_wd' if start_wd is None else 'end_wd'}: give start_wd and end_wd together "
                             f"(or neither: the param groups keep their weight_decay)")
        self.start_wd = None if start_wd is None else float(start_wd)
        self.end_wd = None if end_wd is None else float(end_wd)
        if self.end_wd is not None and not math.isfinite(self.end_wd):
            raise ValueError(f"end_wd: must be finite, got {self.end_wd}")
        if self.start_wd is not None and not 0.0 <= self.start_wd <= self.end_wd:
            raise ValueError(f"start_wd: must be in [0, end_wd={self.end_wd}], got {self.start_wd}")
        self.wd_incr_steps = _check_int("wd_incr_steps", wd_incr_steps, 1)
        if wd_incr_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"wd_incr_style: must be constant, linear or cosine, got {wd_incr_style!r}")
        if wd_incr_style == "constant" and self.start_wd != self.end_wd:  # (megatron-core asserts it; end_wd won)
            raise ValueError(f"wd_incr_style: 'constant' needs start_wd == end_wd (got {self.start_wd} and "
                             f"{self.end_wd}); use 'linear' or 'cosine' to change the weight decay")
        self.wd_incr_style = wd_incr_style
        if override_opt_param_scheduler and use_checkpoint_opt_param_scheduler:
            raise ValueError("override_opt_param_scheduler: cannot be set together with "
                             "use_checkpoint_opt_param_scheduler")
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.num_steps = 0
        self.step(0)

    def _build_decay_table(self) -> None:
        """The refined decay from the norms after the warmup's share of them (``round(len * W / D)``)."""
        norms, norm, smoothing = self._refine
        skip = round(len(norms) * self.lr_warmup_steps / self.lr_decay_steps)  # the warmup's own norms
        if skip >= len(norms):
            raise ValueError(f"grad_norms: {len(norms)} norms leave none after the warmup's share ({skip})")
        self.decay_table = refined_multipliers(norms[skip:], norm, smoothing)

    def _check_wsd(self) -> None:
        # megatron-core asserts only that it is given: 0 keeps max_lr until lr_decay_steps (then min_lr), more than
        # lr_decay_steps starts the anneal before sample 0 (both run there, so both are taken here)
        self.wsd_decay_steps = _check_int("wsd_decay_steps", self.wsd_decay_steps, 0)
        if self.wsd_decay_steps > 0 and self.lr_wsd_decay_style not in MEGATRON_WSD_STYLES:
            raise ValueError(f"lr_wsd_decay_style: must be one of {', '.join(MEGATRON_WSD_STYLES)}, "
                             f"got {self.lr_wsd_decay_style!r}")

    def get_wd(self, param_group: dict | None = None) -> float:
        start = param_group.get("start_wd", self.start_wd) if param_group else self.start_wd
        end = param_group.get("end_wd", self.end_wd) if param_group else self.end_wd
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return end
        r = float(self.num_steps) / float(self.wd_incr_steps)
        coeff = r if self.wd_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - r)) + 1.0)
        return start + coeff * (end - start)

    def _coeff(self, z: float) -> float:
        style = self.lr_decay_style
        if style == "linear":
            return linear_multiplier(z)
        if style == "cosine":
            return cosine_multiplier(z)
        if style == "rex":
            return rex_multiplier(z)
        if style == "uba":
            return uba_multiplier(z, self.phi)
        table = self.decay_table
        x = z * (len(table) - 1)
        return float(np.interp(x, np.arange(len(table)), table))

    def get_lr(self, param_group: dict) -> float:
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        # Megatron's warmup includes its last step (the decay's value at z = 0 is 1 for its styles); a refined
        # table starts below 1, so its first decay step is the warmup's end (it ran one step at max_lr, up to 31x
        # the schedule's lr there)
        end = self.lr_warmup_steps - (self.lr_decay_style == "refined")
        if self.lr_warmup_steps > 0 and self.num_steps <= end:
            return self.init_lr + (max_lr - self.init_lr) * float(self.num_steps) / float(self.lr_warmup_steps)
        if self.lr_decay_style == "constant":
            return max_lr
        if self.num_steps > self.lr_decay_steps:
            return min_lr
        if self.lr_decay_style == "inverse-square-root":
            # (megatron-core's floats: x ** 0.5 and math.sqrt differ by an ulp for some x - 79 of 100,000 steps)
            return max(min_lr, max_lr * max(self.lr_warmup_steps, 1) ** 0.5 / (max(self.num_steps, 1) ** 0.5))
        if self.lr_decay_style == "WSD":
            anneal_start = self.lr_decay_steps - self.wsd_decay_steps
            if self.num_steps <= anneal_start:  # (always, for wsd_decay_steps = 0: num_steps <= lr_decay_steps here)
                return min_lr + 1.0 * (max_lr - min_lr)
            r = float(self.num_steps - anneal_start) / float(self.wsd_decay_steps)
            wsd = self.lr_wsd_decay_style
            coeff = (1.0 - r if wsd == "linear" else 0.5 * (math.cos(math.pi * r) + 1.0) if wsd == "cosine"
                     else 2.0 * math.pow(0.5, r) - 1.0 if wsd == "exponential" else 1.0 - math.sqrt(r))
            return min_lr + coeff * (max_lr - min_lr)
        z = float(self.num_steps - self.lr_warmup_steps) / float(self.lr_decay_steps - self.lr_warmup_steps)
        return min_lr + self._coeff(z) * (max_lr - min_lr)

    def step(self, increment: int) -> None:
        """Advance by ``increment`` samples and set every group's lr and weight decay."""
        self.num_steps += increment
        for k, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.get_lr(group)
            if self.start_wd is not None or "start_wd" in group or "end_wd" in group:  # else it keeps weight_decay
                self._check_group_wd(k, group)
                group["weight_decay"] = self.get_wd(group) * group.get("wd_mult", 1.0)

    def _check_group_wd(self, k: int, group: dict) -> None:
        """A group's own start_wd/end_wd: both known (its own or the scheduler's), as megatron-core's are always
        floats there; and equal under the 'constant' style, which megatron-core asserts per group."""
        start, end = group.get("start_wd", self.start_wd), group.get("end_wd", self.end_wd)
        if start is None or end is None:
            raise ValueError(f"param group {k}: {'end_wd' if end is None else 'start_wd'} is missing: a group that "
                             f"sets {'start_wd' if end is None else 'end_wd'} needs it too when the scheduler has "
                             f"no start_wd/end_wd")
        if self.wd_incr_style == "constant" and start != end:
            raise ValueError(f"param group {k}: wd_incr_style 'constant' needs start_wd == end_wd (got {start} and "
                             f"{end}); use 'linear' or 'cosine' to change the weight decay")

    def state_dict(self) -> dict:
        """megatron-core's keys, plus what our styles add (megatron-core ignores extra keys): ``phi`` for uba,
        ``norm``, ``smoothing`` and ``grad_norms_digest`` (sha256 of the float64 norms) for refined."""
        sd = {"max_lr": self.max_lr, "lr_warmup_steps": self.lr_warmup_steps, "num_steps": self.num_steps,
              "lr_decay_style": self.lr_decay_style, "lr_decay_steps": self.lr_decay_steps,
              "min_lr": self.min_lr, "start_wd": self.start_wd, "end_wd": self.end_wd,
              "wd_incr_style": self.wd_incr_style, "wd_incr_steps": self.wd_incr_steps}
        if self.lr_decay_style == "uba":
            sd["phi"] = self.phi
        if self.lr_decay_style == "refined" and self._refine is not None:
            norms, norm, smoothing = self._refine
            sd.update(norm=norm, smoothing=smoothing, grad_norms_digest=_norms_digest(norms))
        return sd

    def _check_and_set(self, ours, theirs, name: str):
        if self.override_opt_param_scheduler:
            return ours
        if not self.use_checkpoint_opt_param_scheduler and ours != theirs:
            raise ValueError(f"{name}: scheduler has {ours!r} but the checkpoint has {theirs!r}")
        return theirs

    def load_state_dict(self, sd: dict) -> None:
        """Megatron semantics: checked/overridden hyper-parameters, then ``step(num_steps)`` from a fresh scheduler."""
        self.max_lr = self._check_and_set(self.max_lr, sd.get("start_lr", sd.get("max_lr")), "max_lr")
        self.min_lr = self._check_and_set(self.min_lr, sd["min_lr"], "min_lr")
        self.lr_warmup_steps = self._check_and_set(
            self.lr_warmup_steps, sd.get("warmup_iter", sd.get("warmup_steps", sd.get("lr_warmup_steps"))),
            "lr_warmup_steps")
        self.lr_decay_steps = self._check_and_set(
            self.lr_decay_steps, sd.get("end_iter", sd.get("decay_steps", sd.get("lr_decay_steps"))), "lr_decay_steps")
        style = self._check_and_set(self.lr_decay_style, sd.get("decay_style", sd.get("lr_decay_style")),
                                    "lr_decay_style")
        # a checkpoint's style this scheduler cannot run (megatron raises deep inside the next step())
        if style not in MEGATRON_STYLES:
            raise ValueError(f"lr_decay_style: the checkpoint's {style!r} is not supported; choose "
                             f"{', '.join(MEGATRON_STYLES)} or pass override_opt_param_scheduler=True")
        if style == "refined" and self.decay_table is None:
            raise ValueError("lr_decay_style: the checkpoint uses 'refined' but this scheduler was built without "
                             "grad_norms; build it with lr_decay_style='refined', grad_norms=...")
        if style == "WSD":
            if self.wsd_decay_steps is None:
                raise ValueError("lr_decay_style: the checkpoint uses 'WSD' but this scheduler has no "
                                 "wsd_decay_steps; build it with wsd_decay_steps= and lr_wsd_decay_style=")
            self._check_wsd()
        self.lr_decay_style = style
        if style == "uba" and "phi" in sd:  # (a save before phi was saved: the constructor's phi)
            self.phi = _check_phi(self._check_and_set(self.phi, sd["phi"], "phi"))
        if style == "refined" and "grad_norms_digest" in sd:
            norms, norm, smoothing = self._refine
            if sd["grad_norms_digest"] != _norms_digest(norms) and not self.override_opt_param_scheduler:
                raise ValueError("grad_norms: this scheduler's norms differ from those of the checkpoint's refined "
                                 "schedule (pass the same grad_norms, or override_opt_param_scheduler=True)")
            self._refine = (norms, self._check_and_set(norm, sd["norm"], "norm"),
                            _check_smoothing(self._check_and_set(smoothing, sd["smoothing"], "smoothing")))
        if self._refine is not None:  # the checkpoint's W and D may differ from the constructor's
            self._build_decay_table()
        self.step(increment=sd.get("num_iters", sd.get("num_steps")))
        if "start_wd" in sd:
            self.start_wd = self._check_and_set(self.start_wd, sd["start_wd"], "start_wd")
            self.end_wd = self._check_and_set(self.end_wd, sd["end_wd"], "end_wd")
            self.wd_incr_steps = self._check_and_set(self.wd_incr_steps, sd["wd_incr_steps"], "wd_incr_steps")
            self.wd_incr_style = self._check_and_set(self.wd_incr_style, sd["wd_incr_style"], "wd_incr_style")

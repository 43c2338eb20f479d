"""Record per-step gradient norms (l2 and l1 over all parameters of an optimizer) and read them back.

    rec = GradNormRecorder(optimizer)            # hooks optimizer.step (a step pre-hook)
    with rec.recording("norms.csv"):              # or rec.attach() ... rec.detach(); rec.to_csv(path)
        for batch in data:
            loss(batch).backward(); clip(...); optimizer.step(); sched.step(); optimizer.zero_grad()

The hook runs right before each ``optimizer.step()``, so it sees the gradients the step uses: AFTER any clipping
done before the step (clipped at 1.0, every row reads 1.0, and the refinement degenerates to a linear decay). To log
the norms before clipping, as Megatron, DeepSpeed and torchtitan report them, call ``rec.capture()`` after the
backward (after ``scaler.unscale_(opt)`` under GradScaler) and before the clipping: the next step's row is that
capture. DeepSpeed clips inside ``engine.step()`` (``gradient_clipping``, 1.0 by default): under ZeRO-1/2/3 the
recorder on ``engine.optimizer`` logs the norms before that clipping by itself (ZeRO scales every gradient by one
factor, which it undoes from ZeRO's global norm); without ZeRO (stage 0) call ``rec.capture()`` after
``engine.backward`` (or set ``gradient_clipping`` to 0). A step that takes a closure (LBFGS) is recorded right
after it, from the gradients its closure computed. A step that is skipped (``GradScaler`` on inf/NaN gradients)
is not a step and has no row. Norms stay on the device until they are read (no sync per step). CSV columns:
``step,l2,l1`` (one row per optimizer step, step from 0).

Sharded training: gradients that are DTensors (FSDP2 ``fully_shard``, tensor parallel) are reduced over their
device mesh, so every rank records the norms of the whole gradient. Optimizers whose parameters are each rank's
disjoint slice as plain tensors (DeepSpeed ZeRO's fp32 partitions) need ``process_group=`` (the data-parallel
group): the per-rank sums are all-reduced. Without it each rank would log the norms of its own slice. Under ZeRO
pass the ZeRO optimizer itself, ``GradNormRecorder(engine.optimizer, process_group=...)``: it steps the torch
optimizer it wraps once per parameter group (ZeRO-1/2) or sub-group (ZeRO-3), each call seeing only that part,
so the recorder sums those calls into one row per ``engine.step()`` (given the torch optimizer inside, a
multi-group ZeRO-1/2 step is refused rather than logged as one partial row per group).
"""
from __future__ import annotations

import csv
import functools
import io
import math
import os
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["GradNormRecorder", "grad_norms_of", "write_norms_csv", "read_norms_csv", "load_norms_file"]


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "full_tensor")


def grad_norms_of(params, process_group=None) -> torch.Tensor:
    """``[l2, l1]`` norm of all gradients in ``params`` (float64 accumulation), as one 2-element tensor on the
    gradients' device. DTensor gradients are reduced over their mesh (one reduction per mesh and placement, not
    per tensor); ``process_group``: the plain gradients are disjoint per-rank slices of one gradient (ZeRO
    partitions): their squared l2 and l1 sums are all-reduced over that group (every rank of it must call)."""
    params = list(params)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    # sparse gradients (nn.Embedding(sparse=True)): the norms of their values, coalesced first (duplicate indices
    # add up); vector_norm has no sparse kernel (the step raised NotImplementedError)
    plain = [g.coalesce().values() if g.is_sparse else g for g in grads if not _is_dtensor(g)]
    # a rank without plain gradients still joins the all-reduce, with zeros on the parameters' device
    device = plain[0].device if plain else (params[0].device if params else torch.device("cpu"))
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of squares, sum of |g|]
    if plain:
        # (moved to one device: a model split over devices - device_map="auto", CPU-offloaded layers - gave
        # "Tensor on device ... is not on the expected device" inside optimizer.step())
        l2 = torch.stack([torch.linalg.vector_norm(g, 2, dtype=torch.float64).to(device) for g in plain])
        l1 = torch.stack([torch.linalg.vector_norm(g, 1, dtype=torch.float64).to(device) for g in plain])
        sums = torch.stack([l2.square().sum(), l1.sum()])
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    # DTensors: stacked per (mesh, placements) so each group is one reduction (the norms are partial or replicated)
    groups: dict = defaultdict(list)
    for g in grads:
        if _is_dtensor(g):
            groups[(id(g.device_mesh), tuple(g.placements))].append(g)
    for same in groups.values():
        l2 = torch.stack([torch.linalg.vector_norm(g, 2, dtype=torch.float64) for g in same])
        l1 = torch.stack([torch.linalg.vector_norm(g, 1, dtype=torch.float64) for g in same])
        n2 = torch.linalg.vector_norm(l2, 2).full_tensor()
        n1 = torch.linalg.vector_norm(l1, 1).full_tensor()
        sums = sums + torch.stack([n2.square(), n1]).to(sums.device)
    return torch.stack([sums[0].sqrt(), sums[1]])


def _hookable(optimizer) -> bool:
    """Whether step hooks can be registered on ``optimizer`` (a torch optimizer that ran Optimizer.__init__)."""
    return hasattr(optimizer, "register_step_pre_hook") and hasattr(optimizer, "_optimizer_step_pre_hooks")


class GradNormRecorder:
    """Logs ``(l2, l1)`` of the gradients of every parameter in ``optimizer.param_groups`` at each step.
    ``optimizer``: a torch optimizer, or a wrapper that steps the torch optimizer at its ``.optimizer`` in parts
    (DeepSpeed's ZeRO optimizers, ``engine.optimizer``): one row per wrapper step, summed over its parts.
    ``process_group``: for optimizers over per-rank disjoint plain-tensor slices (DeepSpeed ZeRO), the group
    whose ranks hold the slices (see the module docstring); DTensor gradients need nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer, process_group=None):
        outer = None
        if not _hookable(optimizer):
            # (accelerate's AcceleratedOptimizer, transformers.Trainer's optimizer: a torch.optim.Optimizer subclass
            # that never ran Optimizer.__init__ - its register_step_pre_hook raised AttributeError)
            inner = getattr(optimizer, "optimizer", None)
            if not (_hookable(inner) and callable(getattr(optimizer, "step", None))):
                raise ValueError(f"optimizer: {type(optimizer).__name__} is not a torch.optim.Optimizer nor a "
                                 "wrapper of one (for DeepSpeed, pass engine.optimizer, with process_group= under "
                                 "ZeRO)")
            if not hasattr(optimizer, "__dict__"):  # (its step cannot be hooked per instance: __slots__)
                raise ValueError(f"optimizer: {type(optimizer).__name__} wraps a torch optimizer but its step cannot "
                                 "be hooked (no instance __dict__); pass the torch optimizer at its .optimizer")
            outer, optimizer = optimizer, inner
        self.optimizer = optimizer
        self.outer = outer
        """The wrapper whose ``step`` is one row (None: each ``optimizer.step()`` is)."""
        self.process_group = process_group
        self._norms: list[torch.Tensor] = []
        self._handles: list = []
        self._after_closure = False
        self._closure_row: tuple[torch.Tensor, torch.Tensor] | None = None  # norms after the step's last closure call
        self._groups = 0  # param groups at attach (a ZeRO-1/2 part-step shows fewer)
        self._part: torch.Tensor | None = None  # [sum of squares, l1, skipped] of the wrapper step's parts so far
        self._in_outer = False
        self._outer_step = None  # the wrapper's own ``step`` attribute, when it had one, to restore
        self._wrapped = None  # our step installed on the wrapper
        self._captured: torch.Tensor | None = None  # capture(): [l2, l1] for the next step's row

    def capture(self) -> None:
        """Measure the gradients now - after the backward, before clipping - as the next ``optimizer.step()``'s
        row (a later capture replaces it; a step GradScaler skips takes none, and the next capture replaces it).
        Under GradScaler call it after ``scaler.unscale_(optimizer)``. Not for a wrapper stepped in parts
        (DeepSpeed ZeRO's ``engine.optimizer``): its partitions hold the gradients only inside its step, and its
        rows are already the norms before DeepSpeed's ``gradient_clipping``."""
        if self.outer is not None:
            raise RuntimeError("GradNormRecorder.capture: not for a wrapper stepped in parts (DeepSpeed ZeRO), and not "
                               "needed there: its rows are the norms before DeepSpeed's gradient_clipping")
        if not self._handles:
            raise RuntimeError("GradNormRecorder.capture: attach() first (or capture inside recording())")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._captured = grad_norms_of(params, self.process_group)

    def _record(self, optimizer) -> None:
        self._commit(*self._measure(optimizer))

    def _measure(self, optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        """([l2, l1], skipped) of the gradients ``optimizer`` is about to apply."""
        if self.outer is None and len(optimizer.param_groups) < self._groups:
            # DeepSpeed ZeRO-1/2 steps the torch optimizer once per group, each call seeing that group alone: one
            # row per group of partial norms (2 groups: 2N rows, each a part of the norm) was logged
            raise RuntimeError(f"GradNormRecorder: optimizer.step() ran on {len(optimizer.param_groups)} of its "
                               f"{self._groups} parameter groups (DeepSpeed ZeRO steps them one at a time): record "
                               f"the wrapper instead, GradNormRecorder(engine.optimizer, process_group=...)")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norms = grad_norms_of(params, self.process_group)
        # GradScaler with an optimizer that unscales inside its step (fused=True: _step_supports_amp_scaling) hands
        # it the still-scaled gradients with these two attributes; found_inf != 0 makes that step a no-op. The row
        # is unscaled here (it logged the norms times the loss scale) and a skipped step's row (inf/NaN, which made
        # the CSV unreadable) is dropped when the rows are read - on the device until then, no sync per step
        scale, found = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
        if isinstance(scale, torch.Tensor):
            norms = norms / scale.detach().reshape(-1)[0].to(norms.device, torch.float64)
        skip = (found.detach().reshape(-1)[0].to(norms.device, torch.float64) if isinstance(found, torch.Tensor)
                else norms.new_zeros(()))
        return norms, skip

    def _commit(self, norms: torch.Tensor, skip: torch.Tensor) -> None:
        if self._in_outer:  # one part of the wrapper's step: summed (squares for l2) into its row
            part = torch.stack([norms[0].square(), norms[1], skip.reshape(())])
            if self._part is None:
                self._part = part
            else:
                self._part = torch.stack([self._part[0] + part[0], self._part[1] + part[1],
                                          torch.maximum(self._part[2], part[2])])
            return
        self._norms.append(torch.cat([norms, skip.reshape(1)]))

    def _wrap_outer_step(self) -> None:
        outer = self.outer
        self._outer_step = outer.__dict__.get("step")
        step = outer.step

        @functools.wraps(step)
        def recorded_step(*args, **kwargs):
            self._in_outer, self._part = True, None
            try:
                out = step(*args, **kwargs)
            finally:
                self._in_outer = False
            part, self._part = self._part, None
            if part is not None:  # (a step ZeRO skipped, fp16 overflow, called no part: no row)
                row = torch.stack([part[0].sqrt(), part[1], part[2]])
                undo = self._zero_clip_factor(row.device)
                if undo is not None:
                    row = torch.cat([row[:2] * undo, row[2:]])
                self._norms.append(row)
            return out

        outer.step = self._wrapped = recorded_step

    def _zero_clip_factor(self, device) -> torch.Tensor | None:
        """The factor DeepSpeed ZeRO's ``gradient_clipping`` divided this step's gradients by, or None: ZeRO-1/2/3
        clip inside the wrapper's step, every gradient by one factor ``max(1, (g + 1e-6) / clip_grad)`` with ``g``
        the global norm before clipping (its ``_global_grad_norm``, loss scale removed), so the row times it is the
        row before clipping - l2 and l1 alike (a uniform factor scales both). Only on the norms of the whole
        gradient (``process_group`` given, or one rank): a rank's own slice times the global factor is neither."""
        clip = getattr(self.outer, "clip_grad", None)
        g = getattr(self.outer, "_global_grad_norm", None)
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not clip > 0 or g is None:
            return None
        if self.process_group is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                return None
        g = torch.as_tensor(g, dtype=torch.float64).to(device).reshape(())  # (a tensor stays on the device: no sync)
        return torch.clamp((g + 1e-6) / float(clip), min=1.0)

    def _pre_hook(self, optimizer, args, kwargs):
        # a closure recomputes the gradients inside step(): the norms are taken right after each call of it (the
        # last call's kept), before the update. torch passes the hooks step's whole ``args``, the optimizer first:
        # a positional closure is args[1]. (Recorded after the step, a foreach nesterov SGD update - the default
        # on CUDA - had already added the momentum buffer to p.grad in place: 2.10 logged for 1.10.)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        self._after_closure = closure is not None
        self._closure_row = None
        if self._captured is not None:  # capture(): the norms before clipping (the step's closure is not measured)
            norms, self._captured = self._captured, None
            self._after_closure = False
            found = getattr(optimizer, "found_inf", None)  # a fused optimizer's in-step GradScaler skip: no row
            skip = (found.detach().reshape(-1)[0].to(norms.device, torch.float64) if isinstance(found, torch.Tensor)
                    else norms.new_zeros(()))
            self._commit(norms, skip)
            return None
        if not self._after_closure:
            self._record(optimizer)
            return None

        @functools.wraps(closure)
        def recorded_closure(*c_args, **c_kwargs):
            out = closure(*c_args, **c_kwargs)
            self._closure_row = self._measure(optimizer)
            return out

        if len(args) > 1:
            return (args[0], recorded_closure, *args[2:]), kwargs
        return args, dict(kwargs, closure=recorded_closure)

    def _post_hook(self, optimizer, args, kwargs) -> None:
        if self._after_closure:
            self._after_closure = False
            row, self._closure_row = self._closure_row, None
            # (an optimizer that never called the closure: the gradients as the step left them)
            self._commit(*row) if row is not None else self._record(optimizer)

    def attach(self) -> "GradNormRecorder":
        if not self._handles:
            self._groups = len(self.optimizer.param_groups)
            self._handles = [self.optimizer.register_step_pre_hook(self._pre_hook),
                             self.optimizer.register_step_post_hook(self._post_hook)]
            if self.outer is not None:
                self._wrap_outer_step()
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        # the wrapper's step back - unless another recorder wrapped ours since (its detach restores ours, which then
        # only passes through: no hooks, no rows)
        if self._handles and self.outer is not None and self.outer.__dict__.get("step") is self._wrapped:
            if self._outer_step is not None:
                self.outer.step = self._outer_step
            else:
                del self.outer.step  # the class's method again
        self._handles = []

    @contextmanager
    def recording(self, path: str | os.PathLike | None = None) -> Iterator["GradNormRecorder"]:
        """Attach for the ``with`` block; write the CSV to ``path`` at the end (also when it raises: then a CSV that
        cannot be written is a warning, and the block's own exception propagates). ``path`` is checked on entry.
        The CSV holds every row this recorder logged (rows accumulate over its life: one recorder per run), header
        only when it logged none (a previous run's file is not left in place)."""
        import sys

        from adasched.profiler.io import check_output_path

        if path is not None:
            check_output_path(path, "path")  # (a folder was found only at the end, masking the run's exception)
        self.attach()
        ok = False
        try:
            yield self
            ok = True
        finally:
            self.detach()
            if path is not None:
                try:
                    self.to_csv(path)
                except Exception as err:
                    if ok:
                        raise
                    # the run's own exception is the one to see
                    sys.stderr.write(f"warning: GradNormRecorder: the norms CSV was not written: {err}\n")

    def __enter__(self) -> "GradNormRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def __len__(self) -> int:
        return len(self._rows()) if self._norms else 0

    @property
    def l2(self) -> list[float]:
        return [float(v) for v in self._rows()[:, 0]] if self._norms else []

    @property
    def l1(self) -> list[float]:
        return [float(v) for v in self._rows()[:, 1]] if self._norms else []

    def _rows(self) -> torch.Tensor:
        rows = torch.stack(self._norms).cpu()
        return rows[rows[:, 2] == 0][:, :2]

    def to_csv(self, path: str | os.PathLike) -> Path:
        rows = self._rows().tolist() if self._norms else []
        return write_norms_csv(path, [r[0] for r in rows], [r[1] for r in rows])


def write_norms_csv(path: str | os.PathLike, l2: list[float], l1: list[float]) -> Path:
    from adasched.profiler.io import atomic_write_text

    if len(l2) != len(l1):
        raise ValueError(f"l1: has {len(l1)} values but l2 has {len(l2)}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "l2", "l1"])
    for i, (a, b) in enumerate(zip(l2, l1)):
        w.writerow([i, repr(float(a)), repr(float(b))])
    return atomic_write_text(path, buf.getvalue())


def read_norms_csv(path: str | os.PathLike, norm: str = "l2") -> list[float]:
    """The ``norm`` column of a norms CSV (header required: ``step,l2,l1`` or any header with that column).
    Missing file, missing column, empty, non-numeric, non-finite or negative values raise InputError naming the
    file and row (a zero is read: the refinement's median filter removes an isolated one, see refined_multipliers)."""
    from adasched.profiler.io import InputError, read_text

    if norm not in ("l2", "l1"):
        raise ValueError(f"norm: must be 'l2' or 'l1', got {norm!r}")
    path = Path(path)
    # missing, a folder, unreadable, or blank ("file is empty": a whitespace-only file read as a header without
    # the column, "no column 'l2'")
    text = read_text(path, expected="a norms CSV")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise InputError(path, "empty norms file (expected a header step,l2,l1 and one row per step)")
    header = [h.strip() for h in header]
    if norm not in header:
        if header[0].lstrip().startswith(("{", "[")):  # (a refined schedule's JSON)
            raise InputError(path, "is JSON, not a norms CSV (step,l2,l1 as GradNormRecorder writes it); a refined "
                                   "schedule .json is read by Refined.from_file / `schedules plot`")
        raise InputError(path, f"no column {norm!r} in header {','.join(header)}")
    col = header.index(norm)
    step_col = header.index("step") if "step" in header else None
    out: list[float] = []
    last_step = None
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):  # a row cut short (a run killed mid-write) was read as far as it went
            raise InputError(path, f"line {lineno}: {len(row)} fields, the header has {len(header)}: {row!r}")
        if step_col is not None:  # one row per optimizer step, in order (a repeated or reordered log misaligns)
            try:
                step = int(row[step_col])
            except (IndexError, ValueError):
                raise InputError(path, f"line {lineno}: column 'step' is not an integer: {row!r}") from None
            if last_step is not None and step != last_step + 1:
                raise InputError(path, f"line {lineno}: step {step} follows step {last_step} (expected "
                                       f"{last_step + 1}: one row per optimizer step, in order)")
            last_step = step
        try:
            v = float(row[col])
        except (IndexError, ValueError):
            raise InputError(path, f"line {lineno}: column {norm!r} is not a number: {row!r}") from None
        if not math.isfinite(v) or v < 0:  # (0: a step whose gradient vanished, which the recorder writes too)
            raise InputError(path, f"line {lineno}: gradient norm must be finite and >= 0, got {v}")
        out.append(v)
    if not out:
        raise InputError(path, "no gradient norms (the file has a header but no rows)")
    return out


@functools.cache
def _refined_file_model():
    """What ``load_norms_file`` reads of a schedule JSON from ``adasched schedules refine`` (other keys are left
    alone; the derived steps, smoothed norms and multipliers are checked); strict: a bool is not a norm value."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class RefinedScheduleFile(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        kind: Literal["refined_lr_schedule"]
        schema_version: Literal[1] = 1
        norm: Literal["l2", "l1"]
        smoothing: float = Field(default=0.1, ge=0, lt=1)
        grad_norms: list[float] = Field(min_length=1)
        # what `schedules refine` derived from the above (checked against a recomputation by load_norms_file)
        steps: int | None = None
        smoothed_norms: list[float] | None = None
        multipliers: list[float] | None = None

    return RefinedScheduleFile


#: stored derived values (multipliers, smoothed norms) must match their recomputation to this relative tolerance
#: (the JSON holds floats exactly; the slack is for another numpy's summation order)
DERIVED_RTOL = 1e-9


def _check_derived(path: Path, doc: dict) -> None:
    """A refined JSON's ``steps``, ``smoothed_norms`` and ``multipliers`` were written from its grad_norms, norm
    and smoothing; training recomputes them from those, so a stored value that differs (an edited or mixed-up
    file) would silently not be the schedule the file shows: InputError naming the file and the field."""
    import numpy as np

    from adasched.profiler.io import InputError

    from .lr import refined_multipliers, smooth_norms

    g = doc["grad_norms"]
    if doc.get("steps") is not None and doc["steps"] != len(g):
        raise InputError(path, f"steps: {doc['steps']} but the file has {len(g)} grad_norms")
    try:
        want = {"smoothed_norms": smooth_norms(g, doc["smoothing"]),
                "multipliers": refined_multipliers(g, doc["norm"], doc["smoothing"])}
    except ValueError as err:
        raise InputError(path, str(err)) from None
    for key, ref in want.items():
        got = doc.get(key)
        if got is None:
            continue
        if len(got) != len(ref):
            raise InputError(path, f"{key}: {len(got)} values, expected {len(ref)} for {len(g)} grad_norms")
        bad = np.flatnonzero(~np.isclose(np.asarray(got, dtype=np.float64), ref, rtol=DERIVED_RTOL, atol=1e-12))
        if bad.size:
            i = int(bad[0])
            raise InputError(path, f"{key}.{i}: {got[i]!r} but grad_norms, norm {doc['norm']!r} and smoothing "
                                   f"{doc['smoothing']:g} give {float(ref[i])!r} (an edited file? refine it again)")


def load_norms_file(path: str | os.PathLike, norm: str | None = None) -> dict:
    """Norms from a CSV (``{'norm', 'grad_norms'}``) or a schedule JSON from ``adasched schedules refine``
    (``{'norm', 'smoothing', 'grad_norms', ...}``)."""
    from adasched.profiler.io import InputError, read_json

    path = Path(path)
    if path.suffix.lower() == ".json":
        from pydantic import ValidationError

        from adasched.profiler.io import describe_validation_error

        data = read_json(path)
        if not isinstance(data, dict) or data.get("kind") != "refined_lr_schedule":
            raise InputError(path, "not a refined schedule (expected kind 'refined_lr_schedule')")
        try:
            doc = _refined_file_model().model_validate(data).model_dump()
        except ValidationError as err:
            raise InputError(path, describe_validation_error(err)) from None
        if norm is not None and norm != doc["norm"]:
            raise InputError(path, f"norm: file was refined with {doc['norm']!r}, asked for {norm!r}")
        _check_derived(path, doc)
        return doc
    return {"norm": norm or "l2", "grad_norms": read_norms_csv(path, norm or "l2")}

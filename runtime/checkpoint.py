"""Checkpoint and resume for the training entry points (torch.distributed.checkpoint underneath).

A run saves into one folder; each save is a sub-folder ``step-00000012`` that DCP writes with one ``.distcp`` file
per rank, and rank 0 commits it by writing ``adasched-checkpoint.json`` (step, world size, the run's identity) and
renaming ``step-00000012.partial`` to ``step-00000012``. A crash mid-save leaves only a ``.partial`` folder, which
loading ignores and the next commit removes; deleting a save (keep-K, or a replaced one) removes its
metadata first, so a crash midway leaves an uncommitted folder, never a committed one with files missing. When
rank 0 cannot create or commit a save, every rank raises its error (none waits in a collective). The newest
``keep`` committed saves are kept. A run resumed from an older save (``load_step``) deletes the saves after it at
its first save: they are another timeline, and the folder's newest save must be this run's.

Every rank stores its own state under its own key (``rank3/model``, ...): the entry points hold different things
per rank (expert-parallel experts, pipeline stages, per-rank RNG), and keys shared by all ranks would be saved
once, as if replicated. Loading them as saved therefore needs the world size of the save; the run identity (plan
digest, model shape, seed, ...) must match too, or resuming would continue a different run. Both are checked
before any process group exists (:func:`find_checkpoint`, :func:`check_resumable`), so a mismatch is one
``error:`` line - except that a trainer able to *reshard* accepts another world size or layout (the same run on
other GPUs, another plan of it), naming its layout-only identity entries and, per state entry, how a rank of the
new layout loads it: ``replicated`` (rank 0's copy: train_sp's data-parallel model, counters), ``own_rank`` (the
same rank's copy where the save has one: per-rank data generators) or a resharder that reads the saved ranks' keys
it needs and rebuilds its entry (train_moe's experts joined and re-cut, train_lora's pipeline stages merged). DCP
reads any saved key on any number of ranks.

State values are any object with ``state_dict()`` / ``load_state_dict()`` (a module, an optimizer, an
LRScheduler) or the wrappers here: :class:`ModelState` (model + optimizers, DCP's own state-dict helpers, so the
optimizer's state exists before it is loaded into), :class:`RNGState` (torch, CUDA and Python generators) and
:class:`Values` (plain counters such as the data cursor; a tensor-free dict is saved whole, as one value).

Asynchronous saves (``CheckpointConfig(async_save=True)``, the launchers' ``--checkpoint-async``; torchtitan's
async mode): :meth:`Checkpointer.save` copies the state to host memory (DCP's stager: a second copy of every saved
tensor while the save is in flight) and returns; DCP writes the files from a background thread, coordinating the
ranks over a gloo group of its own (the training's collectives are not interleaved with it), and once every rank's
file is written rank 0 commits in the background as above. The next :meth:`~Checkpointer.save` and
:meth:`~Checkpointer.finish` (call it after the last save) wait for the save in flight and raise its error on
every rank. A save that was in flight when the process died is a ``.partial`` folder: not a save.

One run at a time per folder: :meth:`Checkpointer.resume` has rank 0 take an exclusive lock (``flock``) on the
folder's ``.adasched-lock`` file, held while the Checkpointer lives (and released by the operating system when the
process ends, however it ends), so that a second run started on the same folder stops with one line naming the
holder instead of pruning, committing and resuming over the first one's saves. Checkpointers of one process share
its lock (a save and a resume in one test or notebook). A file system that cannot lock (NFSv3 without lockd, Lustre
without ``-o flock``) gets a note on stderr and the run goes on unguarded.
"""
from __future__ import annotations

import bisect
import errno
import json
import os
import pickle
import random
import shutil
import sys
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from adasched.profiler.io import InputError, atomic_write_json, check_output_folder, read_json

__all__ = ["CheckpointConfig", "CheckpointInfo", "Checkpointer", "ModelState", "RNGState", "Values",
           "find_checkpoint", "check_resumable", "committed_steps", "step_folder", "failure_line", "META_NAME",
           "FORMAT", "saved_entries", "load_templates", "layout_changes", "agree_on_save"]

META_NAME = "adasched-checkpoint.json"
LOCK_NAME = ".adasched-lock"
FORMAT = 1
_PREFIX = "step-"
_PARTIAL = ".partial"


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how often a run saves, and which save it resumes from."""

    folder: Path
    """Folder of the run's saves (created when the run starts: :meth:`Checkpointer.resume` locks it)."""
    interval: int = 0
    """Save after every ``interval`` completed steps; 0 = only at the end of the run."""
    keep: int = 2
    """Committed saves kept (the newest); 0 = all."""
    load_step: int | None = None
    """Resume from this step's save; None = the newest committed save, if any."""
    async_save: bool = False
    """Save in the background (torchtitan's async mode): :meth:`Checkpointer.save` returns once the state is copied
    to host memory, a thread writes the files and rank 0 commits; :meth:`Checkpointer.finish` (also at the next
    save) waits for it and raises its error on every rank."""

    def __post_init__(self):
        if self.interval < 0:
            raise InputError("--checkpoint-every", f"{self.interval} must be >= 0 (0 = only at the end)")
        if self.keep < 0:
            raise InputError("--checkpoint-keep", f"{self.keep} must be >= 0 (0 = keep all)")
        if self.load_step is not None and self.load_step < 0:
            raise InputError("--load-step", f"{self.load_step} must be >= 0")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed save, as its metadata file describes it."""

    step: int
    path: Path
    world_size: int
    run: dict = field(default_factory=dict)
    saved_at: str = ""


def step_folder(folder: Path, step: int) -> Path:
    return Path(folder) / f"{_PREFIX}{step:08d}"


def is_save_name(name: str) -> bool:
    """Whether ``name`` is a folder name this module writes and prunes: step_folder's (``step-`` and 8 or more
    digits, zero-padded to 8), with or without ``.partial``; a user's own step-up or step-4 is not."""
    if not name.startswith(_PREFIX):
        return False
    digits = name[len(_PREFIX):].removesuffix(_PARTIAL)
    # ("²".isdigit(), but int("²") raises)
    return (digits.isascii() and digits.isdigit()
            and name.removesuffix(_PARTIAL) == step_folder(Path(), int(digits)).name)


def committed_steps(folder: str | os.PathLike) -> list[int]:
    """Steps of the committed saves in ``folder``, ascending ([] when the folder does not exist)."""
    folder = Path(folder)
    try:
        if not folder.exists():
            return []
        children = list(folder.iterdir()) if folder.is_dir() else None
    except OSError as err:  # a name too long, no permission, ...
        raise InputError(folder, f"cannot read: {err.strerror or err}") from None
    if children is None:
        raise InputError(folder, "is not a folder (--checkpoint-dir takes the folder of a run's saves)")
    steps = []
    for child in children:
        name = child.name
        # only names of step_folder's form, as _prune: a user's copy step-4 beside step-00000004 counted the step
        # twice (keep-K then deleted this run's save) and a step-9 sent resume to a step-00000009 that does not exist
        if is_save_name(name) and not name.endswith(_PARTIAL) and _has_meta(child):
            steps.append(int(name[len(_PREFIX):]))
    return sorted(steps)


def _has_meta(child: Path) -> bool:
    """Whether ``child`` holds a save's metadata; a folder this user cannot read is an InputError (is_file raised
    a PermissionError traceback through every launcher's pre-check)."""
    try:
        return (child / META_NAME).is_file()
    except OSError as err:
        raise InputError(child, f"cannot read: {err.strerror or err}") from None


def _read_info(path: Path) -> CheckpointInfo:
    meta_path = path / META_NAME
    meta = read_json(meta_path)
    if not isinstance(meta, dict):
        raise InputError(meta_path, "expected a JSON object")
    if type(meta.get("format")) is not type(FORMAT) or meta.get("format") != FORMAT:  # (true == 1 passed)
        raise InputError(meta_path, f"format {meta.get('format')!r} is not {FORMAT} (saved by another version)")
    for key, least in (("step", 0), ("world_size", 1)):
        # (world_size 0 passed and the resharder indexed an empty list: an IndexError traceback)
        if key not in meta:
            raise InputError(meta_path, f"missing field {key!r}")
        if type(meta[key]) is not int or meta[key] < least:
            raise InputError(meta_path, f"{key}: {meta[key]!r} is not a whole number >= {least}")
    step, world = meta["step"], meta["world_size"]
    run = meta.get("run", {})
    if not isinstance(run, dict):
        raise InputError(meta_path, "'run' must be an object")
    if path.name != step_folder(path.parent, step).name:  # a renamed or copied step folder
        raise InputError(meta_path, f"says step {step}, but its folder is {path.name}")
    return CheckpointInfo(step=step, path=path, world_size=world, run=run, saved_at=str(meta.get("saved_at", "")))


def find_checkpoint(folder: str | os.PathLike, load_step: int | None = None) -> CheckpointInfo | None:
    """The save to resume from: ``load_step``'s, else the newest committed one; None when there is none (a fresh
    run). A ``load_step`` that was not saved is an :class:`InputError` listing the saved steps; a folder no save
    could be written to is an InputError too (a probe file is written and removed: a run learns it before
    training)."""
    folder = Path(folder)
    _check_checkpoint_folder(folder)
    steps = committed_steps(folder)
    if load_step is None:
        return _read_info(step_folder(folder, steps[-1])) if steps else None
    if load_step not in steps:
        have = ", ".join(map(str, steps)) if steps else "none"
        raise InputError("--load-step", f"{load_step} was not saved in {folder} (committed steps: {have})")
    return _read_info(step_folder(folder, load_step))


def _check_checkpoint_folder(folder: Path) -> None:
    """A folder a run can save into (:func:`_check_writable`), and not one save's own folder."""
    _check_writable(folder)
    if (folder / META_NAME).is_file():  # one save's folder: it started a fresh run, saving into the save
        step = folder.name[len(_PREFIX):] if folder.name.startswith(_PREFIX) else "?"
        raise InputError(folder, f"this is the save of step {step.lstrip('0') or 0}, not a checkpoint folder: give "
                                 f"its parent folder (--checkpoint-dir {folder.parent}), with --load-step to pick "
                                 f"this save")


def _check_writable(folder: Path) -> None:
    """Refuse a folder no save could be written to (profiler.io's probe: an existing non-folder, under a file, or a
    place where a probe file cannot be created, as /proc for root), so that a run learns it before training rather
    than at its first save."""
    try:
        check_output_folder(folder, "--checkpoint-dir")
    except OSError as err:  # a name too long, ...
        raise InputError("--checkpoint-dir", f"{folder}: {err.strerror or err}") from None


def check_resumable(info: CheckpointInfo, world_size: int, run: Mapping[str, Any],
                    layout_keys: Iterable[str] = (), upgrade=None, reshardable: bool = False) -> bool:
    """Refuse to resume a save made by another run (one line naming what differs). Whether the resume is
    *resharded*: ``layout_keys`` name the entries of ``run`` that describe only how the work is laid out over the
    ranks (a plan's rank groups), and a trainer that passes them resumes a save of another world size or layout
    (:class:`Checkpointer`'s ``replicated`` / ``own_rank`` / ``resharders``); without them a save of another world
    size is refused as well (``reshardable``: the trainer reshards another world size though its identity has no
    layout entry). ``upgrade(saved_run) -> run`` completes the identity of a save made before the trainer added an
    entry (from what the save does hold), so that such a save still resumes."""
    where = info.path / META_NAME
    layout = set(layout_keys)
    if info.world_size != world_size and not (layout or reshardable):
        raise InputError(where, f"saved by {info.world_size} ranks, this run has {world_size} (each rank loads its "
                                f"own state; start with the same world size or a new --checkpoint-dir)")
    saved = _jsonable(upgrade(dict(info.run)) if upgrade is not None else info.run)
    want = _jsonable(dict(run))
    keys = sorted(set(saved) | set(want))
    diffs = [f"{k}: saved {saved.get(k)!r}, now {want.get(k)!r}"
             for k in keys if k not in layout and saved.get(k) != want.get(k)]
    if diffs:
        ranks = (f" with {info.world_size} ranks (this run: {world_size}; another world size alone would reshard)"
                 if info.world_size != world_size else "")
        raise InputError(where, "saved by a different run (" + "; ".join(diffs[:4])
                         + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
                         + f"){ranks}; use the same settings or a new --checkpoint-dir")
    return info.world_size != world_size or any(saved.get(k) != want.get(k) for k in layout)


def layout_changes(info: CheckpointInfo, world_size: int, run: Mapping[str, Any], layout_keys: Iterable[str],
                   upgrade=None) -> list[str]:
    """What a resharded resume changes, for a trainer's ``resharded:`` line: "world size" when it differs, then
    each layout entry of the identity that differs (``ep_size``, ``r_fwd``, ...)."""
    saved = _jsonable(upgrade(dict(info.run)) if upgrade is not None else info.run)
    want = _jsonable(dict(run))
    out = ["world size"] if info.world_size != world_size else []
    return out + [k for k in layout_keys if saved.get(k) != want.get(k)]


def saved_entries(info: CheckpointInfo) -> dict:
    """The flat DCP keys of a save (``rank3/model.model.blocks.0.moe.w1``, ...) with their storage metadata
    (a tensor's size and dtype, or a pickled value's), read from the save's DCP metadata file."""
    import torch.distributed.checkpoint as dcp

    try:
        return dict(dcp.FileSystemReader(str(info.path)).read_metadata().state_dict_metadata)
    except Exception as err:  # noqa: BLE001 - OSError, EOFError, UnpicklingError, ... of a damaged file: one line
        why = " ".join(str(err).split())[:200]
        raise InputError(info.path, f"cannot read this save's metadata ({type(err).__name__}: {why}); resume "
                                    f"another with --load-step or start in a new --checkpoint-dir") from None


def _check_saved_ranks(info: CheckpointInfo, saved: Mapping[str, Any]) -> None:
    """Every rank of a save stores its entries under ``rank<r>/``: the ranks found are 0 .. world_size - 1 (a
    metadata file edited to world_size 10**9 made train_lora's resharder list a billion keys: 14 GB and a hang)."""
    ranks = set()
    for key in saved:
        head = key.split("/", 1)[0]
        if head.startswith("rank") and head[4:].isascii() and head[4:].isdigit():
            ranks.add(int(head[4:]))
    if ranks and (min(ranks) != 0 or max(ranks) != info.world_size - 1 or len(ranks) != info.world_size):
        raise InputError(info.path / META_NAME, f"world_size {info.world_size}, but the save holds the entries of "
                                                f"{len(ranks)} rank(s) ({min(ranks)} .. {max(ranks)}): not this "
                                                f"save's metadata; resume another with --load-step or start in a "
                                                f"new --checkpoint-dir")


def load_templates(saved: Mapping[str, Any], keys: Iterable[str]) -> dict:
    """What :func:`torch.distributed.checkpoint.load` fills for the given keys of a save: an empty tensor of the
    saved size and dtype per tensor, None per pickled value."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for k in keys:
        m = saved[k]
        out[k] = (torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None)
    return out


#: state entries added to a stateful object after saves of it exist: a save without them still loads (dcp.load
#: wants every key of the object's state_dict in the save; "group_lrs_at_save" of our LR schedulers, 2026-11-30;
#: "router_k_sums", train_moe's router statistics in its progress Values, 2026-11-30 - a Values entry the save
#: lacks keeps the value it was built with)
OPTIONAL_STATE_KEYS = ("group_lrs_at_save", "router_k_sums")


class _StateWithout:
    """``obj`` as DCP sees it, without the state entries named ``drop`` (at any depth of its state dict)."""

    def __init__(self, obj: Any, drop: set[str]):
        self.obj, self.drop = obj, drop

    def _strip(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._strip(v) for k, v in value.items() if k not in self.drop}
        if isinstance(value, list):
            return [self._strip(v) for v in value]
        return value

    def state_dict(self) -> dict:
        return self._strip(self.obj.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.obj.load_state_dict(state)


def _without_absent_optional_keys(value: Any, key: str, saved: Mapping[str, Any]) -> Any:
    """``value`` itself, or a view of it without the :data:`OPTIONAL_STATE_KEYS` that the save lacks under
    ``key`` (a save written before they existed)."""
    import torch

    if not isinstance(value, (torch.optim.lr_scheduler.LRScheduler, Values)):
        return value
    absent = {name for name in OPTIONAL_STATE_KEYS
              if not any(k.startswith(key + ".") and name in k[len(key) + 1:].split(".") for k in saved)}
    return _StateWithout(value, absent) if absent else value


def _values_template_error(key: str, values: "Values", saved: Mapping[str, Any]) -> str | None:
    """DCP loads only the entries (and in the shapes and dtypes) of the resuming run's objects: a Values dict of
    tensors whose keys grew during the run came back without the new keys, without a word, and a tensor replaced by
    one of another dtype came back rounded to the first one's. What to refuse, in one line naming the entry (None:
    nothing). A saved top-level entry the run no longer has is left behind, as before."""
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = values.state_dict()
    flat, _ = flatten_state_dict({key: state})
    name = key.split("/", 1)[-1]
    extra = sorted(k for k in saved if k.startswith(key + ".") and k not in flat
                   and k[len(key) + 1:].split(".", 1)[0] in state)
    if extra:
        return (f"{extra[0].split('/', 1)[-1]} is in the save but not in this run's Values {name!r} (a dict or list "
                "of tensors that grew during the run: build the Values with all of it, or keep tensors out of a "
                "dict to have it saved whole)")
    for k, v in flat.items():
        m = saved.get(k)
        if isinstance(v, torch.Tensor) and isinstance(m, TensorStorageMetadata) and (
                tuple(v.shape) != tuple(m.size) or v.dtype != m.properties.dtype):
            return (f"{k.split('/', 1)[-1]} was saved as {m.properties.dtype} {list(m.size)}, this run's Values "
                    f"{name!r} holds {v.dtype} {list(v.shape)} (a Values tensor is loaded in place: build it with the "
                    "shape and dtype it is saved with)")
    return None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class Values:
    """Plain values (step counters, a data cursor) as a stateful object: ``v = Values(step=0)``; ``v["step"]``."""

    def __init__(self, **values: Any):
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._values[key] = value

    def state_dict(self) -> dict:
        # a dict without tensors goes as one pickled value: DCP flattens dicts into one key per entry and loads only
        # the entries the resuming run's (template) dict has, so a dict whose keys grow during the run came back
        # empty or stale, or failed with "Missing key"
        return {k: pickle.dumps(v) if isinstance(v, dict) and not _holds_tensor(v) else v
                for k, v in self._values.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self._values) - set(state) - set(OPTIONAL_STATE_KEYS)
        if missing:
            raise KeyError(f"checkpoint lacks values {sorted(missing)}")
        for k, v in state.items():
            self._values[k] = pickle.loads(v) if isinstance(self._values.get(k), dict) and isinstance(v, bytes) else v


class RNGState:
    """The generators a run draws from: torch's CPU generator, every CUDA device's (when CUDA is up), Python's
    ``random``, and any extra ``torch.Generator`` passed by name (e.g. a data sampler's)."""

    def __init__(self, **generators: Any):
        self.generators = generators
        self.other_devices = False
        """Set by a resharded resume: a save from a process that saw another number of CUDA devices restores the
        generators of the devices both have (else that is a ValueError)."""

    def state_dict(self) -> dict:
        import torch

        # "cuda" is always a key and a plain (pickled) value, never a tensor: DCP loads a non-tensor value whatever
        # the template holds, while a tensor entry present on one side only (CUDA initialised when saving but not
        # yet when resuming, or the reverse) is silently skipped or a "Missing key" error, and a tensor's shape
        # would tie the save to the device count
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = [bytes(s.cpu().numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
        state = {"torch": torch.get_rng_state(), "python": list(_py_state_flat(random.getstate())), "cuda": cuda}
        for name, g in self.generators.items():
            state[f"gen.{name}"] = g.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        import torch

        torch.set_rng_state(state["torch"])
        random.setstate(_py_state_unflat(state["python"]))
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():  # None: saved before CUDA drew (nothing to restore)
            states = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in cuda]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
            elif self.other_devices:
                for i in range(min(len(states), torch.cuda.device_count())):
                    torch.cuda.set_rng_state(states[i], device=i)
            else:
                raise ValueError(f"checkpoint holds the CUDA generators of {len(cuda)} devices, this process sees "
                                 f"{torch.cuda.device_count()}")
        for name, g in self.generators.items():
            g.set_state(state[f"gen.{name}"])


def _holds_tensor(obj: Any) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v) for v in obj)
    return False


def _py_state_flat(st: tuple) -> list:
    version, internal, gauss = st
    return [version, *internal, gauss]


def _py_state_unflat(flat: list) -> tuple:
    return (flat[0], tuple(flat[1:-1]), flat[-1])


class ModelState:
    """A model and its optimizers, through ``torch.distributed.checkpoint.state_dict`` (which creates the
    optimizers' state before a load, so a fresh optimizer can take a saved Adam state).

    That creation is an ``optimizer.step()`` at lr 0 with zero gradients: it runs with the optimizers' step hooks
    suspended (a GradNormRecorder attached before the resume logged a row of norm 0). A parameter the save has no
    optimizer state for (no gradient before the save: an unused head or expert) is left out of what is loaded and
    starts without state, as it would have in the run that saved (its created state made the load fail with
    "Missing key" - the save could not be resumed)."""

    def __init__(self, model, optimizers: Iterable = ()):
        self.model = model
        self.optimizers = list(optimizers)
        self._saved: set[str] | None = None   # the save's keys below this entry, while a resume builds its template
        self._fresh: list[str] = []           # parameters the save holds no optimizer state for

    def expect_save(self, saved_keys: Iterable[str]) -> None:
        """Before a load: the save's DCP keys of this entry, relative to it (``optim.state.<fqn>.step``, ...)."""
        self._saved = set(saved_keys)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if not self.optimizers:
            return {"model": get_model_state_dict(self.model)}
        with _step_hooks_suspended(self.optimizers):
            model_sd, optim_sd = get_state_dict(self.model, self.optimizers)
        if self._saved is not None:
            states = optim_sd.get("state", {})
            held = sorted(k[len("optim.state."):] for k in self._saved if k.startswith("optim.state."))

            def saved_for(fqn: str) -> bool:  # any saved key below optim.state.<fqn>. (sorted: a prefix search)
                i = bisect.bisect_left(held, fqn + ".")
                return i < len(held) and held[i].startswith(fqn + ".")

            self._fresh = [fqn for fqn in states if not saved_for(fqn)]
            for fqn in self._fresh:
                del states[fqn]
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if not self.optimizers:
            set_model_state_dict(self.model, state["model"])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions

            # not strict only when parameters are left out of the optimizer state on purpose (the model's entries
            # are complete either way: DCP filled every key of the template built from this model)
            # (the optimizer's state is replaced as a whole: the left-out parameters start without state)
            set_state_dict(self.model, self.optimizers, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=StateDictOptions(strict=not self._fresh))
        self._saved, self._fresh = None, []


@contextmanager
def _step_hooks_suspended(optimizers):
    """The optimizers' own step pre/post hooks removed for the duration (DCP may step them to create state)."""
    kept = []
    for opt in optimizers:
        pre, post = getattr(opt, "_optimizer_step_pre_hooks", None), getattr(opt, "_optimizer_step_post_hooks", None)
        kept.append((opt, pre, post))
        if pre is not None:
            opt._optimizer_step_pre_hooks = type(pre)()
        if post is not None:
            opt._optimizer_step_post_hooks = type(post)()
    try:
        yield
    finally:
        for opt, pre, post in kept:
            if pre is not None:
                opt._optimizer_step_pre_hooks = pre
            if post is not None:
                opt._optimizer_step_post_hooks = post


@contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes the intent' of one process when no process group exists: here it is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class _FolderLock:
    """This process's exclusive ``flock`` on a checkpoint folder's :data:`LOCK_NAME` file, shared by the
    Checkpointers of the process that use the folder (counted; the last one released closes it)."""

    _held: dict[str, list] = {}  # real path of the folder -> [file descriptor, users]
    _mutex = threading.Lock()

    @classmethod
    def acquire(cls, folder: Path) -> str:
        """Take (or share) the lock; the key to :meth:`release` it with. InputError naming the folder when another
        process holds it, or when the folder or its lock file cannot be created."""
        try:
            import fcntl  # noqa: F401 - (used by _flock_briefly; here: whether this platform has flock)
        except ImportError:  # (no flock on this platform: runs are not kept apart)
            return ""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            key = os.path.realpath(folder)
        except OSError as err:
            raise InputError("--checkpoint-dir", f"{folder}: {err.strerror or err}") from None
        with cls._mutex:
            held = cls._held.get(key)
            if held is not None:
                held[1] += 1
                return key
            path = Path(key) / LOCK_NAME
            try:  # (for writing: NFS emulates flock with a POSIX lock, which an exclusive lock needs a writable
                # descriptor for - EBADF on a read-only one; opening does not touch the file's times)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:  # (another user's lock file in a shared folder: local flock needs no write)
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as err:
                    raise InputError(folder, f"cannot open its lock file {LOCK_NAME}: {err.strerror or err}") from None
            except OSError as err:
                raise InputError(folder, f"cannot create its lock file {LOCK_NAME}: {err.strerror or err}") from None
            try:
                _flock_briefly(fd)
            except OSError as err:
                holder = _lock_holder(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _held_elsewhere(folder, holder) from None
                # a file system that cannot lock (NFSv3 without lockd: ENOLCK; Lustre without -o flock: ENOSYS; a
                # read-only descriptor on NFS: EBADF): the run goes on, as before the lock existed, and says so
                print(f"note: {folder}: cannot lock {LOCK_NAME} on this file system ({err.strerror or err}); two "
                      f"runs started on this folder at once are not kept apart", file=sys.stderr, flush=True)
                return ""
            cls._held[key] = [fd, 1]  # (nothing is written in it: a refused run leaves the folder as it was)
            return key

    @classmethod
    def release(cls, key: str) -> None:
        if not key:
            return
        with cls._mutex:
            held = cls._held.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] <= 0:
                del cls._held[key]
                os.close(held[0])  # (closing the last descriptor releases the flock)


def _held_elsewhere(folder: Path, holder: str) -> InputError:
    """The refusal of a checkpoint folder another process holds (``holder``: :func:`_lock_holder`'s ' by pid N')."""
    return InputError(folder, f"another run is using this checkpoint folder ({LOCK_NAME} is locked{holder}); wait "
                              f"for it to end or give a new --checkpoint-dir")


#: seconds rank 0 keeps trying for the folder's lock before it names the holder: a launch pre-check
#: (:func:`check_folder_free`) holds it shared for an instant, and the first run's rank 0 was refused by it
LOCK_RETRY_S = 0.5


def _flock_briefly(fd: int) -> None:
    """An exclusive ``flock`` on ``fd``, tried for :data:`LOCK_RETRY_S`; the last OSError when it stays held."""
    import fcntl

    deadline = time.monotonic() + LOCK_RETRY_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                raise
        time.sleep(0.02)


def check_folder_free(folder: str | os.PathLike) -> None:
    """A launcher's pre-check (one process, before torchrun): InputError, in the words of the ranks' own lock, when
    another process holds ``folder``'s lock - the ranks found it only inside torchrun, whose failure report followed
    the one line. A shared lock taken and dropped at once: it creates nothing (no folder, no lock file), two
    pre-checks do not trip over each other, and a run's rank 0 locking meanwhile retries past it
    (:data:`LOCK_RETRY_S`). A run that starts between this check and its ranks' lock is still refused by the
    ranks."""
    try:
        import fcntl
    except ImportError:
        return
    key = os.path.realpath(folder)
    if key in _FolderLock._held:  # (this process holds it)
        return
    try:
        fd = os.open(Path(key) / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file (a new folder, or one no run has locked): nothing holds it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _held_elsewhere(Path(folder), _lock_holder(fd)) from None
            # (a file system that cannot lock: the ranks say so)
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> str:
    """' by pid N' of the process holding the flock on ``fd``'s file, from Linux's /proc/locks ('' elsewhere, or
    when the holder is on another node of a shared file system)."""
    try:
        st = os.fstat(fd)
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as locks:
            for line in locks:  # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234567 0 EOF"
                words = line.split()
                if len(words) > 5 and words[1] == "FLOCK" and words[5] == want and words[4].isdigit():
                    return f" by pid {words[4]}"
    except OSError:
        pass
    return ""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def agree_on_save(folder: str | os.PathLike, info: CheckpointInfo | None) -> None:
    """In a process group: every rank's view of the save to resume from (``find_checkpoint``'s) must be the same;
    an InputError on every rank otherwise. Each rank reads its own file system: on nodes without a shared one they
    can differ, and the collectives that follow (which depend on the save) would pair up wrongly or hang."""
    dist = _dist()
    if dist is None:
        return
    seen: list = [None] * dist.get_world_size()
    mine = None if info is None else (info.step, info.world_size, json.dumps(info.run, sort_keys=True))
    dist.all_gather_object(seen, mine)  # (the metadata too: it decides which collectives follow)
    if len(set(seen)) > 1:
        steps = [None if s is None else s[0] for s in seen]
        raise InputError(folder, "the ranks see different saves there (" + ", ".join(
            f"rank {r}: {'none' if s is None else f'step {s}'}" for r, s in enumerate(steps))
            + (", with different metadata" if len(set(steps)) == 1 else "")
            + "); --checkpoint-dir must be one folder every rank shares")


class Checkpointer:
    """Saves and resumes one run's state. ``run`` names what identifies the run (plan digest, model shape, seed,
    ...); a save from another run is refused, and so is one of another world size unless the trainer can reshard:
    ``layout_keys`` (the entries of ``run`` that only lay the work out over the ranks) and, for every state entry,
    how a rank of another layout loads it: ``replicated`` (every rank holds it alike - a data-parallel model,
    counters, generators seeded alike: rank 0's copy), ``own_rank`` (the same rank's copy where the save has that
    rank, else the fresh value is kept: per-rank data generators) or ``resharders[name]``, a function
    ``(info, saved) -> (templates, finish)`` given the save's DCP metadata (:func:`saved_entries`) that returns the
    flat DCP keys it wants loaded (:func:`load_templates`) and a function called with them once loaded (expert-
    parallel weights re-cut for the new layout). :attr:`resharded_from` then names the save; a state entry with
    none of the three is refused (ValueError). ``upgrade``, ``reshardable``: as :func:`check_resumable`'s. Under
    torch.distributed every rank calls :meth:`resume`, :meth:`save` and :meth:`finish` with the same step (they are
    collective; with ``async_save``
    the constructor is too: it creates the saves' own gloo group, with ``timeout_s``); without it, one process.
    On an error path call :meth:`close` before destroying the process groups (it waits, locally, for a save in
    flight)."""

    def __init__(self, config: CheckpointConfig, *, run: Mapping[str, Any], timeout_s: float = 600.0,
                 layout_keys: Iterable[str] = (), replicated: Iterable[str] = (), own_rank: Iterable[str] = (),
                 resharders: Mapping[str, Any] | None = None, upgrade=None, reshardable: bool = False):
        from datetime import timedelta

        self.config = config
        self.run = _jsonable(dict(run))
        self.layout_keys = tuple(layout_keys)
        self.replicated = frozenset(replicated)
        self.own_rank = frozenset(own_rank)
        self.resharders = dict(resharders or {})
        self.upgrade = upgrade
        self.reshardable = reshardable
        self.resharded_from: CheckpointInfo | None = None
        dist = _dist()
        self.rank = dist.get_rank() if dist else 0
        self.world_size = dist.get_world_size() if dist else 1
        self.last_saved: int | None = None
        self.timeout_s = float(timeout_s)
        self._pending: _Pending | None = None
        self._lock: weakref.finalize | None = None  # rank 0's hold on the folder's lock (resume or save takes it)
        self._lock_checked = False  # (every rank alike: resume and save are collective)
        # async saves coordinate the ranks from a background thread: on a group of their own, never interleaved
        # with the training's collectives on the default group (and gloo, as DCP's async path needs a CPU backend)
        self._group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
                       if dist is not None and config.async_save else None)

    def _keyed(self, state: Mapping[str, Any]) -> dict:
        return {f"rank{self.rank}/{name}": value for name, value in state.items()}

    def resume(self, state: Mapping[str, Any]) -> int:
        """Load the save to resume from into ``state``'s objects (in place); the step it was taken at, 0 when the
        folder holds none."""
        import torch.distributed.checkpoint as dcp

        # (first without the lock: a --load-step that was not saved, or a folder that is a save, is refused before
        # the lock creates the folder - a refused resume left a new folder with its lock file)
        find_checkpoint(self.config.folder, self.config.load_step)
        self._take_lock()
        info = find_checkpoint(self.config.folder, self.config.load_step)  # (now that no other run changes it)
        agree_on_save(self.config.folder, info)
        if info is None:
            return 0
        saved = self._read_saved_entries(info)  # a damaged .metadata: one line here, not DCP's tracebacks
        _check_saved_ranks(info, saved)
        keyed, finishers = self._keyed(state), []
        if check_resumable(info, self.world_size, self.run, self.layout_keys, self.upgrade, self.reshardable):
            per_rank = sorted(set(state) - self.replicated - self.own_rank - set(self.resharders))
            if per_rank:  # a programming error of the trainer, not bad input
                raise ValueError(f"cannot reshard the save {info.path}: state entries {per_rank} are per-rank "
                                 f"(neither replicated, own_rank nor resharded)")
            keyed = {f"rank0/{name}": value for name, value in state.items() if name in self.replicated}
            own = self.rank if self.rank < info.world_size else None  # a rank the save did not have keeps its own
            keyed.update({f"rank{own}/{name}": value for name, value in state.items()
                          if name in self.own_rank and own is not None})
            for value in state.values():
                if isinstance(value, RNGState):  # another machine may see another number of GPUs
                    value.other_devices = True
            for name, reshard in self.resharders.items():
                if name in state:
                    templates, finish = reshard(info, saved)
                    keyed.update(templates)
                    finishers.append((finish, templates))
            self.resharded_from = info
        for key, value in keyed.items():
            if isinstance(value, ModelState):
                value.expect_save(k[len(key) + 1:] for k in saved if k.startswith(key + "."))
        # a Values template DCP would load short, refused on every rank (else the others were inside dcp.load)
        self._fail_together(info.path, next((e for key, value in keyed.items() if isinstance(value, Values)
                                             for e in [_values_template_error(key, value, saved)] if e), None))
        keyed = {key: _without_absent_optional_keys(value, key, saved) for key, value in keyed.items()}
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            with _quiet_single_process():
                dcp.load(keyed, checkpoint_id=str(info.path))
        except (CheckpointException, OSError, RuntimeError) as err:  # DCP's (every rank gets it; a BaseException)
            if (stop := interrupt_in(err)) is not None:  # Ctrl-C while loading: the interrupt, not "cannot load"
                raise stop from None
            if not isinstance(err, (CheckpointException, OSError)):
                raise
            damage = short_files(info.path)  # (DCP's error names neither the file nor, in a pickle's, the rank)
            raise InputError(info.path, f"cannot load this save ({failure_line(err)}"
                                        f"{'; ' + damage if damage else ''}); resume another with --load-step or "
                                        f"start in a new --checkpoint-dir") from None
        for finish, templates in finishers:
            finish({k: keyed[k] for k in templates})  # DCP filled the tensors in place and set the other values
        self.last_saved = info.step
        return info.step

    def _take_lock(self) -> None:
        """Rank 0 locks the folder for this run (module docstring); its error is every rank's (a collective when
        distributed: every rank calls resume)."""
        if self._lock_checked:
            return
        failed = None
        if self.rank == 0:
            try:
                _check_checkpoint_folder(Path(self.config.folder))  # (its own lines before any folder is made)
                key = _FolderLock.acquire(Path(self.config.folder))
                self._lock = weakref.finalize(self, _FolderLock.release, key)
            except InputError as err:
                failed = err
        _agree(_dist(), Path(self.config.folder), failed)
        self._lock_checked = True

    def release(self) -> None:
        """Give up this Checkpointer's share of the folder's lock now (it goes with the Checkpointer otherwise); a
        later resume or save takes it again."""
        if self._lock is not None:
            self._lock()
        self._lock, self._lock_checked = None, False

    def _fail_together(self, path, failed: str | None) -> None:
        """Raise any rank's ``failed`` (the first, naming its rank) on every rank: one rank raising alone left the
        others waiting in (or failing inside) the collectives of dcp.load."""
        dist = _dist()
        if dist is not None:
            seen = [None] * self.world_size
            dist.all_gather_object(seen, failed)
            failed = next((f"rank {r}: {f}" if self.world_size > 1 else f for r, f in enumerate(seen)
                           if f is not None), None)
        if failed is not None:
            raise InputError(path, failed)

    def _read_saved_entries(self, info: CheckpointInfo) -> dict:
        """:func:`saved_entries` on every rank; a rank that cannot read them fails all of them with one line (it
        must not leave the others waiting in dcp.load)."""
        saved, failed = {}, None
        try:
            saved = saved_entries(info)
        except InputError as err:
            failed = err.what
        self._fail_together(info.path, failed)
        return saved

    def due(self, step: int) -> bool:
        """Whether ``step`` (completed steps) is a periodic save point."""
        return self.config.interval > 0 and step > 0 and step % self.config.interval == 0

    def save(self, step: int, state: Mapping[str, Any]) -> Path | None:
        """Save ``state`` as taken after ``step`` completed steps and commit it, deleting the saves left by an
        earlier timeline: those after the step this run resumed from or last saved (a run resumed with --load-step
        from an older save), ``step``'s own included; None, nothing written, when this run already holds that
        step's save (it resumed from it or saved it). With ``async_save`` it returns once the state is staged: the
        path is the save's once committed (:meth:`finish`); a save still in flight is finished first."""
        import torch.distributed.checkpoint as dcp

        if step == self.last_saved or (self._pending is not None and self._pending.step == step):
            return None  # decided from state every rank shares, never from a file-system race
        self._take_lock()  # (a Checkpointer that saves without resuming first)
        self.finish()
        folder = Path(self.config.folder)
        final = step_folder(folder, step)
        partial = final.with_name(final.name + _PARTIAL)
        dist = _dist()
        failed = None
        if self.rank == 0:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)  # a crashed earlier save of this step
            except OSError as err:
                failed = f"cannot write a checkpoint: {err.strerror or err}"
        _agree(dist, folder, failed)  # rank 0 has cleared the way (or failed: every rank raises, none waits)
        ours = step if self.last_saved is None else min(step, self.last_saved)
        if self.config.async_save:
            if dist is None:  # DCP's writer thread warns after this returns: a process-wide filter for that one
                # message (it also silences DCP's single-process load warning for the rest of the process)
                warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            with _quiet_single_process():
                future = dcp.async_save(self._keyed(state), checkpoint_id=str(partial), process_group=self._group,
                                        no_dist=dist is None)
            # last_saved moves only once committed (finish): a failed save is not "already saved"
            self._pending = _Pending(step, future, self._commit if self.rank == 0 else None, ours)
            return final
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            with _quiet_single_process():
                dcp.save(self._keyed(state), checkpoint_id=str(partial))
        except (CheckpointException, OSError, RuntimeError) as err:  # DCP's reaches every rank (a BaseException)
            if (stop := interrupt_in(err)) is not None:  # Ctrl-C while writing: the interrupt, not a write failure
                raise stop from None  # (the .partial folder is garbage the next save clears)
            if not isinstance(err, (CheckpointException, OSError)):
                raise
            raise InputError(folder, f"cannot write the checkpoint of step {step} ({failure_line(err)})") from None
        if self.rank == 0:  # dcp.save returns on rank 0 once every rank's file is written
            failed = self._commit(step, ours)
        _agree(dist, folder, failed)  # committed for every rank when save returns
        self.last_saved = step
        return final

    def finish(self) -> None:
        """Wait for the asynchronous save in flight, if any (its files written, committed by rank 0) and raise its
        error on every rank (InputError naming the folder). Collective when a save is in flight; a no-op without
        one (every rank knows: they all called :meth:`save` alike). Call it after the run's last save."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        failed = pending.wait()
        dist = _dist()
        if dist is not None:  # every rank's outcome (DCP reports a rank's write failure on rank 0 too; this is sure)
            seen: list = [None] * self.world_size
            dist.all_gather_object(seen, failed)
            failed = next((f for f in seen if f is not None), None)
        if failed is not None:
            raise InputError(Path(self.config.folder), failed)
        self.last_saved = pending.step

    def close(self) -> str | None:
        """The end of the run (the trainers call it in ``finally``), and on error paths before the process groups
        go: wait (locally, no collective, at most ``timeout_s``) for the save in flight so that its writer and rank
        0's commit can finish with the peers that are still there, then give up the folder's lock (:meth:`release`);
        returns the save's error line (None: committed, or nothing was in flight), never raises."""
        pending, self._pending = self._pending, None
        failed = None
        if pending is not None:
            failed = pending.wait(self.timeout_s)
            if failed is None:
                self.last_saved = pending.step
        if pending is None or not (pending.thread is not None and pending.thread.is_alive()):
            self.release()
        else:  # (rank 0's commit thread may still write: the lock stays with it, dropped at the process's end;
            # every rank forgets it was checked alike, or a later save's lock broadcast pairs up wrongly)
            self._lock, self._lock_checked = None, False
        return failed

    def _commit(self, step: int, ours: int) -> str | None:
        """Rank 0, once every rank's file of ``step`` is written: write the metadata into the ``.partial`` folder,
        delete the other timeline's saves (after ``ours``), rename, prune. Returns an error line, None when
        committed."""
        folder = Path(self.config.folder)
        final = step_folder(folder, step)
        partial = final.with_name(final.name + _PARTIAL)
        try:
            atomic_write_json(partial / META_NAME, {
                "format": FORMAT, "step": step, "world_size": self.world_size, "run": self.run,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            # saves after the step this run resumed from or last saved belong to an older timeline (this run
            # resumed from an earlier step): they go before the commit, so that neither "newest" nor the keep-K
            # count picks them over this run's saves (pruning by step number would delete this run's and keep
            # theirs)
            for later in committed_steps(folder):
                if later > ours:
                    _discard(step_folder(folder, later))
            if final.exists():  # committed, or left half-deleted by a crash
                _discard(final)
            os.replace(partial, final)
            _fsync_dir(folder)  # the rename itself survives a power loss
        except (OSError, ValueError) as err:  # ValueError: InputError of atomic_write_json
            return f"cannot commit the checkpoint of step {step}: {getattr(err, 'strerror', None) or err}"
        try:  # committed: a save that cannot be pruned (another user's, unreadable) stays, the run goes on (it
            # reported "cannot commit" and stopped every rank, the save committed all the same)
            self._prune(folder)
        except (OSError, ValueError):
            pass
        return None

    def _prune(self, folder: Path) -> None:
        # the remains of crashed saves and deletes (``.partial`` folders, step folders without metadata): garbage
        # once this save is committed (one run writes a folder at a time), however large
        for child in folder.glob(f"{_PREFIX}*"):
            # only names of step_folder's form (zero-padded to 8 digits): torchtitan's step-100 or a user's own
            # step-N folder in the same directory was deleted for having no adasched metadata
            if not (is_save_name(child.name) and child.is_dir()) or child.is_symlink():
                continue  # not a folder this module writes
            try:
                garbage = child.name.endswith(_PARTIAL) or not (child / META_NAME).is_file()
            except OSError:  # unreadable: not known to be garbage, so not deleted
                continue
            if garbage:
                shutil.rmtree(child, ignore_errors=True)
        if self.config.keep <= 0:
            return
        for old in committed_steps(folder)[:-self.config.keep]:
            try:  # one save that cannot be deleted (another user's) must not keep the others from going
                _discard(step_folder(folder, old))
            except OSError:
                continue


class _Pending:
    """An asynchronous save in flight: DCP's future and, on rank 0, the thread that commits once it resolves."""

    def __init__(self, step: int, future, commit, ours: int):
        self.step, self.future = step, future
        # what the commit thread leaves if it ends without setting a result
        self.failed: str | None = f"the checkpoint of step {step} was not committed (its commit thread stopped)"
        self.thread = None
        if commit is not None:
            def run():
                try:
                    self.failed = self._written() or commit(step, ours)
                except BaseException as err:  # noqa: BLE001 - anything: a line for finish(), never a silent thread
                    self.failed = f"cannot commit the checkpoint of step {step} ({failure_line(err)})"

            self.thread = threading.Thread(target=run, name=f"adasched-commit-{step}", daemon=True)
            self.thread.start()

    def _written(self, timeout: float | None = None) -> str | None:
        from concurrent.futures import TimeoutError as FutureTimeout

        try:
            self.future.result(timeout=timeout)
        except FutureTimeout:
            return f"the checkpoint of step {self.step} was still being written after {timeout:g} s"
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            if (stop := interrupt_in(err)) is not None:
                raise stop from None
            return f"cannot write the checkpoint of step {self.step} ({failure_line(err)})"
        return None

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until written (and on rank 0 committed), at most ``timeout`` seconds; the error line, None on
        success."""
        if self.thread is None:
            return self._written(timeout)
        self.thread.join(timeout)
        if self.thread.is_alive():
            return f"the checkpoint of step {self.step} was still being written after {timeout:g} s"
        return self.failed


def interrupt_in(err: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or SystemExit behind a DCP failure, if any: a Ctrl-C that lands while DCP writes or
    reads surfaces as a CheckpointException (its per-rank ``failures``) or an OSError / RuntimeError whose cause or
    context is the interrupt; the caller re-raises it instead of reporting a write failure."""
    seen, todo = set(), [err]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, (KeyboardInterrupt, SystemExit)):
            return cur
        failures = getattr(cur, "failures", None)
        if isinstance(failures, dict):
            for value in failures.values():
                todo.extend(v for v in (value if isinstance(value, tuple) else (value,))
                            if isinstance(v, BaseException))
        todo.extend((cur.__cause__, cur.__context__))
    return None


def short_files(path: str | os.PathLike) -> str | None:
    """The data files of a DCP save that are missing or shorter than its metadata says (a copy cut short, a disk
    that filled up), as one phrase naming them; None when every file is long enough or the metadata is unreadable."""
    import torch.distributed.checkpoint as dcp

    try:
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
    except Exception:  # noqa: BLE001 - an unreadable metadata file is reported by its reader
        return None
    need: dict[str, int] = {}
    for info in (storage or {}).values():
        rel = getattr(info, "relative_path", None)
        if isinstance(rel, str):
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    found = []
    for rel in sorted(need):
        try:
            size = (Path(path) / rel).stat().st_size
        except OSError:
            found.append(f"{rel} is missing")
            continue
        if size < need[rel]:
            found.append(f"{rel} holds {size} of its {need[rel]} bytes")
    return ", ".join(found) or None


def failure_line(err: BaseException) -> str:
    """One line for a DCP failure: a CheckpointException (every rank's traceback) reads as its first rank's
    exception, anything else as its type and message."""
    import traceback

    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first
    return " ".join("".join(traceback.format_exception_only(type(err), err)).split())


def _discard(path: Path) -> None:
    """Delete a committed save: its metadata first (one atomic unlink un-commits it), then the rest, so that a
    crash midway leaves a folder that loading ignores, never a committed save with missing files. A save that is a
    link (a run started from an archived save linked in) loses the link only: its metadata was deleted through it,
    outside the checkpoint folder."""
    if path.is_symlink():
        path.unlink()
        return
    (path / META_NAME).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the commit stands without it
        pass
    finally:
        os.close(fd)


def _agree(dist, folder: Path, failed: str | InputError | None) -> None:
    """Rank 0's outcome to every rank (a barrier too): an error on rank 0 is raised on every rank, instead of
    rank 0 raising while the others wait in a collective until the timeout. ``failed``: an error line about
    ``folder``, or an InputError raised as it is (naming what it names)."""
    if isinstance(failed, InputError):
        failed = (failed.where, failed.what)
    if dist is not None:
        box = [failed]
        dist.broadcast_object_list(box, src=0)
        failed = box[0]
    if isinstance(failed, tuple):
        raise InputError(*failed)
    if failed is not None:
        raise InputError(folder, failed)

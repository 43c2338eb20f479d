"""Multi-job LoRA workloads: the jobs file (JSON or YAML), named length distributions and presets.

A jobs file::

    capacity: 8192          # tokens per microbatch (after padding each adapter's segment to 128)
    stages: 4               # pipeline stages S
    global_batches: 8       # global batches per job planned in this run
    seed: 0                 # draws from named distributions
    layers: 32              # transformer layers of the base model (cost model)
    jobs:
      - name: wiki
        adapter: {r: 16, alpha: 32, dropout: 0.05, target_modules: [q_proj, v_proj]}
        lengths: wikipedia  # a named distribution, a file of integers (one a line), or
                            # {dist: lognormal, median: 512, sigma: 0.5, min: 64, max: 4096}
        global_batch_size: 32
        lr: 2.0e-4

Named distributions (tokens per sample; every draw is an integer clipped to [min, max]):

- ``wikipedia``: an empirical sample of 4096 Wikipedia article lengths clipped to 4096 tokens, shipped in
  ``presets/wikipedia_lengths.json`` (mean 760, median 354, 4.2 % at the cap).
- ``xsum``: XSum-like, lognormal with median 480 and sigma 0.5 (log space), clipped to [64, 4096]
  (mean ~545). Stated stand-in, not fitted to the dataset.
- ``cnndm``: CNN/DailyMail-like, lognormal with median 850 and sigma 0.45, clipped to [128, 4096]
  (mean ~940). Stated stand-in, not fitted to the dataset.
- ``mix``: each draw picks one of the three above with equal probability.

Presets: ``mix`` (4 jobs, every job draws from ``mix``) and ``het`` (4 jobs, one distribution per job:
wikipedia, xsum, cnndm, wikipedia at r=64), capacity 8192, S=4, 8 global batches of 32 samples per job.

Bad input raises :class:`InputError` naming the file, the job and the field.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from adasched.profiler.io import InputError

from ..plan import MAX_LAYERS

__all__ = [
    "SEGMENT_ALIGN",
    "MAX_SAMPLES",
    "MAX_TOKENS",
    "MAX_STAGES",
    "MAX_RANK",
    "KNOWN_TARGET_MODULES",
    "NAMED_DISTRIBUTIONS",
    "PRESETS",
    "AdapterSpec",
    "LognormalSpec",
    "JobSpec",
    "JobsFile",
    "Workload",
    "JobSamples",
    "load_jobs",
    "parse_jobs",
    "preset_jobs",
    "build_workload",
]

MAX_SAMPLES = 1_000_000
"""Most samples one plan covers (all jobs: global_batch_size x global_batches each)."""

MAX_TOKENS = 2 ** 25
"""Most tokens a sample length or a microbatch's capacity may be (lengths.max 10**400 overflowed numpy's clip).
2**40 before: at ~1e10-token capacities CBC's tolerances made the packing MILP claim 'optimal' for 4 bins where
3 fit; 2**30 until 2026-12-03: near 2**29 its smallest-bin MILP claimed 'optimal' 24 % above the minimum and a
feasible model 'infeasible' (2 + 2 of 3,500 random problems; none at ~1e6 or ~3e7 tokens). 33.5 M tokens per
microbatch is far beyond any GPU's."""

MAX_STAGES = 64
"""Most pipeline stages S (the simulation grows with S^2 - no-op slots on every stage; 1024 was accepted and ran
for hours)."""

MAX_RANK = 2 ** 16
"""Largest LoRA rank r (10**400 was planned, and train_lora then failed building the adapters)."""

SEGMENT_ALIGN = 128
"""Each adapter's segment in a microbatch is padded to a multiple of this many tokens (the kernel's M tile)."""

KNOWN_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers of a Llama-style block (and of adasched.runtime.lora_model.TinyCausalLM); 'all-linear' = all."""

NAMED_DISTRIBUTIONS = ("wikipedia", "xsum", "cnndm", "mix")


class _Strict(BaseModel):
    # strict: a bool is not an int (``r: true`` is an error, not rank 1), a float is not an int, a string is not
    # a number; an int is still accepted where a float is expected
    model_config = ConfigDict(extra="forbid", strict=True)


class AdapterSpec(_Strict):
    r: int = Field(le=MAX_RANK, description=f"LoRA rank (1..{MAX_RANK})")
    alpha: float = Field(default=16.0, gt=0, allow_inf_nan=False,
                         description="LoRA alpha; scale = alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout probability")
    target_modules: Union[list[str], Literal["all-linear"]] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False

    @field_validator("r")
    @classmethod
    def _r(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be >= 1, got {v}")
        return v

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets_shape(cls, v):
        if isinstance(v, str) and v != "all-linear":
            raise ValueError(f"must be a list of module names or 'all-linear', got {v!r}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if v == "all-linear":
            return v
        if not v:
            raise ValueError("must name at least one module")
        for m in v:
            if m not in KNOWN_TARGET_MODULES:
                raise ValueError(f"unknown module {m!r} (known: {', '.join(KNOWN_TARGET_MODULES)}, or 'all-linear')")
        if len(set(v)) != len(v):
            raise ValueError("lists a module twice")
        return v

    @property
    def modules(self) -> tuple[str, ...]:
        return KNOWN_TARGET_MODULES if self.target_modules == "all-linear" else tuple(self.target_modules)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LognormalSpec(_Strict):
    dist: Literal["lognormal"]
    median: float = Field(gt=0, allow_inf_nan=False, description="tokens")
    sigma: float = Field(gt=0, allow_inf_nan=False, description="standard deviation of log(length)")
    min: int = Field(default=1, ge=1, le=MAX_TOKENS)
    max: int = Field(default=4096, ge=1, le=MAX_TOKENS)


#: files the trainer writes beside the per-job folders OUT/<name>/ (a job named so trained, then failed to save)
TRAINER_FILES = ("plan.json", "losses.json")


def _not_a_folder_reference(v: str) -> str:
    if v in (".", ".."):  # the trainer saves the adapter under OUT/<name>/
        raise ValueError(f"{v!r} names a folder, not a job")
    if v in TRAINER_FILES:
        raise ValueError(f"{v!r} is the name of a file the trainer writes beside the adapters (OUT/{v})")
    return v


#: a job's name (jobs file and LoRA plan): the trainer saves its adapter under OUT/<name>/, so no "../x", "." or ".."
#: a job's name is a folder name where train_lora saves its adapter (a 300-character one planned, and the trainer then
#: failed with 'File name too long' beside a half-written output folder)
MAX_JOB_NAME = 128
JobName = Annotated[str, Field(min_length=1, max_length=MAX_JOB_NAME, pattern=r"^[A-Za-z0-9_.-]+$"),
                    AfterValidator(_not_a_folder_reference)]


class JobSpec(_Strict):
    name: JobName
    adapter: AdapterSpec
    lengths: Union[str, LognormalSpec] = Field(description="named distribution, a file path, or a lognormal spec")
    global_batch_size: int = Field(ge=1, description="samples per global batch (optimizer step)")
    lr: float = Field(default=2e-4, gt=0, allow_inf_nan=False)

    @field_validator("lengths", mode="before")
    @classmethod
    def _lengths(cls, v):
        if isinstance(v, dict):
            try:
                return LognormalSpec.model_validate(v)
            except ValidationError as err:
                from adasched.profiler.io import describe_validation_error

                raise ValueError(describe_validation_error(err)) from None
        if not isinstance(v, str) or not v:
            raise ValueError(f"must be a named distribution ({', '.join(NAMED_DISTRIBUTIONS)}), a length file path "
                             f"or {{dist: lognormal, median, sigma, min, max}}, got {v!r}")
        return v


class JobsFile(_Strict):
    capacity: int = Field(default=8192, ge=SEGMENT_ALIGN, le=MAX_TOKENS,
                          description="tokens per microbatch, after segment padding")
    stages: int = Field(default=4, ge=1, le=MAX_STAGES, description="pipeline stages S (a billion hung the simulator)")
    global_batches: int = Field(default=8, ge=1, description="global batches per job planned in this run")
    seed: int = Field(default=0, ge=0, description="numpy's generators take seeds >= 0")
    layers: int = Field(default=32, ge=1, le=MAX_LAYERS,
                        description="transformer layers of the base model (cost model)")
    jobs: list[JobSpec] = Field(min_length=1)


@dataclass(frozen=True)
class JobSamples:
    """One job's drawn sample lengths, split into its global batches (sample ids are global over the run)."""

    index: int
    spec: JobSpec
    batches: tuple[tuple[int, ...], ...]
    """batches[g] = sample ids of global batch g."""


@dataclass(frozen=True)
class Workload:
    config: JobsFile
    jobs: tuple[JobSamples, ...]
    lengths: tuple[int, ...]
    """lengths[sample_id] in tokens."""
    source: str
    notes: tuple[str, ...] = ()
    """What the workload differs by from the jobs file (a length file holding fewer global batches)."""

    @property
    def adapter_of(self) -> tuple[int, ...]:
        out = [0] * len(self.lengths)
        for j in self.jobs:
            for b in j.batches:
                for s in b:
                    out[s] = j.index
        return tuple(out)


# ---- distributions ------------------------------------------------------------------------------
_PARAMETRIC = {
    "xsum": LognormalSpec(dist="lognormal", median=480, sigma=0.5, min=64, max=4096),
    "cnndm": LognormalSpec(dist="lognormal", median=850, sigma=0.45, min=128, max=4096),
}


@lru_cache(maxsize=1)
def wikipedia_lengths() -> tuple[int, ...]:
    data = json.loads(resources.files("adasched.planner.lorafusion").joinpath("presets/wikipedia_lengths.json").read_text())
    return tuple(int(x) for x in data["lengths"])


def _draw_lognormal(spec: LognormalSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.lognormal(mean=math.log(spec.median), sigma=spec.sigma, size=n)
    return np.clip(np.rint(x), spec.min, spec.max).astype(np.int64)


def _draw_named(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if name == "wikipedia":
        pool = np.asarray(wikipedia_lengths(), dtype=np.int64)
        return pool[rng.integers(0, len(pool), size=n)]
    if name in _PARAMETRIC:
        return _draw_lognormal(_PARAMETRIC[name], n, rng)
    if name == "mix":
        which = rng.integers(0, 3, size=n)
        parts = {k: _draw_named(k, n, rng) for k in ("wikipedia", "xsum", "cnndm")}
        return np.choose(which, [parts["wikipedia"], parts["xsum"], parts["cnndm"]])
    raise AssertionError(name)


_DECIMAL = re.compile(r"[+-]?[0-9]+")


def _read_length_file(path: Path, where: str) -> tuple[list[int], list[int]]:
    """(lengths, the line number of each) of a length file: one integer per line, comments and blank lines
    skipped."""
    try:
        exists, regular = path.exists(), path.is_file()
    except OSError as err:  # a name too long (exists() raises ENAMETOOLONG): the job and field, not just the path
        raise InputError(where, f"length file {str(path)[:80]!r}: {err.strerror or err}") from None
    if not exists:
        raise InputError(where, f"no such length file {str(path)!r} (and not a named distribution: "
                                f"{', '.join(NAMED_DISTRIBUTIONS)})")
    if not regular:
        raise InputError(where, f"length file {str(path)!r} is a directory or not a regular file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not data
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(where, f"cannot read length file {str(path)!r}: {err}") from None
    out, numbers = [], []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not _DECIMAL.fullmatch(line):  # (int() also read '1_000' and Arabic-Indic digits)
            raise InputError(where, f"length file {str(path)!r} line {i}: {line[:30]!r} is not an integer")
        # (int() refuses 4,300+ digits: a longer number is "too large" below, or negative, by its sign)
        digits = line.lstrip("+-").lstrip("0")
        v = int(line) if len(digits) <= 30 else (-1 if line.startswith("-") else 1) * (MAX_TOKENS + 1)
        if v <= 0:
            raise InputError(where, f"length file {str(path)!r} line {i}: length must be >= 1, got {v}")
        out.append(v)
        numbers.append(i)
    if not out:
        raise InputError(where, f"length file {str(path)!r} is empty")
    return out, numbers


# ---- loading ------------------------------------------------------------------------------------
def _read_text_config(path: Path) -> Any:
    from adasched.profiler.io import read_text

    text = read_text(path, expected="a jobs file (JSON or YAML)",
                     missing="no such file (and not a preset: " + ", ".join(PRESETS) + ")")
    if path.suffix.lower() == ".json":
        from adasched.profiler.io import parse_json_text

        return parse_json_text(text, path)
    import yaml

    from adasched.profiler.io import load_yaml, yaml_error_text

    try:
        return load_yaml(text)
    except yaml.YAMLError as err:
        raise InputError(path, yaml_error_text(err)) from None


def parse_jobs(data: Any, where: str = "jobs") -> JobsFile:
    """Validate a jobs mapping; the first problem becomes one InputError naming the job and the field."""
    if not isinstance(data, dict):
        raise InputError(where, f"expected a mapping with 'jobs', got {type(data).__name__}")
    if isinstance(data.get("kind"), str) and "schema_version" in data:  # a jobs file has neither key
        raise InputError(where, f"is an adasched {data['kind']!r} file, not a jobs file (a LoRA plan is read by "
                                "train_lora --plan)")
    try:
        cfg = JobsFile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = list(first.get("loc", ()))
        msg = first.get("msg", "invalid").removeprefix("Value error, ")
        if len(loc) >= 2 and loc[0] == "jobs" and isinstance(loc[1], int):
            raw_jobs = data.get("jobs") or []
            name = raw_jobs[loc[1]].get("name") if loc[1] < len(raw_jobs) and isinstance(raw_jobs[loc[1]], dict) else None
            job = f"job {name!r}" if isinstance(name, str) and name else f"jobs[{loc[1]}]"
            field = ".".join(str(p) for p in loc[2:] if not (isinstance(p, str) and p in ("str", "LognormalSpec", "list[str]", "literal['all-linear']"))) or "<job>"
            raise InputError(where, f"{job}: {field}: {msg}") from None
        field = ".".join(str(p) for p in loc) or "<root>"
        raise InputError(where, f"{field}: {msg}") from None
    if cfg.stages > cfg.layers:  # was planned with a fraction of a layer per stage
        raise InputError(where, f"stages: {cfg.stages} pipeline stages but layers {cfg.layers}: every stage needs at "
                                f"least one layer")
    seen: dict[str, int] = {}
    for i, job in enumerate(cfg.jobs):
        if job.name in seen:
            raise InputError(where, f"job {job.name!r}: name: used twice (jobs[{seen[job.name]}] and jobs[{i}])")
        seen[job.name] = i
    return cfg


def preset_jobs(name: str) -> JobsFile:
    if name not in PRESETS:
        raise InputError("--jobs", f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return parse_jobs(_preset_data(name), where=f"preset {name}")


def load_jobs(jobs: str | Path) -> tuple[JobsFile, Path | None, str]:
    """A preset name or a jobs file -> (validated config, base folder for relative length files, label)."""
    s = str(jobs)
    if not s.strip():  # Path("") is ".": "is a directory" named no file the user gave
        raise InputError("--jobs", f"is empty, expected a jobs file (JSON or YAML) or a preset ({', '.join(PRESETS)})")
    if s in PRESETS and not Path(s).exists():
        return preset_jobs(s), None, f"preset:{s}"
    path = Path(s)
    cfg = parse_jobs(_read_text_config(path), where=str(path))
    return cfg, path.parent, str(path)


def length_files(cfg: JobsFile, base: Path | None = None) -> list[Path]:
    """The length files a jobs config reads (relative ones resolved against ``base``, as build_workload does)."""
    out = []
    for job in cfg.jobs:
        if isinstance(job.lengths, str) and job.lengths not in NAMED_DISTRIBUTIONS:
            p = Path(job.lengths)
            out.append(base / p if not p.is_absolute() and base is not None else p)
    return out


def build_workload(cfg: JobsFile, base: Path | None = None, where: str = "jobs", label: str = "") -> Workload:
    """Draw (or read) every job's sample lengths and split them into global batches; checks capacity."""
    rng_root = np.random.default_rng(cfg.seed)
    seeds = rng_root.integers(0, 2**31 - 1, size=len(cfg.jobs))
    lengths: list[int] = []
    jobs: list[JobSamples] = []
    notes: list[str] = []
    total = 0
    files: dict[Path, tuple[list[int], list[int]]] = {}  # a length file read once, whatever the jobs that share it
    for i, job in enumerate(cfg.jobs):
        jwhere = f"{where}: job {job.name!r}: lengths"
        need = job.global_batch_size * cfg.global_batches

        def count(n: int) -> None:
            nonlocal total
            total += n
            if total > MAX_SAMPLES:  # numpy allocated (and failed on) 10**9-sample arrays
                raise InputError(where, f"job {job.name!r}: global_batch_size x global_batches: {total:,} samples "
                                        f"over the jobs so far, more than {MAX_SAMPLES:,} per plan")

        # drawn lengths are counted before drawing; a length file's after reading it: a large global_batches
        # with a short file means "the whole file" (and gives a note), not 10**6 samples
        if isinstance(job.lengths, LognormalSpec) or job.lengths in NAMED_DISTRIBUTIONS:
            count(need)
        rng = np.random.default_rng(int(seeds[i]))
        line_of = None  # a length file's line of each sample
        if isinstance(job.lengths, LognormalSpec):
            if job.lengths.min > job.lengths.max:
                raise InputError(f"{where}", f"job {job.name!r}: lengths.min {job.lengths.min} > lengths.max {job.lengths.max}")
            drawn = _draw_lognormal(job.lengths, need, rng).tolist()
        elif job.lengths in NAMED_DISTRIBUTIONS:
            drawn = _draw_named(job.lengths, need, rng).tolist()
        else:
            p = Path(job.lengths)
            if not p.is_absolute() and base is not None:
                p = base / p
            # (32 jobs on the 1M-line Wikipedia file read and checked it 32 times: 31 s before planning began)
            try:
                key = p.resolve()
            except (OSError, RuntimeError):  # (a name too long, a symlink loop: the read below says so)
                key = p
            if key not in files:
                files[key] = _read_length_file(p, jwhere)
            vals, line_of = files[key]
            if len(vals) < job.global_batch_size:
                raise InputError(jwhere, f"length file {str(p)!r} has {len(vals)} samples, fewer than "
                                         f"global_batch_size {job.global_batch_size}")
            usable = (len(vals) // job.global_batch_size) * job.global_batch_size
            drawn = vals[: min(need, usable)]
            count(len(drawn))
            if len(drawn) < need:  # was silent: the job got fewer global batches than the file asked for
                notes.append(f"job {job.name!r}: length file {str(p)!r} holds {len(vals)} samples: "
                             f"{len(drawn) // job.global_batch_size} global batch(es) of {job.global_batch_size}, "
                             f"not global_batches {cfg.global_batches}"
                             + (f" (its last {len(vals) - usable} sample(s) unused)" if len(vals) > usable else ""))
        for k, v in enumerate(drawn):
            padded = -(-int(v) // SEGMENT_ALIGN) * SEGMENT_ALIGN
            if padded > cfg.capacity:
                # (a file's sample by its line: "sample 1" was the value on line 5 after comments and blanks)
                what = (f"length file {str(p)!r} line {line_of[k]}: a sample" if line_of is not None
                        else f"sample {k}")
                raise InputError(jwhere, f"{what} has {v} tokens ({padded} padded to {SEGMENT_ALIGN}), more than "
                                         f"the microbatch capacity {cfg.capacity}")
        start = len(lengths)
        lengths.extend(int(v) for v in drawn)
        nb = len(drawn) // job.global_batch_size
        batches = tuple(
            tuple(range(start + g * job.global_batch_size, start + (g + 1) * job.global_batch_size)) for g in range(nb)
        )
        jobs.append(JobSamples(index=i, spec=job, batches=batches))
    return Workload(config=cfg, jobs=tuple(jobs), lengths=tuple(lengths), source=label or where, notes=tuple(notes))


# ---- presets ------------------------------------------------------------------------------------
PRESETS = ("mix", "het", "tiny")
"""Shipped jobs files: presets/<name>.yaml inside the package."""


def _preset_data(name: str) -> dict:
    from adasched.profiler.io import load_yaml

    return load_yaml(resources.files("adasched.planner.lorafusion").joinpath(f"presets/{name}.yaml").read_text())

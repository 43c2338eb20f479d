"""`adasched bench checkpoint`: synchronous against asynchronous saves of
:class:`~adasched.runtime.checkpoint.Checkpointer`, in one process, on this machine's disk.

The state is a stack of linear layers with ``params`` parameters in float32 and AdamW's two moments (3 x 4 bytes
per parameter, as a trainer saves it), plus RNG state and a counter. Per repeat, in alternating order (so drift
in the disk or the load falls on both alike), each mode saves a fresh step into its own folder:

- ``blocking_s``: how long ``save()`` holds the training thread (synchronous: the whole write and commit;
  asynchronous: staging the state into host memory);
- ``overlapped_s``: the save plus ``train_steps`` steps of a fixed stand-in workload (matrix products on the
  training thread), until the save is committed - synchronous: save, then the steps; asynchronous: save, the
  steps while the writer thread runs, then ``finish()``;
- ``train_s``: the same steps without any save (measured in the same repeat, before the saves), for scale.

Reported: medians over the repeats with the min and max of each, and the ratios asynchronous / synchronous of
the medians. Use an even number of repeats: the order alternates (sync first, then async first). Only this
machine's disk and cores are measured (the writer thread shares them with the stand-in steps); a GPU run stages
device memory to the host first, which is not measured here.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

__all__ = ["bench_checkpoint"]


def _state(params: int, seed: int):
    import torch

    from .checkpoint import ModelState, RNGState, Values

    torch.manual_seed(seed)
    # square layers of up to 1024 x 1024, the rest in one narrower layer: within width / 2 parameters of the
    # request (a whole number of square layers made --params-m 1.5 save 2.0 x 2**20, 2.49 -> 2.0, 3.5 -> 4.0)
    width = min(1024, max(8, int(params ** 0.5)))
    full, rest = divmod(params, width * width)
    tail = round(rest / width) if full else max(1, round(rest / width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(full)],
                                *([torch.nn.Linear(width, tail, bias=False)] if tail else []))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():                           # AdamW's moments exist (one real step)
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)                          # a trainer's save holds no gradients either
    n = sum(p.numel() for p in model.parameters())
    return n, {"model": ModelState(model, [opt]), "rng": RNGState(), "progress": Values(step=1)}


def _train_steps(n: int, size: int = 768) -> None:
    import torch

    a = torch.randn(size, size)
    for _ in range(n):
        a = torch.tanh(a @ a) * 0.5


def bench_checkpoint(params: int = 32 * 2 ** 20, repeats: int = 4, train_steps: int = 100, folder: str | None = None,
                     progress=None) -> dict:
    """Run the benchmark (module docstring); ``folder``: where to write (default a temporary folder, removed)."""
    from .checkpoint import CheckpointConfig, Checkpointer

    if params < 1 or repeats < 1 or train_steps < 0:
        raise ValueError(f"params={params}, repeats={repeats}, train_steps={train_steps}: need >= 1, >= 1, >= 0")
    root = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="adasched-ckpt-bench-"))
    n, state = _state(params, 0)
    times = {m: {"blocking_s": [], "overlapped_s": []} for m in ("sync", "async")}
    train = []
    cks = {m: Checkpointer(CheckpointConfig(folder=root / m, keep=1, async_save=m == "async"), run={"bench": m})
           for m in ("sync", "async")}
    try:
        _train_steps(2)                                    # warm-up of the stand-in and of one save per mode
        for m in ("sync", "async"):
            cks[m].save(1, state)
            cks[m].finish()
        step = 1
        for rep in range(repeats):
            t0 = time.perf_counter()
            _train_steps(train_steps)
            train.append(time.perf_counter() - t0)
            for m in (("sync", "async") if rep % 2 == 0 else ("async", "sync")):
                step += 1
                t0 = time.perf_counter()
                cks[m].save(step, state)
                t1 = time.perf_counter()
                _train_steps(train_steps)
                cks[m].finish()
                t2 = time.perf_counter()
                times[m]["blocking_s"].append(t1 - t0)
                times[m]["overlapped_s"].append(t2 - t0)
            if progress is not None:
                progress(rep + 1, repeats)
    finally:
        if folder is None:
            shutil.rmtree(root, ignore_errors=True)
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in times.items()}
    for m, d in times.items():
        for k, v in d.items():
            med[m][k.replace("_s", "_range_s")] = [min(v), max(v)]
    out = {"params": n, "state_bytes": 12 * n, "repeats": repeats, "train_steps": train_steps,
           "train_s": statistics.median(train), "sync": med["sync"], "async": med["async"],
           "blocking_ratio": med["async"]["blocking_s"] / med["sync"]["blocking_s"],
           "overlapped_ratio": med["async"]["overlapped_s"] / med["sync"]["overlapped_s"],
           "note": "medians over repeats (ranges: min, max), one process, this machine's disk; async/sync ratios "
                   "below 1 favour async"}
    return out

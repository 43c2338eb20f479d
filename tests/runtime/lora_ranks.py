"""Two gloo ranks running launch/train_lora.py's main in spawned processes, shared by the LoRA pipeline and
checkpoint tests: every rank a client of the parent's rendezvous store (runtime.dist.held_store, as under torchrun;
the port is held for the whole launch, so no other launch can be handed it)."""
from __future__ import annotations

import os

import torch.multiprocessing as mp

from adasched.runtime.dist import held_store


def rank_main(rank: int, world: int, port: int, argv: list[str], rcs) -> None:
    """One rank: the torchrun environment, then train_lora's main; its exit status into ``rcs[rank]``."""
    from adasched.launch.train_lora import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", TORCHELASTIC_USE_AGENT_STORE="True")
    rcs[rank] = main(argv)


def launch_two_ranks(argv: list[str], worker=rank_main, timeout_s: float = 120.0) -> dict:
    """Run ``worker`` (a module-level function with :func:`rank_main`'s signature) as ranks 0 and 1; every rank's
    exit status. The ranks are daemons: one still stuck when the join gives up dies with pytest."""
    ctx = mp.get_context("spawn")
    rcs = ctx.Manager().dict()
    store = held_store(2)
    procs = [ctx.Process(target=worker, args=(r, 2, store.port, argv, rcs), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    del store
    return dict(rcs)

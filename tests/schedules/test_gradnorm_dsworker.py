"""Not a test module: the 2-rank worker of test_gradnorm.py's sharded cases (run by torchrun; named test_* only to
sit beside it). Mode "fsdp2": a model under ``fully_shard`` (DTensor gradients), GradNormRecorder without a group.
Mode "zero1"/"zero2": DeepSpeed ZeRO-1/2 on gloo, the recorder on the wrapped torch optimizer with
``process_group``. Modes "zero2-groups"/"zero3-groups": two parameter groups (weight decay / none, which ZeRO
steps one at a time), the recorder on the ZeRO optimizer itself (``engine.optimizer``); "zero2-groups-inner": the
same on the torch optimizer inside, which must refuse the part-steps; "zero2-groups-clip"/"zero3-groups-clip": with
DeepSpeed's gradient_clipping below the norm (the replica clipped the same way); "zero0-capture-clip": no ZeRO,
clipping, the recorder on the torch optimizer with capture() after engine.backward. Both ranks also train a plain replica whose
gradients are all-reduced by hand (the gradient the sharded step applies) and write the recorder's rows and the replica's norms to OUT/rank{r}.json."""
from __future__ import annotations

import datetime
import json
import os
import sys


#: the "-clip" modes' gradient_clipping: below every step's norm (~0.8), so each step is clipped
CLIP = 0.1


def model_pair(torch):
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))  # noqa: E731
    m, ref = make(), make()
    ref.load_state_dict(m.state_dict())
    return m, ref


def groups_of(model) -> list[dict]:
    """Weights decayed, biases not: two parameter groups."""
    return [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": 0.1},
            {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]


def main(mode: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from adasched.schedules import GradNormRecorder

    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        m, ref = model_pair(torch)
        fully_shard(m[0])
        fully_shard(m)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        rec = GradNormRecorder(opt)

        def step(loss):
            loss.backward()
            opt.step()
            opt.zero_grad()
    else:
        import deepspeed
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # gloo all-reduce, no JIT-compiled op
        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
        m, ref = model_pair(torch)
        stage = int(mode[4])
        cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10**9,
               "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
               "gradient_clipping": CLIP if mode.endswith("-clip") else 0.0}
        params = groups_of(m) if "groups" in mode else m.parameters()
        m, dsopt, _, _ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(params, lr=1e-2), config=cfg)
        if stage == 0:  # no ZeRO: the torch optimizer itself, every rank's gradients the whole averaged ones
            assert isinstance(dsopt, torch.optim.AdamW)
            rec = GradNormRecorder(dsopt)
        elif "groups" in mode and not mode.endswith("-inner"):
            rec = GradNormRecorder(dsopt, process_group=dist.group.WORLD)
            assert rec.optimizer is dsopt.optimizer and rec.outer is dsopt
        else:
            rec = GradNormRecorder(dsopt.optimizer, process_group=dist.group.WORLD)

        def step(loss):
            m.backward(loss)
            if "capture" in mode:  # after the backward's all-reduce, before engine.step() clips
                rec.capture()
            m.step()
    rank, world = dist.get_rank(), dist.get_world_size()
    ref_opt = torch.optim.AdamW(groups_of(ref) if "groups" in mode else ref.parameters(), lr=1e-2)
    want, clipped = [], []
    if mode.endswith("-inner"):  # the torch optimizer inside sees one group per call: refused, not logged in parts
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))
        with rec.recording():
            try:
                step(m(x).pow(2).mean())
                err = None
            except RuntimeError as e:
                err = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"error": err, "rows": len(rec)}, fh)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    with rec.recording():
        for s in range(3):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * s + rank))
            step(m(x).pow(2).mean())
            ref(x).pow(2).mean().backward()
            for p in ref.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            flat = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).double()
            want.append([float(flat.norm()), float(flat.abs().sum())])  # before clipping
            if mode.endswith("-clip"):  # the step DeepSpeed takes: every gradient over max(1, (norm + 1e-6) / clip)
                f = max(1.0, (float(flat.norm()) + 1e-6) / CLIP)
                for p in ref.parameters():
                    p.grad /= f
                clipped.append(f > 1.0)
            ref_opt.step()
            ref_opt.zero_grad()
    restored = "step" not in getattr(rec.outer, "__dict__", {})  # detach gave the wrapper its own step back
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"l2": rec.l2, "l1": rec.l1, "want": want, "restored": restored, "clipped": clipped}, fh)
    dist.barrier()
    # both results are written: leave without the process-group / interpreter teardown, where rank 0 aborted now
    # and then under load ("terminate called without an active exception", SIGABRT: 2 runs of 10 failed)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

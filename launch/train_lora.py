"""Train several LoRA adapters of a tiny causal LM on CPU by executing a LoRA plan (one process, or a pipeline
over torchrun ranks with gloo).

    python -m adasched.launch.train_lora --jobs tiny --out runs/lora            # 1 process, all layers
    torchrun --nproc_per_node 2 -m adasched.launch.train_lora --jobs tiny --out runs/lora   # 2-stage 1F1B
    (launch/train_lora.sh wraps the torchrun line)

Rank 0 makes the plan (``--jobs`` file or preset; or reads ``--plan``) and broadcasts it, so every rank executes
the same microbatch sequence. Every job's adapter is saved in PEFT's format under OUT/<job name>/, the
per-global-batch losses in OUT/losses.json and the plan in OUT/plan.json, together at the end (an interrupted run
leaves OUT as the previous run left it). Bad input: `error: ...`, exit 2.

Checkpoints (``--checkpoint-dir``, ``--checkpoint-async`` to save in the background; torch.distributed.checkpoint,
one file per rank): a "step" of this trainer is
one microbatch of the plan (no-op ones included), so a run has ``len(plan.microbatches)`` steps and
``--checkpoint-every N`` saves after every N microbatches (the 1F1B pipeline drains at those points: no microbatch
is in flight in a save) and at the end; ``--load-step`` names such a microbatch count. A save holds each rank's
adapter matrices, the gradients accumulated for unfinished global batches, every job's AdamW state, the loss sums
and per-microbatch losses so far, the optimizer-step counts and the RNG (see "Checkpoints" in
:mod:`adasched.runtime.lora_trainer`); rank 0 also writes the plan to CHECKPOINT_DIR/plan.json on a fresh run,
and a resumed run executes that plan (re-planning with a time-limited solver could pack differently). The run's
identity - the plan's ``inputs_digest`` and a digest of its microbatch sequence, the model dims, --seed, the
kernel numerics (the fused kernels, or the torch reference that both --reference and the fallback run) - must
match the save's, else one ``error:`` line, exit 2, before any process group exists. A resumed run writes the same
adapters and losses.json, byte for byte, as the uninterrupted one. Another world size (pipeline stages) reshards the
save (then the same to float rounding: the stages sum in another order): each rank merges every saved stage's state
into its own stage's (matrices and their gradients from the stage that held their layer, AdamW state re-indexed, loss
sums from the last stage; :func:`~adasched.runtime.lora_trainer.reshard_trainer_blobs`), its RNG from the same rank
when the save had it, and rank 0 prints ``resharded: ...``; the saved plan must obey the new stage count's dependency
rule (it does when planned for at least that many stages; else one line names the largest count it allows).

The fused multi-LoRA kernels run on a CPU only under TRITON_INTERPRET=1 (slow: ~85 s for the tiny preset on one
core); without it each call falls back to the torch reference (same results). The printed summary's "kernels"
says which ran: "interpret", "torch" (that fallback) or "reference" (--reference).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adasched.launch.cli_args import MAX_LAYERS, add_checkpoint_args, checkpoint_config, checkpoint_identity
from adasched.planner.ui import OneLineArgParser, reports_errors
from adasched.profiler.io import MIN_COLLECTIVE_TIMEOUT_S, check_model_memory, check_seconds

__all__ = ["main", "parse_args"]

DEFAULT_PROFILE = "h100-sxm"   # --profile when planning --jobs
DEFAULT_TIME_LIMIT_S = 0.2     # --time-limit: seconds per packing MILP


def _folder(text: str) -> Path:
    if not text.strip():  # Path("") is ".": the adapters would land in the current folder
        raise argparse.ArgumentTypeError("empty folder name")
    return Path(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgParser(prog="adasched.launch.train_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", default=None, help="jobs file (JSON/YAML) or preset (tiny, mix, het); default tiny "
                                                "(not with --plan)")
    p.add_argument("--plan", type=Path, default=None, help="execute this LoRA plan JSON instead of planning --jobs")
    p.add_argument("--out", type=_folder, required=True, help="output folder (plan.json, <job>/adapter_*, losses.json)")
    p.add_argument("--reference", action="store_true", help="torch reference multi-LoRA path instead of the fused kernels")
    p.add_argument("--profile", default=None, help="profile for planning --jobs (costs only affect the "
                   f"simulation; default: {DEFAULT_PROFILE}; not with --plan)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per packing MILP when planning --jobs "
                   f"(default: {DEFAULT_TIME_LIMIT_S}; not with --plan)")
    p.add_argument("--seed", type=int, default=0, help="adapter init and dropout seed (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=64, help="vocabulary of the tiny base model (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=32, help="model width, divisible by --heads (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers, >= the pipeline stages "
                   "(default: %(default)s)")
    p.add_argument("--heads", type=int, default=2, help="attention heads (default: %(default)s)")
    p.add_argument("--ffn", type=int, default=48, help="MLP hidden width (default: %(default)s)")
    p.add_argument("--max-positions", type=int, default=512, help="longest sample the model takes (tokens; "
                   "default: %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck collective fails "
                   "(default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="validate the options and the plan for --world pipeline stages, write nothing, exit (what "
                        "launch/train_lora.sh runs before torchrun, so bad input fails once, on one line)")
    p.add_argument("--world", type=int, default=None, help="with --check: the ranks torchrun will start")
    add_checkpoint_args(p, step="microbatch of the plan, no-op ones included; the pipeline drains at a save",
                        folder_holds=" and of its plan (plan.json, which a resumed run executes)")
    args = p.parse_args(argv)
    if args.plan is not None and args.jobs is not None:  # --jobs was silently ignored
        p.error("argument --jobs: not with --plan (the plan already holds its jobs)")
    if args.jobs is None:
        args.jobs = "tiny"
    # planning options: None = not given (refused with --plan, which is not planned: _check_options); the
    # defaults otherwise, as before
    args.planning_given = [opt for opt, v in (("--profile", args.profile), ("--time-limit", args.time_limit))
                           if v is not None]
    if args.profile is None:
        args.profile = DEFAULT_PROFILE
    if args.time_limit is None:
        args.time_limit = DEFAULT_TIME_LIMIT_S
    return args


def _check_options(args: argparse.Namespace) -> None:
    from adasched.planner.lorafusion.cli import MAX_TIME_LIMIT_S  # as `plan lora --time-limit`
    from adasched.profiler.io import InputError, check_output_folder

    if args.plan is not None and getattr(args, "planning_given", None):
        opt = args.planning_given[0]
        raise InputError(opt, "has no effect with --plan (the plan is executed as it is, not re-planned)")
    for opt in ("vocab", "hidden", "layers", "heads", "ffn", "max_positions"):
        v = getattr(args, opt)
        if v < 1:
            raise InputError(f"--{opt.replace('_', '-')}", f"must be >= 1, got {v}")
    if args.hidden % args.heads:
        raise InputError("--hidden", f"{args.hidden} must be divisible by --heads {args.heads}")
    if args.layers > MAX_LAYERS:
        raise InputError("--layers", f"must be <= {MAX_LAYERS}, got {args.layers}")
    # NaN and inf: finite seconds only (torch's timedelta); under 1 ms it is 0 (the store timed out at once)
    check_seconds("--timeout", args.timeout, least=MIN_COLLECTIVE_TIMEOUT_S)
    check_seconds("--time-limit", args.time_limit, most=MAX_TIME_LIMIT_S)
    if not -2 ** 63 <= args.seed < 2 ** 63:  # torch.manual_seed and the planner's seed take these
        raise InputError("--seed", f"must be in [-2**63, 2**63), got {args.seed}")
    if args.plan is None and args.seed < 0:  # it seeds the planner's solvers too (the planner's error named 'seed')
        raise InputError("--seed", f"must be >= 0 when train_lora plans (--jobs): it is the MILP solver seed too, "
                                   f"got {args.seed}")
    check_output_folder(args.out, "--out")  # a file, an empty name, a read-only place: before any work
    if args.world is not None and not args.check:
        raise InputError("--world", "only with --check (under torchrun the world is torchrun's)")
    if args.world is not None and args.world < 1:
        raise InputError("--world", f"must be >= 1, got {args.world}")
    # the frozen base model (fp32; the adapters are small) on every rank of this host
    h = args.hidden
    params = args.layers * (4 * h * h + 3 * h * args.ffn) + (2 * args.vocab + args.max_positions) * h
    from adasched.runtime.dist import env_int

    ranks = args.world or env_int("LOCAL_WORLD_SIZE", env_int("WORLD_SIZE", 1))
    check_model_memory(params, 4, ranks, "--vocab/--hidden/--layers/--ffn/--max-positions", "the fp32 weights")
    checkpoint_config(args)  # the options' own checks; the folder is probed where its saves are looked up


def _plan_digest(plan) -> str:
    """sha256 of what the trainer executes from a plan: jobs, sample lengths, microbatch sequence."""
    import hashlib

    body = plan.model_dump(mode="json", include={"jobs", "lengths", "microbatches"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


#: run identity of the synthetic data's keying: by job name and index within the job (2026-12-02)
DATA_KEYING = "job-name"


def _identity(args: argparse.Namespace, plan, inputs: str | None = None) -> dict:
    """What makes a different run (checked against a save's before resuming it). ``inputs``: the inputs digest of
    --jobs when it is given (a changed jobs file then shows as its own difference)."""
    return {"trainer": "train_lora", "inputs_digest": inputs or plan.inputs_digest, "plan_sha256": _plan_digest(plan),
            **_model_identity(args)}


def _model_identity(args: argparse.Namespace) -> dict:
    """The part of :func:`_identity` the options alone decide (the model, seed, numerics and data keying)."""
    return {"model": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                      "ffn": args.ffn, "max_positions": args.max_positions},
            "seed": args.seed, "dtype": "float32", "kernels": _numerics(_kernel_path(args.reference)),
            # how the synthetic data and the adapters' init are keyed (lora_trainer.SyntheticLoRAData): a save of
            # the position-keyed trainer (no such entry) resumed and mixed the two streams without a word
            "data": DATA_KEYING}


def _numerics(kernels: str) -> str:
    """The kernel path as run identity: the fallback ("torch", train_lora.sh without TRITON_INTERPRET) calls the
    torch reference that --reference selects - the same bits - so a save of one resumes under the other."""
    return "reference" if kernels == "torch" else kernels


def _trainer_resharder(tstate, adapters, num_layers: int, stages: int, stage: int):
    """The ``trainer`` entry of a save made by another number of stages (Checkpointer's ``resharders``): every saved
    stage's blob, merged into this stage's state."""
    from adasched.runtime.checkpoint import load_templates
    from adasched.runtime.lora_trainer import reshard_trainer_blobs

    def reshard(info, saved):
        keys = [f"rank{j}/trainer.blob" for j in range(info.world_size)]
        missing = [k for k in keys if k not in saved]
        if missing:
            from adasched.profiler.io import InputError

            raise InputError(info.path, f"cannot reshard this save: it lacks {missing[0]}")

        def finish(loaded):
            tstate.load_state_dict(reshard_trainer_blobs([loaded[k] for k in keys], adapters, num_layers,
                                                         stages=stages, stage=stage))

        return load_templates(saved, keys), finish

    return reshard


def _resume_check(args: argparse.Namespace, cfg, world: int):
    """Before any process group: the plan a resumed run executes (None for a fresh run) after checking the save
    belongs to this run (InputError otherwise; another world size is a resharded resume)."""
    from adasched.planner.lorafusion.plan import LoRAPlan
    from adasched.planner.plan import inputs_digest, load_plan
    from adasched.profiler.io import InputError
    from adasched.runtime.checkpoint import check_resumable, find_checkpoint

    info = find_checkpoint(cfg.folder, cfg.load_step)
    if info is None:
        return None
    inputs = None
    if args.plan is not None:
        plan = load_plan(args.plan, expect=LoRAPlan)
    else:
        saved = Path(cfg.folder) / "plan.json"
        if not saved.is_file():
            raise InputError(saved, "missing: the plan of the saved run (resume with its --plan, or a new "
                                    "--checkpoint-dir)")
        plan = load_plan(saved, expect=LoRAPlan)
        from adasched.planner.lorafusion.jobs import build_workload, load_jobs

        jcfg, base, label = load_jobs(args.jobs)
        w = build_workload(jcfg, base, where=label, label=label)
        inputs = inputs_digest(w.config, list(w.lengths))
        _check_planning_options(args, plan, saved)
    check_resumable(info, world, _identity(args, plan, inputs), reshardable=True)
    return plan


def _check_planning_options(args: argparse.Namespace, plan, saved: Path) -> None:
    """A resumed run executes the saved plan: --profile / --time-limit given again must be the ones it was planned
    with (the same command re-run resumes); other values were ignored without a word."""
    import math

    from adasched.planner.plan import profile_ref
    from adasched.profiler.io import InputError
    from adasched.profiler.profile import load_profile

    given = getattr(args, "planning_given", None) or []
    if "--time-limit" in given:
        was = plan.solver.time_limit
        if was is None or not math.isclose(was, args.time_limit, rel_tol=1e-9):
            raise InputError("--time-limit", f"{args.time_limit:g} s, but the saved plan a resumed run executes "
                                             f"({saved}) was made with {was if was is None else f'{was:g} s'}: "
                                             f"re-run without it, or start in a new --checkpoint-dir")
    if "--profile" in given:
        ref = profile_ref(load_profile(args.profile))
        if plan.profile is None or ref.digest != plan.profile.digest:
            raise InputError("--profile", f"{args.profile!r} is not the profile of the saved plan a resumed run "
                                          f"executes ({saved}: "
                                          f"{plan.profile.name if plan.profile else 'none recorded'}): re-run "
                                          f"without it, or start in a new --checkpoint-dir")


def _same_folder(a, b) -> bool:
    """Whether two folder arguments name one folder (links and relative paths resolved; False where either fails)."""
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def _make_plan(args, rank: int, world: int) -> str:
    """Plan JSON text made (or read) on rank 0 and broadcast to every rank."""
    text, error = None, None
    if rank == 0:
        from adasched.planner.lorafusion.jobs import build_workload, load_jobs
        from adasched.planner.lorafusion.plan import LoRAPlan, build_plan
        from adasched.planner.plan import load_plan
        from adasched.profiler.profile import load_profile

        try:
            if args.plan is not None:
                plan = load_plan(args.plan, expect=LoRAPlan)
            else:
                cfg, base, label = load_jobs(args.jobs)
                w = build_workload(cfg, base, where=label, label=label)
                plan = build_plan(w, load_profile(args.profile), time_limit=args.time_limit, seed=args.seed)
            text = plan.model_dump_json()
        except (ValueError, OSError) as err:  # InputError is a ValueError
            if world == 1:
                raise
            error = err
    if world > 1:
        import torch.distributed as dist

        # the error goes to every rank too: rank 0 raising before the broadcast left the others with a
        # "Connection closed by peer" traceback (and exit 1 under torchrun)
        box = [text if error is None else ("error", str(error))]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], tuple):
            if error is not None:
                raise error
            raise _PeerFailed(box[0][1])
        text = box[0]
    return text


class _PeerFailed(ValueError):
    """Another rank (rank 0) failed on bad input and printed it; this rank exits 2 without printing it again."""


def _kernel_path(reference: bool) -> str:
    """What the multi-LoRA projections run: "reference" (--reference), "interpret" (the fused Triton kernels under
    TRITON_INTERPRET=1) or "torch" (without the interpreter the fused call falls back to the torch reference with
    a warning - what `launch/train_lora.sh` runs; the summary's ``fused`` said true for it too). The trainer's
    tensors live on the CPU, so "triton" (compiled kernels) is reported only if that ever changes."""
    if reference:
        return "reference"
    import torch

    from adasched.kernels.lora import backend_for

    return backend_for(torch.zeros(1))


def run(args: argparse.Namespace) -> dict | None:
    import torch
    import torch.distributed as dist

    from adasched.planner.lorafusion.plan import LoRAPlan
    from adasched.planner.plan import save_plan
    from adasched.runtime.dist import env_world, init_distributed
    from adasched.runtime.checkpoint import Checkpointer, RNGState, step_folder
    from adasched.runtime.lora_model import TinyCausalLM, TinyLMConfig
    from adasched.runtime.lora_trainer import (
        SyntheticLoRAData,
        build_adapters,
        gather_adapter_states,
        check_adapter_outputs,
        save_adapters,
        train_plan,
        check_plan,
        train_plan_pipeline,
        trainer_state,
    )

    _check_options(args)
    cfg = checkpoint_config(args)
    rank, world, _ = env_world()  # the one place that reads the torchrun environment
    if args.check:  # one process judging the world torchrun will start
        rank, world = 0, args.world or world
    resumed_plan = _resume_check(args, cfg, world) if cfg is not None else None
    if args.check and cfg is not None:  # (the ranks' lock: one line in the pre-check, not inside torchrun)
        from adasched.runtime.checkpoint import check_folder_free

        check_folder_free(cfg.folder)
    torch.manual_seed(args.seed)
    import random

    random.seed(args.seed)  # nothing draws from it; seeded so that the saved Python generator is the seed's (two
    # uninterrupted runs saved different `random` states: whole saves could not be compared)
    distributed = world > 1 and not args.check
    if distributed:
        init_distributed("gloo", timeout_s=args.timeout)  # idempotent; every collective bounded by --timeout
    ck = None
    try:
        if distributed:
            # each rank parsed its own command line (torchrun per node): another --hidden on one rank waited in the
            # pipeline until --timeout, and --checkpoint-dir on some ranks only met another collective below (a
            # traceback); the plan is compared once it is known (a resumed run reads it on every rank)
            from adasched.runtime.dist import check_same_on_every_rank

            where = str(args.plan) if args.plan is not None else "train_lora"
            check_same_on_every_rank({**_model_identity(args),
                                      "reference": bool(args.reference), "checkpoint": checkpoint_identity(cfg)},
                                     where)
        if distributed and cfg is not None:
            # each rank decided "resumed" from its own file system: on nodes without a shared one they differ, and
            # a fresh rank's plan broadcast paired with a resuming rank's output check (no error line, a dead run)
            from adasched.runtime.checkpoint import agree_on_save, find_checkpoint

            agree_on_save(cfg.folder, find_checkpoint(cfg.folder, cfg.load_step))
        if world > args.layers:
            raise ValueError(f"--layers: {args.layers} layers cannot be split over {world} pipeline stages")
        if resumed_plan is not None:  # every rank read the same saved plan
            plan = resumed_plan
        else:
            plan = LoRAPlan.model_validate_json(_make_plan(args, rank, world if distributed else 1))
        if distributed:  # (rank 0's, broadcast - or, resumed, the saved plan each rank read from its file system)
            check_same_on_every_rank(_identity(args, plan), where)
        model = TinyCausalLM(TinyLMConfig(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers,
                                          heads=args.heads, ffn_hidden=args.ffn, max_positions=args.max_positions))
        if plan.lengths and max(plan.lengths) > args.max_positions:  # the user's knob, not the plan, to name
            from adasched.profiler.io import InputError

            raise InputError("--max-positions", f"{args.max_positions} is shorter than the longest sample, "
                                                f"{max(plan.lengths)} tokens, of {args.plan or args.jobs}")
        if resumed_plan is not None and plan.dependency_violations(world):  # re-planning would make another run
            from adasched.profiler.io import InputError

            ok = max(s for s in range(1, world) if not plan.dependency_violations(s))
            raise InputError(Path(cfg.folder) / "plan.json", f"the saved plan a resumed run executes runs on at most "
                                                             f"{ok} pipeline stage(s), not {world}: resume on <= {ok} "
                                                             f"ranks, or start in a new --checkpoint-dir")
        # before anything is written; the error names the plan's file, or the jobs file it was planned from
        check_plan(plan, model, world, where=str(Path(cfg.folder) / "plan.json") if resumed_plan is not None
                   else args.plan if args.plan else f"--jobs {args.jobs} (stages)")
        # what rank 0 writes into --out after training, checked before it: its error stops every rank (a rank
        # going on would wait for it in the pipeline until --timeout)
        failed = None
        if rank == 0:
            try:
                check_adapter_outputs(args.out, plan)
                # the plan files rank 0 writes before training: unchecked, a folder there passed --check, then
                # killed rank 0 mid-run (rank 1 died on the closed connection: a traceback, exit 1)
                from adasched.profiler.io import InputError, check_output_path

                check_output_path(args.out / "plan.json", "--out")
                if cfg is not None and resumed_plan is None:
                    check_output_path(Path(cfg.folder) / "plan.json", "--checkpoint-dir")
                if cfg is not None:  # a job's adapter folder that is a save's name: written into a save, pruned with it
                    from adasched.runtime.checkpoint import _PREFIX, is_save_name

                    clash = next((j.name for j in plan.jobs if is_save_name(j.name)), None)
                    if clash is not None and _same_folder(args.out, cfg.folder):
                        raise InputError("--out", f"{args.out} is the --checkpoint-dir, and job {clash!r} is named "
                                                  f"like its saves ({_PREFIX}NNNNNNNN): its adapter would be written "
                                                  f"into a save and deleted with it; give --out another folder")
            except ValueError as err:
                failed = err
        if distributed:
            box = [None if failed is None else str(failed)]
            dist.broadcast_object_list(box, src=0)
            if failed is None and box[0] is not None:
                failed = _PeerFailed(box[0])
        if failed is not None:
            raise failed
        if args.check:
            print(f"ok: {len(plan.microbatches)} microbatches of {len(plan.jobs)} jobs for {world} pipeline "
                  f"stage(s); nothing written")
            return None
        adapters = build_adapters(model, plan, seed=args.seed)
        data = SyntheticLoRAData(args.vocab, seed=args.seed)
        kernels = _kernel_path(args.reference)
        fused = kernels in ("triton", "interpret")  # what really runs: not the fallback the fused call takes
        tstate = trainer_state(model, adapters, plan, stages=world, stage=rank)
        state = {"trainer": tstate, "rng": RNGState()}
        total = len(plan.microbatches)
        ck, start, on_checkpoint = None, 0, None
        if cfg is not None:
            reshard = _trainer_resharder(tstate, adapters, args.layers, world, rank)
            ck = Checkpointer(cfg, run=_identity(args, plan), timeout_s=args.timeout, reshardable=True,
                              own_rank={"rng"}, resharders={"trainer": reshard})
            failed = None
            try:
                start = ck.resume(state)  # a save DCP cannot read: one InputError naming it
                if start != tstate.cursor:
                    raise ValueError(f"{cfg.folder}: the save of step {start} holds trainer step {tstate.cursor}")
            except ValueError as err:
                failed = err
            if distributed:  # a rank whose own state did not load stops every rank (its peers would wait on it
                # until --timeout), and rank 0 prints its line
                from adasched.profiler.io import error_line

                said = [None] * world
                dist.all_gather_object(said, None if failed is None else error_line(failed)[len("error: "):].strip())
                if failed is None and any(said):
                    failed = ValueError(next(m for m in said if m))
            if failed is not None:
                raise failed
            if rank == 0 and start >= total:
                print(f"nothing left to train: all {total} steps (plan microbatches) are done in {ck.config.folder}; "
                      f"writing the saved adapters", file=sys.stderr, flush=True)
            elif rank == 0 and start > 0:
                print(f"resumed from {step_folder(cfg.folder, start)} at step {start}", file=sys.stderr, flush=True)
            if rank == 0 and ck.resharded_from is not None:
                print(f"resharded: the save was made by {ck.resharded_from.world_size} pipeline stage(s); this run "
                      f"has {world}", file=sys.stderr, flush=True)

            def save_due(step: int) -> None:  # every rank, at a step boundary (the pipeline is drained)
                if ck.due(step):
                    ck.save(step, state)

            on_checkpoint = save_due
        if rank == 0 and cfg is not None and resumed_plan is None:
            # the plan a resumed run will execute (before any save); --out's copy is written with the adapters at the
            # end (written here, an interrupted run left the new plan beside the previous run's adapters and losses)
            save_plan(plan, Path(cfg.folder) / "plan.json")
        every = cfg.interval if cfg is not None else 0
        if world == 1:
            res = train_plan(model, adapters, plan, data, fused=fused, seed=args.seed, state=tstate,
                             checkpoint_every=every, on_checkpoint=on_checkpoint)
            states = None
        else:
            res = train_plan_pipeline(model, adapters, plan, data, fused=fused, seed=args.seed, state=tstate,
                                      checkpoint_every=every, on_checkpoint=on_checkpoint)
            states = gather_adapter_states(adapters, model)
            got = [None] * world if rank == 0 else None
            dist.gather_object(res if rank == world - 1 else None, got, dst=0)
            if rank == 0:
                res = got[world - 1]
        if ck is not None:
            # collective; nothing written when this step is already saved
            ck.save(total, state)
            ck.finish()          # --checkpoint-async: the save in flight written and committed
        if rank != 0:
            return None
        save_adapters(args.out, plan, adapters, states, res)
        save_plan(plan, args.out / "plan.json")
        summary = {"out": str(args.out), "world": world, "fused": fused, "kernels": kernels,
                   "microbatches": len(plan.microbatches), "start_step": start,
                   "losses": res.by_job(plan),
                   "optimizer_steps": {job.name: res.steps.get(j, 0) for j, job in enumerate(plan.jobs)}}
        from adasched.planner.ui import emit_json
        from adasched.profiler.io import has_non_finite

        if has_non_finite(summary):  # (NaN losses were printed as NaN - not JSON to strict parsers - and said nothing)
            print("note: some losses are not finite (the run diverged: lower the jobs' lr); written as null",
                  file=sys.stderr, flush=True)
        emit_json(summary)
        return summary
    finally:
        if ck is not None:  # an error path: a save in flight completes with the peers still here (no-op after finish)
            ck.close()
        if distributed and dist.is_initialized():
            # every rank leaves together: a rank tearing gloo down while its peer still holds the connection
            # aborted the peer at exit now and then ("terminate called without an active exception", README walk)
            # (only on success: after an error on one rank the others may sit in another collective)
            import gc

            try:
                if sys.exc_info()[0] is None:
                    gc.collect()  # drop finished async-work handles while torch is alive
                    dist.barrier()
            finally:
                dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from adasched.profiler.io import error_line

    args = parse_args(argv)
    try:
        run(args)
    except ValueError as err:  # InputError is a ValueError
        if reports_errors():
            sys.stderr.write(error_line(err))
        return 2
    except OSError as err:  # a file or folder that cannot be read or written (a directory, no permission, ...)
        if reports_errors():
            where = err.filename if err.filename is not None else "train_lora"
            sys.stderr.write(f"error: {where}: {' '.join((err.strerror or str(err)).split())}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

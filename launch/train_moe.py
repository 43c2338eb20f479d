"""Train a tiny MoE language model on the synthetic Markov task, expert-parallel (gloo on CPU).

    torchrun --nproc_per_node=4 -m adasched.launch.train_moe --router all --schedule all --steps 10 [--ep-size 2]
    torchrun --nproc_per_node=2 -m adasched.launch.train_moe --router sigmoid_bias --steps 200 \
        --lr-schedule rex --warmup-steps 20 --checkpoint-dir ckpt --checkpoint-every 50   # (re)launch: resumes
    python -m adasched.launch.train_moe --compare-schedules [--quick] [--json]

Per step rank 0 prints the mean LM loss over ranks, each layer's mean experts per token and dropped
assignments. ``--router``/``--schedule`` take one name, a comma list or ``all``: every combination trains in
the same process group, one after another. The capacity schedule sets, per layer, ``top_k`` (gshard,
sigmoid_bias, expert_choice), ``k_max`` (top_p) or, for switch (k = 1), the number of experts (in units of the
EP size); ``--budget`` is the total over layers (default: 2 per layer, or the expert count per layer, moved into
the bounds).
``--ep-size`` (default: every rank) splits the ranks into contiguous EP groups of that size; each expert then has
world / ep-size copies, whose gradients are averaged over the expert-data-parallel group
(:meth:`ExpertParallel.create_groups`, :class:`ExpertGradReducer`); the dense gradients over every rank.
``--plan`` takes the pipeline degrees and gradient slices from an FSMoE plan made for this world and EP size
(``adasched plan moe --gpus WORLD [--ep-size K]``; with ``--hierarchical``, the runtime's two-step all-to-all
through nodes of min(--gpus-per-node, EP size) ranks: ``... --two-step-a2a --gpus-per-node G``); a plan made for
another layout - number of GPUs, EP size, exchange (flat or two-step, node size), whole or sharded experts - is an
error naming both.

``--expert-shards S`` builds FSMoE's expert-sharded layout (the layout ``adasched plan moe`` picks without
``--ep-size`` when a model has fewer experts than GPUs; its plans say ``hierarchical``): nodes of S contiguous ranks
each hold 1/S of the FFN width of the node's experts (for SwiGLU the same columns of the gate and up halves), EP
groups of ``--ep-size`` ranks (default world / S) across the nodes. Per chunk of the r-chunk pipeline the rows cross
the nodes in one all-to-all, are all-gathered inside the node, every rank multiplies all of them by its shard and
the partial outputs are reduce-scattered back before the return all-to-all (the backward likewise; inside the node
both are all_to_all_single calls, uneven row counts allowed). The experts' weights are the same as for whole
experts (``init_experts`` draws full weights and each rank keeps its slice), so every layout trains the same
model: on 4 gloo ranks the losses of 1 node x 4 shards (from a sharded plan), 2 nodes x 2 shards and whole experts
agree to float rounding (tests/launch/test_train_moe_plan.py). A sharded plan needs ``--expert-shards`` = its node
size and ``--ep-size`` = its EP size; ``--expert-shards`` does not combine with ``--hierarchical``.

``--lr-schedule`` (constant, linear, cosine, rex, uba; default constant: the --lr throughout) with
``--warmup-steps W`` builds :func:`adasched.schedules.get_schedule` over ``--steps`` optimizer steps (W of them
linear warmup from 0) and steps it once per optimizer step; the log lines then end with the LR the step used.

``--compare-schedules`` (used by ``adasched bench moe --schedules``) trains one single-process model per
capacity schedule at the same budget and seed and reports the held-out loss of each (:func:`compare_schedules`).

Checkpoints (``--checkpoint-dir D [--checkpoint-every N] [--checkpoint-keep K] [--checkpoint-async] [--load-step S]``,
:mod:`adasched.runtime.checkpoint`): a run saves into D after every N completed steps and at its end, and a launch
whose D holds a save resumes from the newest (or step S's) and continues bit for bit: on CPU float32 the losses of
the remaining steps and the final state equal those of the uninterrupted run. A save holds one run, so
``--checkpoint-dir`` needs exactly one ``--router`` and one ``--schedule``; ``--compare-schedules`` (single-process,
one model per schedule) takes no checkpoint options. Every rank stores its own state (expert-parallel ranks hold
different experts). A save resumes only for the same run: the identity (:func:`run_identity`) holds the router, the
scheduled per-layer capacities, the model's sizes, --batch (or --global-batch), --lr, the LR schedule and its warmup
(and --steps when the schedule is not constant: its horizon), --seed, --capacity-factor, --shared-experts, the EP size
and exchange, and the pipeline every layer runs - r_fwd/r_bwd, weight-gradient placement, issue orders and
dense-gradient slices, from --plan or the flags (they change the float sums) - with --plan also the plan's
``inputs_digest`` and configuration (a plan re-solved from the same inputs keeps its digest but may pick another
pipeline); a constant-LR run may be extended with a larger --steps. Output options
(--json, --router-stats-out) and the checkpoint options themselves are not part of it.
Resharding: the world size and the layout entries of the identity (:data:`LAYOUT_KEYS`: EP size, exchange, expert
shards, plan and pipeline) may differ from the save's; the launch then resumes it on the new layout - each rank
reads, from the saved layout's first domain, only the saved parts holding its own experts and FFN columns and
copies their weights and AdamW moments into its own (:func:`adasched.runtime.moe.reshard.expert_resharder`), takes
the dense weights, router buffers, their AdamW state, the LR schedule and the step from rank 0, and its data
generator from the same rank of the save (a rank the save did not have keeps its fresh one) - and rank 0 prints
``resharded: ...`` naming both layouts. On the same ranks the steps after it equal the uninterrupted run's to float
rounding (other chunkings sum in another order). With ``--batch`` another world size trains on other data (each rank
draws its own batch, the global batch is world x --batch); with ``--global-batch G`` every rank replays one data
generator (saved and resumed as rank 0's) and trains on its rows of the same G sequences, so a resume on another
number of ranks continues on the uninterrupted run's batches. The capacities must still agree (the switch router
schedules expert counts in EP units).
A mismatch (other run, a --load-step not saved, a --checkpoint-dir that is a file or cannot be
created or written) is one ``error:`` line, exit 2, before any process group (train_moe.sh's --validate-only pass:
before torchrun starts). Rank 0 prints ``resumed from <step folder> at step N``; a run resumed with --load-step from
an older save deletes the later saves at its first save; a save at or past --steps leaves nothing to train (a note,
exit 0; with --json also a JSON object without runs). The state, per rank:

- ``model``: the model with AdamW (:class:`~adasched.runtime.checkpoint.ModelState`): the replicated dense weights,
  this rank's expert shards (w1/w2, and the shared experts), the routers' projections and their persistent buffers
  - sigmoid_bias's ``expert_bias`` (moved every step by the balancing rule) and top_p's ``p_threshold`` - and
  AdamW's moments, step counts and the param groups' current LR;
- ``lr_schedule``: the LR scheduler (its step, base and last LRs), when --lr-schedule is not constant;
- ``rng``: the rank's data generator (seeded ``1000 * seed + rank``, :meth:`MarkovTask.batch` draws every step's
  batch from it; with --global-batch ``1000 * seed`` on every rank, each drawing the whole global batch), torch's
  global CPU generator (seeded ``seed``) and Python's ``random`` (seeded ``1000 * seed + rank``); training draws
  from neither after the model is built; they are saved so that nothing depends on that (with --global-batch the
  entry is replicated: a resharded resume gives every rank rank 0's three);
- ``progress``: completed steps.

Not state, and why: the Markov chain (fixed by its own seed, rebuilt identically), gradients (zeroed at the start of
every step), the gradient reducers' buffers (reset by every ``finish()``), a MoE layer's pending router statistics
(only with ``router_update="step"``; this trainer uses "backward", which applies them within the step), the last
routing statistics and aux loss (recomputed by every forward) and the losses of earlier steps (printed only; with
``--json`` a resumed launch's ``losses`` start at its ``start_step``).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

from adasched.launch.cli_args import (MAX_LAYERS, add_checkpoint_args, add_lr_schedule_args, check_lr_schedule,
                                      checkpoint_config, checkpoint_identity, lr_identity, lr_scheduler)
from adasched.planner.ui import OneLineArgParser as ArgParser, is_rank0, reports_errors
from adasched.profiler.io import InputError, check_host_memory, check_model_memory

#: --seed's bound: the data generators take 1000 * seed + rank, which must fit torch's 64-bit seed
MAX_SEED = 2 ** 40

__all__ = ["main", "train_schedule", "compare_schedules", "layer_routers", "run_identity"]


def parse_args(argv):
    p = ArgParser(prog="python -m adasched.launch.train_moe", description=__doc__.split("\n\n")[0], epilog=(
        "Checkpoints: --checkpoint-dir needs one --router and one --schedule; every rank saves its own state (its "
        "experts, AdamW, the LR schedule, its data generator); a save resumes only with the same run settings "
        "(model, data, --lr/--lr-schedule, --seed, capacities) and is resharded when the world size or layout (EP "
        "size, exchange, expert shards, pipeline, plan) differs; a constant-LR run may be extended with a larger "
        "--steps."))
    p.add_argument("--router", default="gshard", help="router kind, comma list or 'all' (default: %(default)s)")
    p.add_argument("--schedule", default="uniform", help="capacity schedule, comma list or 'all' "
                   "(default: %(default)s)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="the top_p router's threshold p: the "
                   "smallest prefix of the sorted gate probabilities reaching it (default: %(default)s; the "
                   "top-p routing paper's, arXiv 2403.07652, is 0.4)")
    p.add_argument("--budget", type=int, default=None, help="total capacity over layers (k units or experts; "
                   "default: 2 per layer, or the expert count per layer, moved into what --cap-lo/--cap-hi allow)")
    # --cap-lo / --cap-hi / --hidden: under torchrun, --lo and --d are taken as abbreviations of torchrun's own
    # options (--log-dir..., --duplicate-stdout-filters); the short spellings still work without torchrun
    p.add_argument("--cap-lo", "--lo", dest="lo", type=int, default=None, help="per-layer lower bound of the capacity "
                   "schedule (default: 1; switch: max(EP size, experts/2) experts)")
    p.add_argument("--cap-hi", "--hi", dest="hi", type=int, default=None, help="per-layer upper bound (default: min(4, "
                   "--experts); switch: 2 x --experts)")
    p.add_argument("--layers", type=int, default=4, help="MoE transformer layers (default: %(default)s)")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default: %(default)s)")
    p.add_argument("--hidden", "--d", dest="d", type=int, default=32, help="model width (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads; they divide --hidden "
                   "(default: %(default)s)")
    p.add_argument("--ffn", type=int, default=32, help="expert FFN hidden width (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=16, help="vocabulary of the synthetic Markov task, >= 3 "
                   "(default: %(default)s)")
    p.add_argument("--seq", type=int, default=24, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="sequences per rank per step; each rank draws its own "
                   "(default: 8)")
    p.add_argument("--global-batch", type=int, default=None, metavar="G",
                   help="sequences per step over all ranks instead of --batch: every rank draws the same G from one "
                        "data generator (all G, every step) and trains on its G / world of them, so the batches do not "
                        "depend on the world size (a resharded resume on another number of ranks trains on the same "
                        "data; the load-balancing loss and capacities still use each rank's own tokens)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW; default: %(default)s)")
    add_lr_schedule_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the model's weights and the data "
                   "(default: %(default)s)")
    p.add_argument("--capacity-factor", type=float, default=None, help="expert capacity factor; tokens past it "
                   "are dropped (default: none, dropless)")
    p.add_argument("--r-fwd", type=int, default=None, help="forward pipeline degree: chunks each layer's all-to-all "
                   "and experts are split into (default: 2; not with --plan, which sets it per layer)")
    p.add_argument("--r-bwd", type=int, default=None, help="backward pipeline degree (default: 2; not with --plan, "
                   "which sets it per layer)")
    p.add_argument("--shared-experts", type=int, default=0, help="always-on shared experts per MoE layer "
                   "(default: 0)")
    p.add_argument("--wgrad", choices=("fused", "per-chunk", "deferred"), default=None,
                   help="where the backward computes the expert weight gradients (default: fused; not with --plan, "
                        "which sets it per layer)")
    p.add_argument("--plan", default=None,
                   help="FSMoE plan JSON (r_fwd, r_bwd, order_fwd, order_bwd, wgrad_bwd, grad_slices)")
    p.add_argument("--plan-config", default=None, help="configuration name inside the --plan (default: its first)")
    p.add_argument("--ep-size", type=int, default=None,
                   help="expert-parallel group size (default: every rank); it must divide the world size and --experts")
    p.add_argument("--hierarchical", action="store_true", help="two-step (intra-node, inter-node) all-to-all, whole "
                   "experts per rank (a --plan must be made with plan moe --two-step-a2a --gpus-per-node G)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="with --hierarchical: ranks per node of the "
                   "two-step exchange, capped at the EP size (default: 2)")
    p.add_argument("--expert-shards", type=int, default=1, metavar="S",
                   help="FSMoE's expert-sharded layout: nodes of S "
                   "contiguous ranks each hold 1/S of the FFN width of the node's experts, EP groups of --ep-size "
                   "(default: world / S) across the nodes; a --plan of that layout (plan moe without --ep-size, "
                   "fewer experts than GPUs) needs S = its node size (default: %(default)s, whole experts)")
    p.add_argument("--router-stats-out", type=Path, default=None,
                   help="write {mean_k_per_layer: [...]} of the last run for `adasched plan moe --router-stats`: "
                        "assignments per token over all its steps and ranks (a resumed run: since step 0; refused when "
                        "nothing is left to train)")
    p.add_argument("--validate-only", action="store_true", help="check the arguments (and --plan and a "
                   "--checkpoint-dir save against WORLD_SIZE) and exit")
    p.add_argument("--compare-schedules", action="store_true",
                   help="single-process: one model per capacity schedule, held-out loss of each (no checkpoints)")
    p.add_argument("--quick", action="store_true",
                   help="with --compare-schedules: 1 seed x 100 steps per schedule instead of 2 x 300")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end (status lines go to "
                   "stderr); each run lists the exact loss and LR of every step this launch trained (no runs, and "
                   "'nothing_left', when the save resumed from is already at --steps)")
    add_checkpoint_args(p)
    args = p.parse_args(argv)
    # what was given on the command line (not its default): --compare-schedules refuses the training options
    args.given = {a.dest: a.option_strings[0] for a in p._actions
                  if a.option_strings and a.dest != "help" and getattr(args, a.dest) != a.default}
    # None = not given: a --plan sets them per layer (an explicit value next to it was dropped without a word)
    for dest, default in (("r_fwd", 2), ("r_bwd", 2), ("wgrad", "fused")):
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    # None = not given: _main refuses an explicit value without --hierarchical (it would do nothing); the value
    # itself is 2, as before (create_groups takes min(2, EP size) also when flat, where it changes nothing)
    args.gpus_per_node_given = args.gpus_per_node is not None
    if args.gpus_per_node is None:
        args.gpus_per_node = 2
    args.batch_given = args.batch is not None
    if args.batch is None:                             # --global-batch sets it per world size (_main)
        args.batch = 8
    return args


def _names(arg: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = list(allowed) if arg == "all" else [s.strip() for s in arg.split(",") if s.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{flag}: {', '.join(bad) or repr(arg)} not in {', '.join(allowed)} (or 'all')")
    return names


DEFAULT_TOP_P = 0.5
"""`--top-p`: the top_p router's threshold here (the top-p routing paper's default, arXiv 2403.07652, is 0.4;
0.5 leaves the tiny model's 8 experts routing ~1.5 experts a token). With 2 experts any p <= 0.5 always routes one
expert (the top probability is >= 0.5)."""


def layer_routers(router: str, schedule: str, layers: int, experts: int, *, budget=None, lo=None, hi=None,
                  ep_size: int = 1, capacity_factor=None, top_p: float = DEFAULT_TOP_P):
    """Per-layer RouterConfigs for ``router`` shaped by capacity schedule ``schedule`` (see module docstring).
    Returns (configs, caps) where caps are the scheduled per-layer values."""
    from adasched.runtime.moe import RouterConfig
    from adasched.schedules.capacity import capacity_schedule

    base = RouterConfig(kind=router, num_experts=experts, top_k=min(2, experts), capacity_factor=capacity_factor,
                        p=top_p)
    if router == "switch":                                # k is 1: schedule the expert count, in EP units
        u = ep_size
        lo = lo if lo is not None else max(u, experts // 2 // u * u)  # (a default in EP units: 6 experts on 2 ranks
        # gave 3, refused as "--cap-lo: 3 is not a multiple" - an option never given)
        hi = hi if hi is not None else 2 * experts
        # (the default moved into the bounds: --cap-hi 6 with 8 experts was refused as "--budget: 32 cannot be
        # met", an option never given)
        budget = budget if budget is not None else min(max(layers * experts, layers * lo), layers * hi)
        for name, v in (("--budget", budget), ("--cap-lo", lo), ("--cap-hi", hi)):
            if v % u:
                raise ValueError(f"{name}: {v} is not a multiple of the expert-parallel size {u} (switch schedules "
                                 f"the expert count)")
        _check_caps(layers, budget, lo, hi, u)
        caps = [c * u for c in capacity_schedule(schedule, layers, budget // u, lo // u, hi // u)]
        return [replace(base, num_experts=c, top_k=1) for c in caps], caps
    lo = lo if lo is not None else 1
    hi = hi if hi is not None else min(4, experts)
    budget = budget if budget is not None else min(max(2 * layers, layers * lo), layers * hi)
    if hi > experts:
        raise ValueError(f"--cap-hi: {hi} exceeds --experts {experts}")
    _check_caps(layers, budget, lo, hi, 1)
    caps = capacity_schedule(schedule, layers, budget, lo, hi)
    field = "k_max" if router == "top_p" else "top_k"
    return [replace(base, **{field: c}) for c in caps], caps


def _check_caps(layers: int, budget: int, lo: int, hi: int, unit: int) -> None:
    """The capacity schedule's bounds, naming the options (capacity_schedule's own messages say 'bounds:' and
    'budget:'): every layer gets at least one (k, or ``unit`` experts), at most --cap-hi, --budget in total."""
    if lo < unit:
        raise ValueError(f"--cap-lo: {lo} must be >= {unit} (every layer routes to at least one expert"
                         f"{' group' if unit > 1 else ''})")
    if hi < lo:
        raise ValueError(f"--cap-hi: {hi} is below --cap-lo {lo}")
    if not layers * lo <= budget <= layers * hi:
        raise ValueError(f"--budget: {budget} cannot be met by {layers} layers within --cap-lo {lo} and --cap-hi {hi}: "
                         f"feasible totals are {layers * lo}..{layers * hi}")


def _plan_pipeline(args, ep_size: int, layers: int, world: int):
    """The per-layer pipeline settings (a ``PlannedPipeline``: r, wgrad placement, issue orders, dense-gradient
    slice fractions in backward order) from --plan (which must have been planned for ``world`` GPUs with EP groups
    of ``ep_size``: ``adasched plan moe --gpus WORLD --ep-size K``), else from the flags (equal slices,
    dispatch-first)."""
    from adasched.runtime.moe.planned import PlannedPipeline, load_pipeline

    if args.plan is None:
        return PlannedPipeline("flags", ep_size, [args.r_fwd] * layers, [args.r_bwd] * layers,
                               [1.0 / layers] * layers, [args.wgrad] * layers)
    two_step = args.hierarchical and ep_size > 1                 # what make_ep builds
    return load_pipeline(args.plan, ep_size=ep_size, num_layers=layers, config=args.plan_config, world=world,
                         experts=args.experts,
                         two_step=two_step, gpus_per_node=min(args.gpus_per_node, ep_size) if two_step else None,
                         expert_shards=args.expert_shards)


def ep_size_for(args, world: int) -> int:
    """The expert-parallel size: ``--ep-size``, default the world (divided by --expert-shards). ValueError naming
    the option when it is not a divisor of the world size or of --experts, or --expert-shards does not fit."""
    S = args.expert_shards
    if S < 1:
        raise ValueError(f"--expert-shards: {S} must be >= 1")
    if S > 1:
        if args.hierarchical:
            raise ValueError("--expert-shards: the expert-sharded layout has its own exchange (all-to-all across the "
                             "nodes, all-gather inside them); drop --hierarchical")
        if world % S:
            raise ValueError(f"--expert-shards: {S} does not divide the world size {world}")
        if args.ffn % S:
            raise ValueError(f"--expert-shards: {S} does not divide --ffn {args.ffn}")
    ep = world // S if args.ep_size is None else args.ep_size
    if ep < 1:
        raise ValueError(f"--ep-size: {ep} must be >= 1")
    if world % (ep * S):
        raise ValueError(f"--ep-size: {ep}" + (f" x --expert-shards {S}" if S > 1 else "")
                         + f" does not divide the world size {world}")
    if args.experts % ep:
        if args.ep_size is None:                     # the default EP size: name what the user gave
            default = f"world {world} / --expert-shards {S}" if S > 1 else "the world size"
            raise ValueError(f"--experts: {args.experts} is not divisible by the expert-parallel size {ep} (the "
                             f"default --ep-size: {default}; give --ep-size K)")
        raise ValueError(f"--ep-size: {ep} does not divide --experts {args.experts}")
    return ep


def make_ep(args, world: int):
    """One set of groups for every run (collective): EP groups of --ep-size and the expert-data-parallel groups
    joining their copies; None for one rank. Layers with another expert count (switch schedules) get a copy with
    that count (TinyMoELM)."""
    from adasched.runtime.moe import ExpertParallel

    if world == 1:
        return None
    ep_size = ep_size_for(args, world)
    return ExpertParallel.create_groups(args.experts, ep_size, hierarchical=args.hierarchical and ep_size > 1,
                                        gpus_per_node=min(args.gpus_per_node, ep_size),
                                        expert_shards=args.expert_shards, timeout_s=120)


#: Identity entries that only lay the run out over the ranks: a save differing in them (or in the world size) is a
#: resharded resume (:func:`adasched.runtime.moe.reshard.expert_resharder`), not another run.
LAYOUT_KEYS = ("ep_size", "two_step_a2a", "exchange_gpus_per_node", "expert_shards", "plan_inputs_digest",
               "plan_config", "r_fwd", "r_bwd", "wgrad", "order_fwd", "order_bwd", "grad_slices")


def run_identity(args, router: str, schedule: str, ep_size: int, world: int) -> dict:
    """What makes a run a different run (the checkpoint's identity, see the module docstring): a flat dict of JSON
    values. Raises like the validation (it resolves the capacity schedule and the plan)."""
    _, caps = layer_routers(router, schedule, args.layers, args.experts, budget=args.budget, lo=args.lo,
                            hi=args.hi, ep_size=ep_size, capacity_factor=args.capacity_factor,
                            top_p=args.top_p)
    two_step = bool(args.hierarchical and ep_size > 1)
    ident = {"trainer": "train_moe", "router": router, "schedule": schedule, "caps": caps, "layers": args.layers,
             "experts": args.experts, "hidden": args.d, "heads": args.heads, "ffn": args.ffn, "vocab": args.vocab,
             "seq": args.seq, "batch": args.batch, "shared_experts": args.shared_experts,
             **({"top_p": args.top_p} if router == "top_p" and args.top_p != DEFAULT_TOP_P else {}),  # (saves
             # made before --top-p existed ran 0.5 and have no such key)
             "capacity_factor": args.capacity_factor, "seed": args.seed, "dtype": "float32",
             **lr_identity(args, args.steps), "ep_size": ep_size, "two_step_a2a": two_step,
             "exchange_gpus_per_node": min(args.gpus_per_node, ep_size) if two_step else None}
    if args.global_batch is not None:                 # the data are the global batch's, whatever the world size
        del ident["batch"]
        ident["global_batch"] = args.global_batch
    if args.expert_shards > 1:                        # only then: saves of whole-expert runs keep their identity
        ident["expert_shards"] = args.expert_shards
    if args.plan is not None:
        from adasched.planner.fsmoe.plan import MoEPlan
        from adasched.planner.plan import load_plan

        ident["plan_inputs_digest"] = load_plan(args.plan, expect=MoEPlan).inputs_digest
    # the pipeline the layers run, per layer, from the plan or the flags: the chunking (r), the weight-gradient
    # placement and the issue orders change the float sums (r 2 vs 4 changed a loss's last bits), and a plan
    # re-solved from the same inputs (same digest: a time-limited solve, another --time-limit) may pick others
    pp = _plan_pipeline(args, ep_size, args.layers, world)
    ident.update(plan_config=pp.config if args.plan is not None else None, r_fwd=pp.r_fwd, r_bwd=pp.r_bwd,
                 wgrad=pp.wgrad, order_fwd=pp.order_fwd, order_bwd=pp.order_bwd, grad_slices=pp.slice_fractions)
    return ident


def _train_one(args, router: str, schedule: str, rank: int, world: int, ep, log, *, ckpt=None,
               status=None) -> dict:
    """Train one (router, schedule) run for --steps steps. ``ckpt``: (CheckpointConfig, run identity) to resume from
    and save into; ``status``: where rank 0's one-line notes go (the resume line)."""
    import torch
    import torch.distributed as dist

    from adasched.runtime.checkpoint import Checkpointer, ModelState, RNGState, Values, step_folder
    from adasched.runtime.moe import ExpertGradReducer, GradSliceReducer, replica_divergence
    from adasched.runtime.moe.lm import MarkovTask, TinyMoELM, lm_loss
    from adasched.runtime.moe.reshard import expert_resharder

    ep_size = ep.size if ep is not None else 1
    routers, caps = layer_routers(router, schedule, args.layers, args.experts, budget=args.budget, lo=args.lo,
                                  hi=args.hi, ep_size=ep_size, capacity_factor=args.capacity_factor,
                                  top_p=args.top_p)
    pp = _plan_pipeline(args, ep_size, args.layers, world)
    fractions = pp.slice_fractions
    build = dict(max_len=args.seq, shared_experts=args.shared_experts)
    random.seed(1000 * args.seed + rank)           # unused by training; seeded so that a run's saved state is its own
    torch.manual_seed(args.seed)
    model = TinyMoELM(args.vocab, args.d, args.heads, args.ffn, routers, ep=ep, r_fwd=pp.r_fwd, r_bwd=pp.r_bwd,
                      wgrad=pp.wgrad, order_fwd=pp.order_fwd, order_bwd=pp.order_bwd, **build)
    if ep is not None:
        # the dense weights of the model without EP (the expert shards' draws would shift them with the EP size):
        # with init_experts below, every --ep-size trains the same model
        torch.manual_seed(args.seed)
        template = TinyMoELM(args.vocab, args.d, args.heads, args.ffn, routers, **build).state_dict()
        model.load_state_dict({k: v for k, v in template.items() if not k.endswith((".moe.w1", ".moe.w2"))},
                              strict=False)
    model.init_experts(args.seed + 1)
    reducer = expert_reducer = None
    if world > 1:
        dense = model.dense_parameters()
        total = sum(p.numel() for p in dense)
        # dense grads: mean over every rank (fractions: backward order); expert grads: summed over their copies
        # (the expert-data-parallel group) and divided by the world size (every rank's tokens reached them once)
        reducer = GradSliceReducer(dense, [f * total for f in fractions], group=ep.dp_group)
        expert_reducer = ExpertGradReducer(model.expert_parameters(), ep)
        for m in model.moe_layers():
            m.reducer = reducer
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = lr_scheduler(args, opt, args.steps)
    task = MarkovTask(args.vocab)
    # per-rank batches: each rank's own generator; --global-batch: one generator every rank replays (seeded as
    # rank 0's: one rank with --global-batch G trains as with --batch G)
    shared_data = args.global_batch is not None
    if shared_data and args.batch * world != args.global_batch:  # _main set --batch from WORLD_SIZE
        raise ValueError(f"--global-batch: {args.global_batch} sequences over {world} ranks, but WORLD_SIZE gave "
                         f"{args.batch} per rank")
    gen = torch.Generator().manual_seed(1000 * args.seed + (0 if shared_data else rank))
    # router_k_sums: {"sums": per layer [assignments, tokens] over every rank and step so far} (--router-stats-out
    # of a resumed run covers the whole run, as an uninterrupted one's; {} in saves written before it)
    progress = Values(step=0, router_k_sums={})
    # everything that decides the rest of the run (module docstring, "Checkpoints")
    state = {"model": ModelState(model, [opt]), "rng": RNGState(data=gen), "progress": progress}
    if sched is not None:
        state["lr_schedule"] = sched
    start, ck, resumed_from = 0, None, None
    if ckpt is not None:
        cfg, identity = ckpt
        # the process group's timeout (init_distributed); a save of another layout: module docstring, "Resharding"
        ck = Checkpointer(cfg, run=identity, timeout_s=120, layout_keys=LAYOUT_KEYS,
                          replicated={"progress", "lr_schedule", *(("rng",) if shared_data else ())},
                          own_rank=() if shared_data else {"rng"},
                          resharders={"model": expert_resharder(model, opt)})
        start = ck.resume(state)
        if start != progress["step"]:
            from adasched.profiler.io import InputError      # every rank loaded the same step: all raise

            raise InputError(step_folder(cfg.folder, start), f"holds the state after {progress['step']} steps, its "
                             f"metadata says step {start} (a copied or edited save); resume from another --load-step "
                             f"or a new --checkpoint-dir")
        if start > 0:
            resumed_from = str(step_folder(cfg.folder, start))
            if rank == 0 and status is not None:
                status(f"resumed from {resumed_from} at step {start}")
                if ck.resharded_from is not None:
                    from adasched.runtime.checkpoint import layout_changes

                    old = ck.resharded_from.run
                    changed = layout_changes(ck.resharded_from, world, identity, LAYOUT_KEYS)
                    status(f"resharded: the save was made by {ck.resharded_from.world_size} ranks (EP "
                           f"{old.get('ep_size')}, expert shards {old.get('expert_shards') or 1}); this run: {world} "
                           f"ranks (EP {ep_size}, expert shards {ep.shards if ep is not None else 1}); changed: "
                           + ", ".join(changed))
    losses, lrs = [], []
    k_sums = None  # per layer: [assignments, tokens] of this run's steps on this rank (--router-stats-out)
    k_base = progress["router_k_sums"].get("sums")  # the resumed save's totals (None: a fresh run or an old save)
    if start > 0 and k_base is None and args.router_stats_out is not None and rank == 0 and status is not None:
        status(f"note: {resumed_from} predates the router statistics in saves: --router-stats-out covers steps "
               f"{start}..{args.steps - 1} only")
    n_moe = len(model.moe_layers())

    def k_totals() -> list[list[float]]:
        """Every rank's [assignments, tokens] per layer since step 0 (collective: all ranks call it together)."""
        sums = torch.tensor(k_sums if k_sums is not None else [[0.0, 0.0]] * n_moe, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        if k_base is not None and len(k_base) == n_moe:
            sums += torch.tensor(k_base, dtype=torch.float64)
        return sums.tolist()

    try:
        for step in range(start, args.steps):
            if shared_data:                            # the whole global batch, this rank's rows of it
                x, y = task.batch(gen, args.global_batch, args.seq)
                x, y = x[rank * args.batch:(rank + 1) * args.batch], y[rank * args.batch:(rank + 1) * args.batch]
            else:
                x, y = task.batch(gen, args.batch, args.seq)
            opt.zero_grad(set_to_none=False)
            loss = lm_loss(model(x), y)
            (loss + model.aux_loss()).backward()
            if reducer is not None:
                reducer.finish()                       # dense grads: mean over ranks (slices already launched)
                expert_reducer.finish()                # expert grads (buckets launched during the backward)
            lrs.append(float(opt.param_groups[0]["lr"]))  # the LR this optimizer step uses
            opt.step()
            if sched is not None:
                sched.step()                           # once per optimizer step
            progress["step"] = step + 1
            lv = loss.detach().clone()
            if world > 1:
                dist.all_reduce(lv)
                lv /= world
            losses.append(float(lv))
            stats = model.layer_stats()
            # whole numbers (assignments after drops, tokens): their sums are exact in any order, so a resumed run's
            # totals (the save's plus its own) equal an uninterrupted run's bit for bit
            step_k = [[float(sum(s_["tokens_per_expert"])), float(s_["num_tokens"])] for s_ in stats]
            k_sums = step_k if k_sums is None else [[a + c, b + d] for (a, b), (c, d) in zip(k_sums, step_k)]
            mean_k = "/".join(f"{s_['mean_k']:.2f}" for s_ in stats)
            dropped = "/".join(str(s_["dropped"]) for s_ in stats)
            lr_note = f" lr {lrs[-1]:.4g}" if sched is not None else ""
            log(f"[{router}/{schedule}] step {step:3d} loss {losses[-1]:.4f} mean_k {mean_k} dropped {dropped}"
                f"{lr_note}")
            if ck is not None and ck.due(step + 1):
                progress["router_k_sums"] = {"sums": k_totals()}
                ck.save(step + 1, state)
        if ck is not None:
            progress["router_k_sums"] = {"sums": k_totals()}
            ck.save(args.steps, state)                 # None (nothing written) when step --steps is already saved
            ck.finish()                                # --checkpoint-async: the save in flight written and committed
    finally:
        if ck is not None:  # an error path: a save in flight completes with the peers still here (no-op after finish)
            ck.close()
    mean_k_run = None  # assignments per token over every step and every rank (a resumed run's: since step 0)
    if k_sums is not None:
        mean_k_run = [float(a / b) if b > 0 else 0.0 for a, b in k_totals()]
    copies_diff = None
    if reducer is not None:
        reducer.remove()
        expert_reducer.remove()
        copies_diff = replica_divergence(model, ep)   # 0.0: every copy of every parameter is bitwise equal
    return {"copies_max_diff": copies_diff, "router": router, "schedule": schedule, "caps": caps,
            "start_step": start, "resumed_from": resumed_from, "losses": losses, "lrs": lrs,
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "floor_nats": task.floor_nats(args.seq),
            "mean_k_per_layer": mean_k_run if mean_k_run is not None else
            [s_["mean_k"] for s_ in model.layer_stats()]}


def train_schedule(schedule: str, *, router: str = "gshard", layers: int = 6, experts: int = 8, budget: int | None = None,
                   lo: int = 1, hi: int = 4, steps: int = 150, seed: int = 0, d: int = 32, ffn: int = 32,
                   vocab: int = 16, seq: int = 24, batch: int = 16, lr: float = 3e-3, eval_batches: int = 8) -> dict:
    """Train one single-process tiny MoE LM whose per-layer capacity follows ``schedule`` (total ``budget``,
    default 2 per layer) and return {"schedule", "caps", "final_loss" (held-out, nats), "train_loss", "mean_k"}."""
    import torch

    from adasched.runtime.moe.lm import MarkovTask, TinyMoELM, lm_loss

    routers, caps = layer_routers(router, schedule, layers, experts, budget=budget, lo=lo, hi=hi)
    torch.set_num_threads(1)                 # tiny matrices: extra threads only add synchronisation
    torch.manual_seed(seed)
    model = TinyMoELM(vocab, d, 4, ffn, routers, max_len=seq)
    model.init_experts(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    task = MarkovTask(vocab)
    gen = torch.Generator().manual_seed(seed)
    train = []
    for _ in range(steps):
        x, y = task.batch(gen, batch, seq)
        opt.zero_grad()
        loss = lm_loss(model(x), y)
        (loss + model.aux_loss()).backward()
        opt.step()
        train.append(float(loss.detach()))
    model.eval()
    held = torch.Generator().manual_seed(99991)
    with torch.no_grad():
        ev = [float(lm_loss(model(x), y)) for x, y in (task.batch(held, batch, seq) for _ in range(eval_batches))]
        stats = model.layer_stats()
    return {"schedule": schedule, "caps": caps, "final_loss": sum(ev) / len(ev),
            "first_loss": sum(train[:5]) / len(train[:5]),
            "train_loss": sum(train[-10:]) / len(train[-10:]), "mean_k": [round(s["mean_k"], 3) for s in stats],
            "floor_nats": task.floor_nats(seq)}


def compare_schedules(schedules=None, *, quick: bool = False, seeds=None, log=None, **kw) -> dict:
    """Every capacity schedule at equal budget and seeds; rows sorted as given, with the mean held-out loss and
    its ratio to uniform's. Differences within the seed spread are noise: ``spread`` is reported."""
    from adasched.schedules.capacity import CAPACITY_SCHEDULES

    schedules = list(schedules or CAPACITY_SCHEDULES)
    seeds = list(seeds if seeds is not None else ((0,) if quick else (0, 1)))
    kw.setdefault("steps", 100 if quick else 300)
    rows = []
    for name in schedules:
        t0 = time.perf_counter()
        runs = [train_schedule(name, seed=s, **kw) for s in seeds]
        losses = [r["final_loss"] for r in runs]
        rows.append({"schedule": name, "caps": "/".join(map(str, runs[0]["caps"])),
                     "held_out_loss": round(sum(losses) / len(losses), 4),
                     # (one seed measures no spread: 0.0 read as "every difference is significant")
                     "seed_spread": round(max(losses) - min(losses), 4) if len(losses) > 1 else None,
                     "seconds": round(time.perf_counter() - t0, 1)})
        if log:
            log(f"[schedules] {name}: caps {rows[-1]['caps']} held-out loss {rows[-1]['held_out_loss']}")
    base = next((r["held_out_loss"] for r in rows if r["schedule"] == "uniform"), None)
    for r in rows:
        r["vs_uniform"] = round(r["held_out_loss"] / base, 4) if base else None
    best = min(rows, key=lambda r: r["held_out_loss"])
    return {"rows": rows, "best": best["schedule"], "seeds": seeds, "steps": kw["steps"],
            "floor_nats": runs[0]["floor_nats"],
            "note": "tiny order-2 Markov LM, gshard top-k per layer from the schedule, equal total k; "
                    + ("differences below seed_spread are not significant" if len(seeds) > 1 else
                       "one seed: no spread measured, so no difference is known to be significant")}


def _check_sizes(args, world: int) -> None:
    """Every size and rate a worker would trip over, checked before any process group (ValueError naming the
    option): all of these failed on every rank, some with a traceback, or trained on NaNs (--batch 0). --vocab >= 3:
    the Markov task gives every context 3 successors (--vocab 2 passed here and then failed on every worker)."""
    import math

    from adasched.profiler.io import check_distinct_outputs, check_output_path
    from adasched.runtime.dist import env_int

    for opt, low in (("layers", 1), ("experts", 1), ("d", 1), ("heads", 1), ("ffn", 1), ("vocab", 3), ("seq", 2),
                     ("batch", 1), ("steps", 1), ("r_fwd", 1), ("r_bwd", 1), ("gpus_per_node", 1)):
        v = getattr(args, opt)
        if v < low:
            name = "--hidden" if opt == "d" else f"--{opt.replace('_', '-')}"
            raise ValueError(f"{name}: {v} must be >= {low}")
    from adasched.planner.fsmoe.plan import MAX_CHUNKS

    for opt in ("r_fwd", "r_bwd"):  # every chunk issues its all-to-alls, even empty ones (10**5 ran for minutes)
        if getattr(args, opt) > MAX_CHUNKS:
            raise ValueError(f"--{opt.replace('_', '-')}: {getattr(args, opt)} must be <= {MAX_CHUNKS}")
    if not 0 <= args.seed <= MAX_SEED:  # 10**20 passed --validate-only, then every worker failed on 1000 * seed
        raise ValueError(f"--seed: {args.seed} must be in 0..{MAX_SEED}")
    if args.layers > MAX_LAYERS:  # 10**20 hung building the per-layer schedule
        raise ValueError(f"--layers: {args.layers} must be <= {MAX_LAYERS}")
    if args.shared_experts < 0:
        raise ValueError(f"--shared-experts: {args.shared_experts} must be >= 0")
    if args.d % args.heads:
        raise ValueError(f"--hidden: {args.d} is not divisible by --heads {args.heads}")
    # a lower bound of one rank's parameters: every rank builds every expert before keeping its shard
    # (init_experts), a switch schedule up to --cap-hi experts per layer; fp32 weights, gradients, AdamW's 2 states
    experts = max(args.experts, args.hi or 0)
    params = (args.layers * (4 * args.d * args.d + 2 * args.d * args.ffn * (experts + args.shared_experts))
              + (args.vocab + args.seq) * args.d)
    ranks = min(world, env_int("LOCAL_WORLD_SIZE", world))  # the ranks on this host
    check_model_memory(params, 16, ranks, "--vocab/--hidden/--layers/--ffn/--experts/--cap-hi/--shared-experts/--seq",
                       "weights, gradients and AdamW state")
    # a step's fp32 activations kept for the backward, at least: the logits and, per layer, the attention block's
    # q, k, v, output and residual and the expert FFN's hidden (a batch of 10**20 passed and failed in training)
    act = args.batch * args.seq * (args.vocab + args.layers * (5 * args.d + args.ffn)) * 4 * max(1, ranks)
    check_host_memory(act, "--batch/--seq", f"{args.batch} x {args.seq} tokens per rank keep at least "
                                            f"{act / 2**30:,.1f} GiB of activations on {ranks} rank(s)")
    if args.global_batch is not None:  # every rank draws the whole global batch (int64 tokens, a few temporaries)
        drawn = args.global_batch * (args.seq + 1) * 8 * 4 * max(1, ranks)
        check_host_memory(drawn, "--global-batch/--seq", f"every rank draws all {args.global_batch} x {args.seq} "
                                                         f"tokens: at least {drawn / 2**30:,.1f} GiB on {ranks} "
                                                         f"rank(s)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr: {args.lr} must be a positive number")
    if args.capacity_factor is not None and not (math.isfinite(args.capacity_factor) and args.capacity_factor > 0):
        raise ValueError(f"--capacity-factor: {args.capacity_factor} must be a finite number > 0 (omit it for dropless)")
    if not 0 < args.top_p <= 1:  # NaN too
        raise ValueError(f"--top-p: {args.top_p} must be in (0, 1]")
    if args.hierarchical and world > 1 and world % min(args.gpus_per_node, world):
        raise ValueError(f"--gpus-per-node: {world} ranks do not split into nodes of {args.gpus_per_node}")
    check_output_path(args.router_stats_out, "--router-stats-out")
    # (the same file as --plan: the statistics replaced the plan the run trained from, exit 0)
    check_distinct_outputs(("--router-stats-out", args.router_stats_out), inputs=(("--plan", args.plan),))


def _strict_json(obj, **kw) -> str:
    """JSON with NaN and infinities as null (json.dumps wrote NaN, which strict parsers refuse)."""
    from adasched.profiler.io import finite_json

    return json.dumps(finite_json(obj), allow_nan=False, **kw)


def _world_from_env() -> int:
    """WORLD_SIZE (torchrun's; train_moe.sh sets it from NPROC for its pre-check), default 1; ValueError naming it
    when it is not a whole number >= 1 (int() said "invalid literal for int() with base 10: 'abc'")."""
    import os

    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise ValueError(f"WORLD_SIZE: {raw!r} is not a whole number >= 1 (train_moe.sh sets it from NPROC)")
    return world


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _main(args)
    except ValueError as err:          # InputError is a ValueError: one line, exit 2
        if reports_errors():
            print(f"error: {err}", file=sys.stderr)
        return 2


def _main(args) -> int:
    from adasched.runtime.moe.router import ROUTER_KINDS
    from adasched.schedules.capacity import CAPACITY_SCHEDULES

    def log(msg):
        if not args.json:
            print(msg, flush=True)

    def status(msg):                                   # rank 0's notes; stdout stays one JSON object with --json
        if is_rank0():
            print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    if args.plan is not None:  # (read as Path(""), ".": the error said '.: is a directory')
        if not args.plan.strip():
            raise InputError("--plan", "is empty")
        args.plan = Path(args.plan)
    ck_cfg = checkpoint_config(args)                   # InputError naming the option
    for opt, given, needs, why in (                   # accepted and silently unused before: refused
            ("--plan-config", args.plan_config is not None and args.plan is None, "--plan",
             "it names a configuration inside the plan"),
            ("--quick", args.quick and not args.compare_schedules, "--compare-schedules",
             "a training run takes --steps"),
            ("--gpus-per-node", getattr(args, "gpus_per_node_given", False) and not args.hierarchical,
             "--hierarchical", "it is the node size of the two-step all-to-all; the flat one has none")):
        if given:
            raise ValueError(f"{opt}: has no effect without {needs} ({why})")
    if args.plan is not None:
        for dest in ("r_fwd", "r_bwd", "wgrad"):
            if dest in getattr(args, "given", {}):
                raise ValueError(f"{args.given[dest]}: not with --plan, which sets it per layer (the option "
                                 f"would be ignored)")
    if args.compare_schedules:
        for opt, given in (("--checkpoint-dir", ck_cfg is not None), ("--lr-schedule", args.lr_schedule != "constant"),
                           ("--warmup-steps", args.warmup_steps != 0),
                           ("--global-batch", args.global_batch is not None)):
            if given:
                raise ValueError(f"{opt}: not used by --compare-schedules (single-process, one model per capacity "
                                 f"schedule at a constant --lr); drop it or train with --router/--schedule")
        # every other option was accepted and ignored (its own model, steps and seeds): refused
        given = getattr(args, "given", {})
        unused = [given[d] for d in given if d not in ("compare_schedules", "quick", "json", "validate_only")]
        if unused:
            raise ValueError(f"{unused[0]}: not used by --compare-schedules (it trains its own "
                             f"tiny models: {'1 seed x 100' if args.quick else '2 seeds x 300'} steps per capacity "
                             f"schedule; only --quick and --json apply)")
        if args.validate_only:  # (ran the whole comparison)
            return 0
        res = compare_schedules(quick=args.quick, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(_strict_json(res) if args.json else _strict_json(res, indent=1))
        return 0
    routers = _names(args.router, ROUTER_KINDS, "--router")
    schedules = _names(args.schedule, CAPACITY_SCHEDULES, "--schedule")
    if ck_cfg is not None and len(routers) * len(schedules) != 1:
        raise ValueError(f"--checkpoint-dir: a checkpoint holds one run; give one --router and one --schedule (got "
                         f"{len(routers)} x {len(schedules)} combinations)")
    env_world = _world_from_env()
    if args.global_batch is not None:
        if args.batch_given:
            raise ValueError("--global-batch: give --batch (sequences per rank) or --global-batch (over all ranks), "
                             "not both")
        if args.global_batch < 1 or args.global_batch % max(1, env_world):
            raise ValueError(f"--global-batch: {args.global_batch} must be a positive multiple of the {env_world} "
                             f"rank(s)")
        args.batch = args.global_batch // max(1, env_world)
    _check_sizes(args, env_world)
    check_lr_schedule(args, args.steps)
    env_ep = ep_size_for(args, env_world)
    if "top_p" in getattr(args, "given", {}) and "top_p" not in routers:  # (accepted and unused before)
        raise ValueError(f"--top-p: has no effect without a top_p --router (it is that router's threshold; "
                         f"--router {args.router})")
    if args.hierarchical and env_ep == 1:
        raise ValueError("--hierarchical: has no effect with an expert-parallel group of 1 rank (nothing is "
                         "exchanged); drop it, or run more ranks / a larger --ep-size")
    if args.hierarchical and env_ep > 1 and env_ep % min(args.gpus_per_node, env_ep):
        raise ValueError(f"--gpus-per-node: an expert-parallel group of {env_ep} ranks does not split into nodes of "
                         f"{args.gpus_per_node}")
    for r in routers:                                 # validate every combination before any process group
        for s in schedules:
            layer_routers(r, s, args.layers, args.experts, budget=args.budget, lo=args.lo, hi=args.hi,
                          ep_size=env_ep, capacity_factor=args.capacity_factor, top_p=args.top_p)
    planned = _plan_pipeline(args, env_ep, args.layers, env_world)
    ckpt, saved = None, None
    if ck_cfg is not None:                            # before any process group: a mismatch is one line, exit 2
        from adasched.runtime.checkpoint import check_resumable, find_checkpoint

        ckpt = (ck_cfg, run_identity(args, routers[0], schedules[0], env_ep, env_world))
        saved = find_checkpoint(ck_cfg.folder, ck_cfg.load_step)
        if saved is not None:
            check_resumable(saved, env_world, ckpt[1], LAYOUT_KEYS)
            # (it returned 0 and wrote nothing: a stale file read as this run's; train_moe.sh's pre-check too)
            if saved.step >= args.steps and args.router_stats_out is not None:
                raise ValueError(f"--router-stats-out: nothing would be trained ({saved.path} is step {saved.step}, "
                                 f"--steps {args.steps}), so no statistics would be written to "
                                 f"{args.router_stats_out}; raise --steps")
    if args.validate_only:
        if ck_cfg is not None:  # (the ranks' lock: one line in the pre-check, not inside torchrun)
            from adasched.runtime.checkpoint import check_folder_free

            check_folder_free(ck_cfg.folder)
        return 0
    from adasched.runtime.dist import init_distributed

    rank, world = init_distributed("gloo", timeout_s=120)
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    # every rank parsed its own command line and read --plan itself (torchrun per node): a rank with another
    # --steps or --lr trained on or waited in a collective; paths may differ between nodes, what they hold may not
    from adasched.runtime.dist import check_same_on_every_rank

    if world > 1:
        # (compared resolved: the checkpoint options as checkpoint_config made them, the plan's configuration as
        # run_identity resolved it; --json only changes what rank 0 prints)
        skip = ("given", "gpus_per_node_given", "batch_given", "plan", "plan_config", "router_stats_out", "json",
                "checkpoint_dir", "checkpoint_every", "checkpoint_keep", "checkpoint_async", "load_step")
        check_same_on_every_rank({**{k: v for k, v in vars(args).items() if k not in skip},
                                  "checkpoint": checkpoint_identity(ck_cfg),
                                  **run_identity(args, routers[0], schedules[0], env_ep, env_world)},
                                 str(args.plan) if args.plan is not None else "train_moe")

    if ckpt is not None:
        # a save at or past --steps is decided once every rank sees it (on nodes without a shared file system
        # they may not: then the first run's Checkpointer.resume refuses with one line). Decided before the
        # process group, rank 0 returned while the others waited for it in init_process_group until its timeout
        views = [None] * world
        dist.all_gather_object(views, None if saved is None else saved.step)
        if saved is not None and saved.step >= args.steps and all(v == saved.step for v in views):
            status(f"nothing left to train: {saved.path} is step {saved.step} and --steps is {args.steps}")
            if args.json and is_rank0():              # --json: stdout is still one JSON object, with no runs
                two_step = bool(args.hierarchical and env_ep > 1)
                print(_strict_json({"world": env_world, "ep_size": env_ep, "two_step": two_step,
                                  "exchange_gpus_per_node": min(args.gpus_per_node, env_ep) if two_step else None,
                                  "expert_shards": args.expert_shards, "batch": args.batch,
                                  "global_batch": args.batch * env_world, "runs": [],
                                  "nothing_left": {"checkpoint": str(saved.path), "step": saved.step,
                                                   "steps": args.steps}}), flush=True)
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
            return 0
    if planned.shape_note:  # once, by the run that trains (not by train_moe.sh's pre-check, nor before an error)
        status(f"note: {planned.shape_note}")
    base_ep = make_ep(args, world)
    out = []
    try:
        for r in routers:
            for s in schedules:
                res = _train_one(args, r, s, rank, world, base_ep, log if rank == 0 else (lambda m: None),
                                 ckpt=ckpt, status=status)
                out.append(res)
    finally:
        # every rank leaves together: a rank tearing gloo down while its peer is still connected can abort
        import gc

        gc.collect()                                   # drop finished async-work handles while torch is alive
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    if rank == 0 and args.router_stats_out is not None and out:
        from adasched.profiler.io import atomic_write_json

        atomic_write_json(args.router_stats_out, {"mean_k_per_layer": out[-1]["mean_k_per_layer"],
                                                  "router": out[-1]["router"], "schedule": out[-1]["schedule"]})
    if rank == 0:
        for res in out:  # (a run that diverged printed NaN losses - and NaN into --json's "strict" JSON - exit 0)
            bad = next((i for i, v in enumerate(res.get("losses", [])) if not math.isfinite(v)), None)
            if bad is not None:
                status(f"note: {res['router']}/{res['schedule']}: the loss is not finite from step "
                       f"{res.get('start_step', 0) + bad} on (it diverged: lower --lr)"
                       + ("; --json writes it as null" if args.json else ""))
    if rank == 0 and args.json:
        hier = bool(base_ep is not None and base_ep.hierarchical)
        print(_strict_json({"world": world, "ep_size": base_ep.size if base_ep else 1, "two_step": hier,
                          "exchange_gpus_per_node": base_ep.gpus_per_node if hier else None,
                          "expert_shards": base_ep.shards if base_ep else 1, "batch": args.batch,
                          "global_batch": args.batch * world, "runs": out}))
    return 0


def _exit_worker(rc: int) -> None:
    """Leave a torchrun worker without interpreter finalisation: gloo's worker threads can still hold finished
    async-work objects whose destruction during finalisation aborts the process (SIGABRT, "terminate called
    without an active exception") after all work is done. Everything is flushed first."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    _rc = main()
    if "TORCHELASTIC_RUN_ID" in __import__("os").environ:
        _exit_worker(_rc)
    sys.exit(_rc)

"""`make demo` step: solve the FA3-style Hopper graph with Twill, print the schedule, draw it."""
from __future__ import annotations

from pathlib import Path


def run(out_dir: Path) -> None:
    from adasched.planner.plan import save_plan
    from adasched.planner.solver import SolveParams
    from adasched.planner.twill.plan import plan_twill
    from adasched.planner.twill.validator import validate

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_twill("fa3-hopper", "h100", SolveParams(time_limit=10.0, seed=0, threads=2))
    errs = validate(plan.graph, plan.machine, plan.model_dump(mode="json"))
    print(f"twill fa3-hopper on h100: I = {plan.ii} (MII {plan.mii}), status {plan.solver.status}, "
          f"solved in {plan.solver.solve_seconds:.2f} s, {plan.stages} stages, validator: "
          f"{'ok' if not errs else errs}")
    if errs:  # (it printed them and the demo still passed)
        raise RuntimeError(f"twill: the fa3-hopper schedule fails its validator: {errs[0]}")
    for g in plan.warp_groups:
        print(f"  WG{g.index} {g.role:8s} {' '.join(g.ops):16s} {g.regs} regs/thread")
    for o in sorted(plan.ops, key=lambda o: o.issue_cycle):
        print(f"  {o.name:3s} issue {o.issue_cycle:3d}  stage {o.stage}  residue {o.residue}  WG{o.warp_group}  "
              f"{'+'.join(o.units)}")
    print(f"  peeled into the prologue: {', '.join(plan.peeled)}; buffers: "
          f"{', '.join(f'{k}x{v}' for k, v in plan.buffers.items())}")
    k = plan.knobs
    print(f"  triton knobs: num_stages={k.num_stages} num_warps={k.num_warps} warp_specialize={k.warp_specialize} "
          f"maxnreg={k.maxnreg}; simulated {plan.sim_cycles_per_iteration:.2f} cycles/iteration (ASAP issue), "
          f"no-pipelining baseline {plan.baselines_ms['no-pipelining'] / plan.predicted_ms:.2f}x slower")
    save_plan(plan, out_dir / "twill-fa3.json")
    plan.plot(out_dir / "twill-fa3.png")
    print(f"  wrote {out_dir / 'twill-fa3.json'} and {out_dir / 'twill-fa3.png'}")


if __name__ == "__main__":  # the demo's own entry (its --help, demo-out/), as the other steps'
    import sys

    from adasched.launch.demo import main

    sys.exit(main(["twill", *sys.argv[1:]]))

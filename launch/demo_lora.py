"""`make demo` LoRA step: plan the Mix preset (4 jobs) against the mLoRA-style and sequential baselines, then
train the 2 adapters of the `tiny` preset on a tiny causal LM on CPU and save them in PEFT's format."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["run"]


def run(out_dir: Path) -> None:
    import torch

    from adasched.kernels.lora import backend_for
    from adasched.planner.lorafusion.cli import _comparison_rows
    from adasched.planner.lorafusion.jobs import build_workload, load_jobs
    from adasched.planner.lorafusion.plan import build_plan
    from adasched.planner.plan import save_plan
    from adasched.planner.ui import print_table
    from adasched.profiler.profile import load_profile
    from adasched.runtime.lora_model import TinyCausalLM, TinyLMConfig
    from adasched.runtime.lora_trainer import SyntheticLoRAData, build_adapters, save_adapters, train_plan

    out = Path(out_dir) / "lora"
    profile = load_profile("h100-sxm")

    # 1. plan the Mix preset and compare with the baselines (simulated 1F1B, same samples, same costs)
    cfg, base, label = load_jobs("mix")
    plan = build_plan(build_workload(cfg, base, label=label), profile, time_limit=0.25)
    save_plan(plan, out / "mix-plan.json")
    s = plan.summary
    print_table(_comparison_rows(plan), ["schedule", "makespan ms", "tokens/s", "padding waste", "microbatches",
                                         "time vs plan"], title="LoRA Mix preset on h100-sxm (simulated 1F1B, S=4)")
    print(f"speedup vs mLoRA-style {s.speedup_vs_mlora:.2f}x, vs sequential {s.speedup_vs_sequential:.2f}x, "
          f"padding waste {s.padding_waste:.2%}, solve p95 {s.solve_seconds_p95:.2f} s, "
          f"missing/duplicated {s.samples_missing}/{s.samples_duplicated}; plan: {out / 'mix-plan.json'}")
    if s.samples_missing or s.samples_duplicated:  # (printed, and the demo still passed)
        raise RuntimeError(f"lora: the Mix plan misses {s.samples_missing} and duplicates {s.samples_duplicated} "
                           f"samples")

    # 2. train the tiny preset's 2 adapters by executing its plan on CPU
    cfg, base, label = load_jobs("tiny")
    tiny = build_plan(build_workload(cfg, base, label=label), profile, time_limit=0.1)
    torch.manual_seed(0)
    model = TinyCausalLM(TinyLMConfig())
    adapters = build_adapters(model, tiny, seed=0)
    backend = backend_for(torch.zeros(1))
    res = train_plan(model, adapters, tiny, SyntheticLoRAData(model.cfg.vocab_size), fused=True)
    save_adapters(out / "adapters", tiny, adapters, result=res)
    print(f"trained {len(tiny.jobs)} adapters over {len(tiny.microbatches)} microbatches "
          f"(multi-LoRA backend: {backend}; 'torch' = reference fallback without a GPU or TRITON_INTERPRET=1)")
    print(json.dumps({"losses_per_global_batch": res.by_job(tiny),
                      "optimizer_steps": {tiny.jobs[j].name: n for j, n in sorted(res.steps.items())}}))
    print(f"PEFT adapters: {', '.join(str(out / 'adapters' / j.name) for j in tiny.jobs)}")


if __name__ == "__main__":  # the demo's own entry (its --help, demo-out/), as the other steps'
    import sys

    from adasched.launch.demo import main

    sys.exit(main(["lora", *sys.argv[1:]]))

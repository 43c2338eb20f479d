"""LoRAFusion multi-job LoRA planner: jobs files and presets (jobs), stage costs (costmodel), grouping, packing
MILPs, merge pass, dependency rule and verifier (model), mLoRA-style and sequential baselines (baselines), the
"lora" plan kind (plan) and the `plan lora` / `bench lora` commands (cli)."""
__all__ = ["jobs", "costmodel", "model", "baselines", "plan"]

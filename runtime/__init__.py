"""adasched.runtime: executes plans with torch.distributed.

Submodules (imported on demand, so `import adasched.runtime` stays free of torch):
- dist: init_distributed, free_port, spawn_gloo (N local gloo ranks for tests)
- pg_pool: buddy_groups, ProcessGroupPool, get_pool (buddy-aligned groups, created once, cached)
- ulysses: ulysses_attention (variable-degree Ulysses SP over packed variable-length sequences)
- sp_model: TinyGPT whose attention runs on the SP group chosen per micro-batch
- moe: MoE layer with expert parallelism
"""
__all__ = ["dist", "pg_pool", "ulysses", "sp_model", "moe"]

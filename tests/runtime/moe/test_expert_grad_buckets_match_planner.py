"""The planner's expert-gradient bucket rule (planner.fsmoe.costmodel.expert_grad_buckets: a layer's expert
gradients are ready when its MoE backward ends; once >= bucket elements wait, all of them go in one all-reduce)
against the runtime's ExpertGradReducer on the real EP path (TinyMoELM with ExpertParallel on a 1-rank gloo group;
its expert-data-parallel group set to that rank so the reducer launches buckets). The bucket size is chosen so the
order of the per-parameter hooks decides: with w2's hook first the runtime would launch 1 + 1/3 layers and leave
w1 waiting. The planner's launches (sizes and the layer whose MoE backward they follow) must be the runtime's."""
from __future__ import annotations

import torch
import torch.distributed as dist

from adasched.planner.fsmoe.costmodel import expert_grad_buckets


def test_runtime_buckets_are_the_planners(tmp_path):
    from adasched.runtime.moe import ExpertGradReducer, ExpertParallel
    from adasched.runtime.moe.lm import TinyMoELM
    from adasched.runtime.moe.router import RouterConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ep = ExpertParallel.create(8)
        ep.expert_dp_group = dist.group.WORLD            # a (1-rank) copy group: the reducer launches buckets
        torch.manual_seed(3)
        layers = 4
        model = TinyMoELM(32, 8, 2, 16, [RouterConfig(num_experts=8) for _ in range(layers)], ep=ep)
        params = model.expert_parameters()                # forward order: w1, w2 per layer
        assert len(params) == 2 * layers
        per_layer = params[0].numel() + params[1].numel()
        assert params[0].numel() != params[1].numel()     # w1 (SwiGLU: 2 ffn columns) is twice w2
        bucket = int(1.25 * per_layer)                    # < w2 + one waiting layer, < two layers
        done = []                                         # expert parameters whose gradient is accumulated
        for i, p in enumerate(params):                    # registered before the reducer's hooks: run first
            p.register_post_accumulate_grad_hook(lambda _p, i=i: done.append(i))
        red = ExpertGradReducer(params, ep, bucket_elements=bucket)
        launches = []
        orig = red._launch

        def launch(upto):
            launches.append((len(done) // 2, upto - red._done))   # (MoE layers done, elements)
            orig(upto)

        red._launch = launch
        x = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(4))
        model(x).square().mean().backward()
        during = list(launches)
        red.finish()
        at_finish = launches[len(during):]
        planned, rest = expert_grad_buckets([float(per_layer)] * layers, bucket)
        # planner: launched[j] at the end of backward position j (j + 1 layers done)
        assert during == [(j + 1, int(x)) for j, x in enumerate(planned) if x > 0]
        assert during == [(2, 2 * per_layer), (4, 2 * per_layer)] and rest == 0 and at_finish == []
        assert sum(p.grad.numel() for p in params) == sum(n for _, n in during)
    finally:
        dist.destroy_process_group()

"""DeepSpeed's engine on a model with expert-parallel :class:`~adasched.runtime.moe.layer.MoELayer` s.

DeepSpeed recognises an expert parameter by ``allreduce = False`` (``deepspeed.moe.utils.is_moe_param``, which our
layers set), then looks up everything else by the parameter's ``group_name``: the expert-data-parallel group its
gradient is summed over (``deepspeed.utils.groups._get_expert_data_parallel_group(name)``, name ``"ep_size_<P>"``),
the group its weights are broadcast over at ``deepspeed.initialize``, and the ZeRO-1/2 partition group of the
optimizer param group called ``name`` (a param group marked ``"moe": True``). It treats a model as an MoE model only
if one of its modules is a DeepSpeed ``MoE``. Untouched, ``deepspeed.initialize`` of our model fails (AttributeError:
'group_name', while broadcasting the weights).

:func:`prepare_for_deepspeed` does what DeepSpeed's own ``MoE`` layers do at construction, with *our* groups:

1. registers every distinct :class:`~adasched.runtime.moe.ep.ExpertParallel` of the model's layers in DeepSpeed's
   group registry under ``"ep_size_<P>"`` - its EP group and its expert-data-parallel group (the ranks holding the
   same experts; without copies, a one-rank group per rank, created here collectively) - so DeepSpeed creates no
   groups of its own (its default layout is ours: contiguous EP groups, expert-DP groups strided by P);
2. tags each expert shard (``w1``/``w2``) with ``group_name``;
3. gives each such layer a parameterless ``deepspeed_moe`` marker child, an instance of DeepSpeed's ``MoE`` (its
   constructor and forward never run), so the engine turns on its MoE paths: expert gradients summed over the
   expert-data-parallel group and divided by the data-parallel size (our
   :class:`~adasched.runtime.moe.ep.ExpertGradReducer`'s arithmetic), expert param groups partitioned over that group
   under ZeRO-1/2;
4. returns optimizer param groups: the dense parameters, then one ``{"moe": True, "name": "ep_size_<P>"}`` group
   per EP size (DeepSpeed's ``split_params_into_different_moe_groups_for_optimizer`` layout).

Use::

    ep = ExpertParallel.create_groups(num_experts=8, ep_size=2)     # every rank; data parallel over the world
    model = MyModel(..., ep=ep)                                      # MoELayer(..., ep=ep) without a reducer
    groups = prepare_for_deepspeed(model)                           # every rank, before deepspeed.initialize
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-3),
                                             config={..., "zero_optimization": {"stage": 2}})
    loss = engine(x) ...; engine.backward(loss); engine.step()

The engine then reduces every gradient itself: do not give the layers a ``GradSliceReducer`` nor use an
``ExpertGradReducer`` (ValueError for a layer with a reducer). The data-parallel group must be the world (DeepSpeed
averages the dense gradients over its data-parallel group, the world when no ``mpu`` is given). ZeRO stages 0, 1
and 2 are tested (``tests/runtime/moe/test_deepspeed_ep.py``, fp32), also with frozen parameters and with the config's
``gradient_clipping``: ZeRO-1/2 clip by the global norm (each expert once: ``engine.get_global_grad_norm()`` equals
the float64 reference's); ZeRO-0 clips with DeepSpeed's ``clip_grad_norm_``, by the mean over the ranks of each
rank's local norm (dense + its own experts), not the global norm (``get_global_grad_norm()`` is None there): use
ZeRO-1/2 when clipping must match a single-process run. Also tested: ZeRO-2 with ``overlap_comm`` and small
buckets, ZeRO-1 with ``gradient_predivide_factor``. ZeRO-2 refuses ``contiguous_gradients: false`` and a predivide
factor other than 1 with MoE; ZeRO-1 with ``contiguous_gradients: false`` (DeepSpeed's "experimental" MoE path)
gave wrong expert gradients and weights in the test: keep the default. ZeRO-3 refuses DeepSpeed's native MoE
layers, as which ours are marked (AssertionError "Native DeepSpeed MoE is not supported with ZeRO Stage 3").
DeepSpeed checkpoints are not supported: ``engine.save_checkpoint`` writes per-expert files only for its own
``MoE`` layers' expert parameters (none here; its model file, from data-parallel rank 0, holds rank 0's shard),
and ``engine.load_checkpoint`` then fails (FileNotFoundError: ``layer_0_expert_<i>_mp_rank_00_model_states.pt``) -
save each rank's ``model.state_dict()`` instead.
The registry and the ``MoE`` marker are DeepSpeed internals (``deepspeed.utils.groups`` private dictionaries),
checked against DeepSpeed 0.19.8.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .ep import ExpertParallel
from .layer import MoELayer

__all__ = ["prepare_for_deepspeed", "deepspeed_group_name"]


def deepspeed_group_name(ep: ExpertParallel) -> str:
    """DeepSpeed's name of an expert-parallel layout: ``"ep_size_<P>"`` (its registry is keyed by the EP size)."""
    return _group_name(ep.size)


def _group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def _marker_class():
    """A parameterless subclass of DeepSpeed's ``MoE`` (built on first use: importing DeepSpeed is slow). The engine
    counts a model as MoE when one of its modules is an ``MoE``, reads ``num_experts`` and calls
    ``set_deepspeed_parallelism`` (here: only a check that the registered groups are still ours)."""
    global _Marker
    if _Marker is not None:
        return _Marker
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        """Marks an :class:`MoELayer` as an MoE layer for DeepSpeed's engine; holds nothing, computes nothing."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)              # not MoE.__init__: no gate, no experts, no group creation
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = _group_name(ep_size)
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            from deepspeed.utils import groups

            if use_data_before_expert_parallel_:
                raise ValueError("use_data_before_expert_parallel_: adasched's EP groups are contiguous "
                                 "(expert-data-parallel groups strided by the EP size); leave it False")
            if self.expert_group_name not in groups._get_expert_parallel_group_dict():
                raise ValueError(f"{self.expert_group_name}: not in DeepSpeed's group registry: call "
                                 "prepare_for_deepspeed(model) before deepspeed.initialize")

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker only marks an MoELayer for DeepSpeed's engine; it has no forward")

        def extra_repr(self) -> str:
            return f"num_experts={self.num_experts}, ep_size={self.ep_size}"

    DeepSpeedMoEMarker.__module__ = __name__
    DeepSpeedMoEMarker.__qualname__ = "DeepSpeedMoEMarker"   # pickled by name: found through __getattr__ below
    _Marker = DeepSpeedMoEMarker
    return _Marker


_Marker = None


def __getattr__(name: str):
    """``DeepSpeedMoEMarker`` on first use (so unpickling a prepared model finds the class)."""
    if name == "DeepSpeedMoEMarker":
        return _marker_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register(name: str, ep: ExpertParallel, singleton) -> None:
    """Put ``ep``'s groups in DeepSpeed's registry under ``name``; an entry already there must hold the same ranks."""
    from deepspeed.utils import groups

    edp_group = ep.expert_dp_group if ep.expert_dp_group is not None else singleton
    for what, gdict, rdict, group, ranks in (
            ("expert-parallel", groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, ep.group,
             ep.ranks),
            ("expert-data-parallel", groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
             edp_group, ep.expert_dp_ranks)):
        if name in gdict:
            have = list(rdict.get(name, dist.get_process_group_ranks(gdict[name])))
            if have != list(ranks):
                raise ValueError(f"model: DeepSpeed already has an {what} group {name!r} with ranks {have}, this "
                                 f"rank's layers use {list(ranks)}")
            continue
        gdict[name] = group
        rdict[name] = list(ranks)


def prepare_for_deepspeed(model: nn.Module, param_groups=None) -> list[dict]:
    """Make ``model`` (with expert-parallel :class:`MoELayer` s) trainable by ``deepspeed.initialize``: register the
    layers' process groups in DeepSpeed's registry, tag the expert shards with ``group_name``, mark the layers as MoE
    for the engine (module docstring); returns optimizer param groups for ZeRO-0/1/2.

    Collective (every rank calls it, before ``deepspeed.initialize``; it creates one-rank groups when the experts
    have no copies). ``param_groups``: None (one group of every parameter) or torch optimizer param groups (a list of
    dicts with ``"params"`` and their options, or of parameters); each is split into its dense parameters and one
    ``{"moe": True, "name": "ep_size_<P>"}`` group per EP size, options kept; a group without a trainable
    parameter is left out, and a layer whose expert shards are all frozen is not marked as MoE (ZeRO-1/2 fail on an
    empty group, and on MoE layers without an MoE group). Idempotent. ValueError naming the
    problem when a layer has a dense-gradient ``reducer`` (the engine reduces), shards its experts
    (``expert_shards`` > 1: not supported), the data-parallel group is not the world, or two layers' EP groups of
    one size hold different ranks. A model without expert-parallel layers gets
    its groups back as they are (each given a ``"name"``; one group without ``param_groups``), nothing registered.
    """
    eps: dict[str, ExpertParallel] = {}
    layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.ep is not None]
    for m in layers:
        ep = m.ep
        if m.reducer is not None:
            raise ValueError("model: an expert-parallel MoELayer has a reducer (GradSliceReducer); DeepSpeed's engine "
                             "reduces the gradients itself: build the layers with reducer=None")
        if ep.shards > 1:
            raise ValueError(f"model: an MoELayer shards its experts over {ep.shards} ranks (expert_shards); "
                             "DeepSpeed's MoE gradient handling knows whole experts per rank only: train it with "
                             "GradSliceReducer + ExpertGradReducer instead")
        if ep.dp_size != dist.get_world_size():
            raise ValueError(f"model: the EP layers' data-parallel group has {ep.dp_size} of {dist.get_world_size()} "
                             "ranks; DeepSpeed averages over the world (create_groups without group=)")
        name = deepspeed_group_name(ep)
        seen = eps.setdefault(name, ep)
        if (seen.ranks, seen.expert_dp_ranks) != (ep.ranks, ep.expert_dp_ranks):
            raise ValueError(f"model: two EP layouts named {name!r}: ranks {seen.ranks} / {ep.ranks}")
    if not layers:
        return _split_groups(model, param_groups)
    from deepspeed.utils import groups as ds_groups        # before any change: DeepSpeed must import
    singleton = None
    if any(ep.expert_dp_group is None and name not in ds_groups._get_expert_data_parallel_group_dict()
           for name, ep in eps.items()):                # the same on every rank: layouts and registry are global
        for r in range(dist.get_world_size()):                      # every rank creates every one-rank group
            g = dist.new_group([r])
            if r == dist.get_rank():
                singleton = g
    for name, ep in sorted(eps.items()):
        _register(name, ep, singleton)
    Marker = _marker_class()
    for m in layers:
        name = deepspeed_group_name(m.ep)
        m.w1.group_name = m.w2.group_name = name
        marked = isinstance(getattr(m, "deepspeed_moe", None), Marker)
        if m.w1.requires_grad or m.w2.requires_grad:
            if not marked:
                m.deepspeed_moe = Marker(m.ep.num_experts, m.ep.size)
        elif marked:            # frozen experts: no MoE group for them, so no marker (ZeRO asserts it has one)
            del m.deepspeed_moe
    return _split_groups(model, param_groups)


def _split_groups(model: nn.Module, param_groups) -> list[dict]:
    """Dense parameters in their groups, then per input group one MoE group per expert ``group_name``."""
    if param_groups is None:
        param_groups = [{"params": list(model.parameters())}]
    param_groups = list(param_groups)
    if param_groups and not isinstance(param_groups[0], dict):
        param_groups = [{"params": param_groups}]
    dense_out, moe_out = [], []
    for i, g in enumerate(param_groups):
        if not isinstance(g, dict) or "params" not in g:
            raise ValueError(f"param_groups[{i}]: not a dict with 'params'")
        params = [g["params"]] if isinstance(g["params"], nn.Parameter) else list(g["params"])
        options = {k: v for k, v in g.items() if k not in ("params", "moe")}
        by_name: dict[str, list] = {}
        dense = []
        for p in params:
            if getattr(p, "allreduce", True) is False and hasattr(p, "group_name"):
                by_name.setdefault(p.group_name, []).append(p)
            else:
                dense.append(p)
        dense_out.append({**options, "params": dense, "name": options.get("name", f"dense-{i}")})
        for name, ps in sorted(by_name.items()):
            moe_out.append({**options, "params": ps, "name": name, "moe": True})
    # a group without a trainable parameter is left out: ZeRO-1/2 drop frozen parameters and then fail on an empty
    # group (IndexError in Stage1And2ZeroOptimizer), e.g. the dense group when only the experts train
    return [g for g in dense_out + moe_out if any(p.requires_grad for p in g["params"])]

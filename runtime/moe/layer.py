"""MoE feed-forward layer: router + permute + grouped-GEMM experts + weighted combine, optionally expert-parallel.

Usage in any torch model::

    moe = MoELayer(hidden=512, ffn=1024, router=RouterConfig(kind="top_p", num_experts=8, k_max=4))
    y = moe(x)                        # x (..., hidden) -> y (..., hidden)
    loss = task_loss + moe.aux_loss   # load-balancing + z-loss (+ entropy for top_p), already weighted
    log(moe.last_stats.as_dict())     # tokens per expert, mean k, dropped, p
    log({k: v.item() for k, v in moe.last_losses.items()})   # unweighted load_balance / z_loss / entropy
    y = moe(x, token_mask=attention_mask)   # padding (0) is not routed: no capacity, losses or stats; output 0

Dropless mode: ``RouterConfig(capacity_factor=None)``; capacity (drop) mode: ``capacity_factor > 0``.
With ``ep=ExpertParallel.create(...)`` the layer holds only its rank's ``E / P`` experts (``w1``/``w2`` are the
local shards, experts ``expert_offset .. expert_offset + E/P - 1``) and runs the expert computation through
:func:`adasched.runtime.moe.ep.ep_experts` with pipeline degrees ``r_fwd``/``r_bwd``. EP smaller than the
data-parallel world: ``ep=ExpertParallel.create_groups(E, ep_size, ...)``; then reduce the dense gradients over
``ep.dp_group`` and the expert gradients with :class:`~adasched.runtime.moe.ep.ExpertGradReducer` (the two kinds:
:func:`split_parameters`); router statistics are reduced over ``ep.dp_group``. With DeepSpeed's engine, which reduces
both itself: :func:`adasched.runtime.moe.deepspeed_ep.prepare_for_deepspeed` before ``deepspeed.initialize``.

``shared_experts=n`` adds an always-on shared expert (DeepSeek-MoE style): one MLP of width
``n * shared_ffn`` (default ``shared_ffn = ffn``) on every token, its output added to the routed experts'.
Its weights (``shared_w1`` (1, hidden, .), ``shared_w2`` (1, ., hidden)) are replicated on every rank (dense
parameters for data parallelism). Expert-parallel, it runs while the first dispatches are in flight, forward
and backward.

``attach_aux_loss=True`` hangs the router losses on the layer's output instead (its backward adds their
gradient, as Megatron-core does): then do *not* add ``moe.aux_loss`` to the loss (it is detached, for logging).
Use it under reentrant activation checkpointing (``torch.utils.checkpoint(use_reentrant=True)``, DeepSpeed's and
Megatron's recompute): there the checkpointed forward runs under ``no_grad``, so the ``moe.aux_loss`` read after
it has no graph and the load-balancing / z / entropy terms would silently not train the router.
When the backward scales the loss (``GradScaler``, DeepSpeed's fp16 loss scale, a loss divided by the
gradient-accumulation steps), set ``moe.aux_loss_scale`` to that factor before the forward (Megatron-core's
``MoEAuxLossAutoScaler.set_loss_scale``): the attached gradient is ``aux_loss_scale``, as if the aux loss had been
added to the loss before the scaling (with the default 1 a GradScaler at 65536 weighted it 1/65536 after unscaling).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from adasched.kernels.moe import Backend, expert_mlp, make_index, permute, unpermute

from .ep import ExpertParallel, GradSliceReducer, check_pipeline_settings, ep_experts, shared_expert_index
from .router import Router, RouterConfig, RouterStats

__all__ = ["MoELayer", "named_parameters_by_kind", "split_parameters", "replica_divergence", "step_routers",
           "cut_experts"]


def _check_degrees(r_fwd, r_bwd) -> None:
    """Pipeline degrees (chunks per exchange) are ints >= 1: a bool, 2.5 or 0 is refused, naming the argument."""
    for name, r in (("r_fwd", r_fwd), ("r_bwd", r_bwd)):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{name}: {r!r} must be an int >= 1 (chunks per exchange)")


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the layer output whose backward also sends gradient ``scale`` into the aux loss (Megatron-core's
    MoEAuxLossAutoScaler idea): the aux loss trains the router whenever the output is backpropagated."""

    @staticmethod
    def forward(ctx, out, aux, scale: float):
        ctx.save_for_backward(aux)        # used by the backward: a traced (torch.compile) graph keeps its gradient
        ctx.scale = scale
        # a copy, not a view: a view made in a custom Function cannot be modified in place (``h = moe(x); h += x``
        # raised "Output 0 of View is a view and is being modified inplace")
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


class MoELayer(nn.Module):
    """Mixture-of-experts MLP. Parameters: ``router.proj`` (E, hidden) and expert weights
    ``w1`` (E_local, hidden, 2*f for SwiGLU / f for GELU), ``w2`` (E_local, f, hidden), f = ffn, or ffn / S when
    ``ep`` shards the experts over S ranks (``ffn_slice`` is this rank's part of the width)."""

    def __init__(self, hidden: int, ffn: int, router: RouterConfig, *, activation: str = "swiglu",
                 backend: Backend = "auto", ep: ExpertParallel | None = None, r_fwd: int = 1, r_bwd: int = 1,
                 reducer: GradSliceReducer | None = None, wgrad: str = "fused", order_fwd: str = "dispatch-first",
                 order_bwd: str = "dispatch-first", shared_experts: int = 0, shared_ffn: int | None = None,
                 attach_aux_loss: bool = False, router_update: str = "backward"):
        super().__init__()
        if not isinstance(attach_aux_loss, bool):
            raise ValueError(f"attach_aux_loss: {attach_aux_loss!r} must be True or False")
        if router_update not in ("backward", "step"):
            raise ValueError(f"router_update: {router_update!r} is not 'backward' or 'step'")
        #: when the router's state moves: "backward" (each backward of a training forward) or "step" (the
        #: statistics of every backward since the last :meth:`step_router` call, applied by that call, once per
        #: optimizer step as Megatron-core's expert-bias update: gradient accumulation does not multiply the rate)
        self.router_update = router_update
        self._pending: torch.Tensor | None = None     # "step": summed counts / [assignments, tokens] since the last step
        self.attach_aux_loss = attach_aux_loss
        #: with ``attach_aux_loss``: the factor the backward applies to the loss (loss scale / accumulation steps)
        self.aux_loss_scale = 1.0
        if shared_experts < 0 or (shared_ffn is not None and shared_ffn < 1):
            raise ValueError(f"shared_experts={shared_experts}, shared_ffn={shared_ffn}: need shared_experts >= 0 "
                             "and shared_ffn >= 1")
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation: {activation!r} is not 'swiglu' or 'gelu'")
        if hidden < 1 or ffn < 1:
            raise ValueError(f"hidden={hidden}, ffn={ffn}: sizes must be >= 1")
        if backend not in ("auto", "triton", "triton_gmm", "torch"):
            raise ValueError(f"backend: {backend!r} is not one of auto, triton, triton_gmm, torch")
        _check_degrees(r_fwd, r_bwd)
        E = router.num_experts
        if ep is not None and ep.num_experts != E:
            raise ValueError(f"ep.num_experts: {ep.num_experts} differs from router num_experts {E}")
        self.hidden, self.ffn, self.activation, self.backend = hidden, ffn, activation, backend
        self.ep, self.r_fwd, self.r_bwd, self.reducer = ep, r_fwd, r_bwd, reducer
        check_pipeline_settings(ep, wgrad=wgrad, order_fwd=order_fwd, order_bwd=order_bwd)
        self.wgrad, self.order_fwd, self.order_bwd = wgrad, order_fwd, order_bwd
        self.router = Router(hidden, router)
        self.router.deferred_updates = True       # the controller step is this layer's (_schedule_router_update)
        e_local = E if ep is None else ep.experts_per_rank
        self.expert_offset = 0 if ep is None else ep.rank * e_local
        #: this rank's slice of each expert's FFN width (all of it unless ``ep`` shards the experts)
        self.ffn_slice = slice(0, ffn) if ep is None else ep.shard_columns(ffn)
        f_local = self.ffn_slice.stop - self.ffn_slice.start
        cols = 2 * f_local if activation == "swiglu" else f_local
        self.w1 = nn.Parameter(torch.randn(e_local, hidden, cols) * hidden ** -0.5)
        self.w2 = nn.Parameter(torch.randn(e_local, f_local, hidden) * ffn ** -0.5)
        if ep is not None:     # sharded: not all-reduced over the data-parallel group (DeepSpeed's / Megatron's mark)
            self.w1.allreduce = self.w2.allreduce = False
        self.shared_w1 = self.shared_w2 = None
        if shared_experts:
            sf = shared_experts * (shared_ffn or ffn)
            scols = 2 * sf if activation == "swiglu" else sf
            self.shared_w1 = nn.Parameter(torch.randn(1, hidden, scols) * hidden ** -0.5)
            self.shared_w2 = nn.Parameter(torch.randn(1, sf, hidden) * sf ** -0.5)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_stats: RouterStats | None = None
        #: the last forward's unweighted router loss terms (detached 0-d tensors, for logging): "load_balance",
        #: "z_loss", "entropy" - those whose coefficient is > 0
        self.last_losses: dict[str, torch.Tensor] = {}

    def __getstate__(self):
        # a copy (copy.deepcopy, swa_utils.AveragedModel, pickle) keeps the last aux loss as a value: the live one
        # belongs to the autograd graph of the step that made it, and deepcopy refuses non-leaf tensors (a model
        # holding an MoELayer could not be deep-copied after any training forward)
        state = super().__getstate__()
        if isinstance(state.get("aux_loss"), torch.Tensor):
            state["aux_loss"] = state["aux_loss"].detach()
        return state

    def reset_parameters(self) -> None:
        """The constructor's initialisation again (experts normal(0, fan_in^-1/2), the router's weights and state):
        for meta-device construction, ``layer.to_empty(device=...)`` then ``layer.reset_parameters()`` (the
        torchtitan / FSDP2 init path); an expert-parallel rank draws its own experts from the current RNG."""
        with torch.no_grad():
            for w, fan_in in ((self.w1, self.hidden), (self.w2, self.ffn), (self.shared_w1, None),
                              (self.shared_w2, None)):
                if w is not None:
                    w.normal_(0.0, (fan_in or w.shape[1]) ** -0.5)
        self.router.reset_parameters()

    def set_pipeline(self, r_fwd: int, r_bwd: int, wgrad: str | None = None, order_fwd: str | None = None,
                     order_bwd: str | None = None) -> None:
        """Pipeline degrees (and, when given, the weight-gradient placement and the issue orders) from a plan (an
        FSMoE ``MoELayerPlan``'s r_fwd/r_bwd/wgrad_bwd/order_fwd/order_bwd)."""
        _check_degrees(r_fwd, r_bwd)  # as the constructor: 2.5 was truncated to 2
        check_pipeline_settings(self.ep, wgrad=wgrad, order_fwd=order_fwd, order_bwd=order_bwd)
        self.r_fwd, self.r_bwd = int(r_fwd), int(r_bwd)
        self.wgrad = wgrad or self.wgrad
        self.order_fwd = order_fwd or self.order_fwd
        self.order_bwd = order_bwd or self.order_bwd

    def load_full_experts(self, w1: torch.Tensor, w2: torch.Tensor) -> None:
        """Copy this rank's shard out of full (E, hidden, 2*ffn or ffn) / (E, ffn, hidden) expert weights: its
        experts and, when the experts are sharded (``ExpertParallel.shards`` > 1), its slice of their FFN width
        (for SwiGLU the same columns of the gate and the up half)."""
        with torch.no_grad():
            self.w1.copy_(self.local_experts(w1, "w1"))
            self.w2.copy_(self.local_experts(w2, "w2"))

    def local_experts(self, full: torch.Tensor, which: str) -> torch.Tensor:
        """This rank's part of a full expert tensor shaped like ``w1`` (E, hidden, 2*ffn or ffn) or ``w2`` (E, ffn,
        hidden) of all experts - the weights, or an optimizer's moments of them: :meth:`load_full_experts`'s cut
        (a resharded checkpoint resume builds the same part from the saved parts only:
        :func:`adasched.runtime.moe.reshard.gather_local_experts`)."""
        return cut_experts(full, which, self.activation, self.ffn, self.expert_offset, self.w1.shape[0],
                           self.ffn_slice)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., hidden) -> (..., hidden). ``token_mask`` (x.shape[:-1], bool or 0/1 integers such as an
        attention mask): only the True tokens are routed - padding takes no expert capacity and no part in the
        router losses, statistics and state steps; its output rows are 0."""
        shape = x.shape
        if shape[-1] != self.hidden:
            raise ValueError(f"input: last dim {shape[-1]} != hidden {self.hidden}")
        xt = x.reshape(-1, self.hidden)
        keep = None
        if token_mask is not None:
            if not isinstance(token_mask, torch.Tensor) or tuple(token_mask.shape) != tuple(shape[:-1]):
                got = tuple(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
                raise ValueError(f"token_mask: {got} must be a tensor of the input's shape without its last dim, "
                                 f"{tuple(shape[:-1])}")
            if token_mask.dtype.is_floating_point or token_mask.dtype.is_complex:
                raise ValueError(f"token_mask: dtype {token_mask.dtype} must be bool or an integer type (0 = pad)")
            if token_mask.device != x.device:
                raise ValueError(f"token_mask: on {token_mask.device}, the input on {x.device}")
            keep = token_mask.reshape(-1).ne(0).nonzero().squeeze(1)  # (a host sync: the routed row count)
            xt = xt.index_select(0, keep)
        routing = self.router(xt)
        self.last_stats = routing.stats
        self.last_losses = routing.losses
        out = self._dispatch(xt, routing)
        if self.training:
            self._schedule_router_update(routing)
        self.aux_loss = routing.aux_loss.detach() if self.attach_aux_loss else routing.aux_loss
        if keep is not None:
            out = out.new_zeros((math.prod(shape[:-1]), self.hidden)).index_copy(0, keep, out)
        return out.reshape(shape)

    @torch.compiler.disable
    def _schedule_router_update(self, routing) -> None:
        """The router's state step of a training forward (sigmoid_bias: the bias from the group's token counts;
        top_p with ``target_k``: the controller from the group's mean k). The group statistics are gathered here,
        in the forward (every rank runs it), and the step is applied once, when the gates' gradient reaches
        this layer in the backward. So an activation-checkpoint recompute (torch.utils.checkpoint, reentrant or
        not; Megatron/DeepSpeed recompute) routes with the state of the forward it replays, and the state moves
        once per training step as without checkpointing. A forward under ``torch.no_grad()`` (no backward to
        follow: evaluation in train mode, a reentrant checkpoint's first pass) leaves the state alone; one whose
        gates need no gradient (router and input frozen) applies the step at once."""
        if not torch.is_grad_enabled():                # same on every rank: no collective is skipped by one
            return
        # built (and reduced) on the tokens' device: an nccl group needs CUDA tensors, and reading the statistics
        # on the host synchronised the device at the end of every training forward of the layer
        stat = self._local_router_stat(routing)
        if stat is None:
            return
        if self.router_update == "step":
            def apply():                               # summed here, reduced and applied by step_router()
                self._pending = stat if self._pending is None else self._pending + stat
        else:
            if self.ep is not None:                    # every data-parallel rank's statistics: the state stays equal
                dist.all_reduce(stat, group=self.ep.dp_group)

            def apply():
                self._apply_router_stat(stat)
        if not routing.weight.requires_grad:
            apply()
            return
        done = []

        def hook(_grad):
            if not done:                               # once, also if the graph is backpropagated again
                done.append(True)
                apply()

        routing.weight.register_hook(hook)

    def _local_router_stat(self, routing) -> torch.Tensor | None:
        """This rank's statistic of one forward for the router's state step: the (E,) counts (sigmoid_bias) or
        [assignments, tokens] in float64 (top_p with ``target_k``); None when the router keeps no state."""
        if not self._router_has_state():
            return None
        if self.router.config.kind == "sigmoid_bias":
            return routing.counts.detach().clone()
        dev = routing.counts.device
        return torch.stack([routing.counts.sum().to(torch.float64),
                            torch.full((), float(routing.num_tokens), dtype=torch.float64, device=dev)])

    def _router_has_state(self) -> bool:
        """The router keeps a state its statistics move: sigmoid_bias's expert bias, top_p's controlled p."""
        cfg = self.router.config
        return cfg.kind == "sigmoid_bias" or (cfg.kind == "top_p" and cfg.target_k is not None)

    @torch.no_grad()
    def step_router(self) -> None:
        """``router_update="step"``: apply the router's state step from the statistics of every backward since the
        last call (summed, then reduced over the data-parallel group), and clear them; call it once per optimizer
        step on every rank (it is a collective with expert parallelism), e.g. through :func:`step_routers`. A rank
        with nothing pending contributes zeros; with nothing pending anywhere the state does not move. No-op with
        ``router_update="backward"`` (the state already moved in each backward)."""
        if self.router_update != "step" or not self._router_has_state():
            return
        cfg = self.router.config
        if cfg.kind == "sigmoid_bias":
            zero = torch.zeros(cfg.num_experts, dtype=torch.int64, device=self.router.expert_bias.device)
        else:
            zero = torch.zeros(2, dtype=torch.float64, device=self.router.p_threshold.device)
        stat = zero if self._pending is None else self._pending.to(zero.device, zero.dtype)
        self._pending = None
        if self.ep is not None:
            dist.all_reduce(stat, group=self.ep.dp_group)
        self._apply_router_stat(stat)

    def _apply_router_stat(self, stat: torch.Tensor) -> None:
        """The router's state step from a (reduced) statistic of :meth:`_local_router_stat`, without a host read. No
        tokens anywhere moves nothing: sign(0 - 0) = 0 for every expert; for top_p mean_k := target_k."""
        cfg = self.router.config
        if cfg.kind == "sigmoid_bias":
            self.router.update_bias(stat)
        else:
            mean_k = stat[0] / stat[1].clamp_min(1.0)
            self.router.controller_step(torch.where(stat[1] > 0, mean_k, torch.full_like(mean_k, cfg.target_k)))

    @torch.compiler.disable
    def _dispatch(self, xt: torch.Tensor, routing) -> torch.Tensor:
        """Tokens to their experts and back (permute, expert MLPs - all-to-alls with expert parallelism -,
        weighted unpermute). Its row counts depend on the routing's values, and its kernels launch with grids
        sized from them, so under torch.compile it runs eagerly between compiled graphs (the router and what
        surrounds the layer stay compiled)."""
        T = xt.shape[0]
        w1, w2, sw1, sw2 = self.w1, self.w2, self.shared_w1, self.shared_w2
        amp = xt.device.type if torch.is_autocast_enabled(xt.device.type) else None
        if amp is not None:
            # under torch.autocast the expert GEMMs run in the autocast dtype, as F.linear's do (our kernels are not
            # autocast ops themselves): operands cast here, differentiably (fp32 weights get fp32 gradients)
            dt = torch.get_autocast_dtype(amp)
            # (float64 stays float64, as autocast leaves it to F.linear: a float64 layer under autocast computed its
            # experts in bf16 and returned bf16, 8e-3 off, while its router stayed float64)
            cast = lambda t: t if t.dtype == torch.float64 else t.to(dt)  # noqa: E731
            xt, w1, w2 = cast(xt), cast(w1), cast(w2)
            if sw1 is not None:
                sw1, sw2 = cast(sw1), cast(sw2)
        index = make_index(routing.token_idx, routing.counts, T)
        rows = permute(xt, index, self.backend)
        has_shared = sw1 is not None
        y_shared = None
        if self.ep is None:
            y = expert_mlp(rows, w1, w2, index, self.activation, self.backend)
            if has_shared:
                y_shared = expert_mlp(xt, sw1, sw2, shared_expert_index(T, xt.device), self.activation, self.backend)
        else:
            y = ep_experts(rows, w1, w2, routing.token_idx, routing.expert_idx, T, self.ep,
                           r_fwd=self.r_fwd, r_bwd=self.r_bwd, activation=self.activation,
                           backend=self.backend, reducer=self.reducer, wgrad=self.wgrad,
                           order_fwd=self.order_fwd, order_bwd=self.order_bwd,
                           shared=(xt, sw1, sw2) if has_shared else None)
            if has_shared:
                y, y_shared = y
        out = unpermute(y, routing.weight.to(y.dtype), index, self.backend)
        if y_shared is not None:
            out = out + y_shared
        if self.attach_aux_loss and routing.aux_loss.requires_grad:
            # here, in eager code: under torch.compile an output that aliases its input (this identity) is
            # replayed as a view outside the graph, which dropped the aux loss's gradient
            scale = self.aux_loss_scale
            if isinstance(scale, torch.Tensor):
                scale = float(scale)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise ValueError(f"aux_loss_scale: {scale!r} must be a finite number")
            out = _AttachAuxLoss.apply(out, routing.aux_loss, float(scale))
        return out


def named_parameters_by_kind(module: nn.Module):
    """Yield ``(name, parameter, kind)`` for every parameter of ``module`` (``named_parameters`` order): kind
    ``"expert"`` for the expert weights (``w1``/``w2``) of an expert-parallel :class:`MoELayer` - a rank's own shard,
    reduced over its expert-data-parallel copies (:class:`~adasched.runtime.moe.ep.ExpertGradReducer`) - and
    ``"dense"`` for everything else, replicated on every data-parallel rank (routers, shared experts, attention,
    embeddings, and the experts of a layer without EP). Decided from the modules, so it survives ``to_empty``;
    the expert-parallel weights also carry ``allreduce = False``, the mark DeepSpeed's ``is_moe_param`` and
    Megatron-core's DDP read."""
    expert = {id(p) for m in module.modules() if isinstance(m, MoELayer) and m.ep is not None for p in (m.w1, m.w2)}
    for name, p in module.named_parameters():
        yield name, p, "expert" if id(p) in expert else "dense"


def split_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) parameters of ``module``, each in forward order (:func:`named_parameters_by_kind`)."""
    dense, expert = [], []
    for _, p, kind in named_parameters_by_kind(module):
        (expert if kind == "expert" else dense).append(p)
    return dense, expert


def replica_divergence(module: nn.Module, ep: ExpertParallel) -> float:
    """Largest absolute difference between a parameter and any of its copies: dense parameters over
    ``ep.dp_group``, expert shards over ``ep.expert_dp_group`` (0.0: every copy is bitwise equal). A check for after
    a step (Megatron-core's ``check_param_hashes_across_dp_replicas`` idea): collective over the data-parallel
    group (two ``all_gather`` of flat copies and one ``all_reduce``), the same value on every rank; reads the
    result on the host."""
    worst = torch.zeros((), dtype=torch.float64)
    dense, expert = split_parameters(module)
    for params, group, n in ((dense, ep.dp_group, ep.dp_size), (expert, ep.expert_dp_group, ep.expert_dp_size)):
        if not params or group is None:
            continue
        flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
        if flat.numel() == 0:                      # zero-size parameters only: nothing can differ
            continue
        copies = [torch.empty_like(flat) for _ in range(n)]
        dist.all_gather(copies, flat, group=group)
        worst = torch.maximum(worst, torch.stack([(c - flat).abs().max() for c in copies]).max().cpu())
    first = next(module.parameters(), None)
    worst = worst.to(first.device if first is not None else "cpu")   # the collectives' device (nccl: a CUDA tensor)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=ep.dp_group)
    return float(worst)


def step_routers(module: nn.Module) -> int:
    """Call :meth:`MoELayer.step_router` on every MoE layer of ``module`` (once per optimizer step, on every rank,
    after the last backward of the step); returns the number of layers whose router state is stepped there
    (``router_update="step"`` with a stateful router)."""
    n = 0
    for m in module.modules():
        if isinstance(m, MoELayer):
            m.step_router()
            n += m.router_update == "step" and m._router_has_state()
    return n


def cut_experts(full: torch.Tensor, which: str, activation: str, ffn: int, offset: int, count: int,
                cols: slice) -> torch.Tensor:
    """Experts ``offset .. offset + count - 1`` and FFN columns ``cols`` of a full ``w1``/``w2``-shaped tensor (for
    SwiGLU's w1 the same columns of the gate half and of the up half)."""
    part = full[offset:offset + count]
    if which == "w2":
        return part[:, cols]
    if activation == "swiglu":
        return torch.cat([part[..., :ffn][..., cols], part[..., ffn:][..., cols]], dim=-1)
    return part[..., cols]

"""MoE routers: which experts each token goes to, with what weight, and the auxiliary losses.

Every router maps router logits over E experts for T tokens to a flat list of *assignments*
(token, expert, weight), sorted by (expert, token), after capacity drops. The flat form covers fixed
top-k, expert choice (a token may get 0..E experts) and DynaMoE's dynamic top-p (1..k_max experts per
token) alike; the kernels in :mod:`adasched.kernels.moe` consume it.

Routers (``RouterConfig.kind``):

- ``gshard``: softmax, top-k (default 2), gates renormalised over the chosen k for k > 1 (k = 1 keeps the
  probability, as ``switch``: renormalised it would be the constant 1, with no gradient to the router), GShard
  load-balancing loss ``E * sum_e f_e * P_e`` (f_e: fraction of assignments to e before drops, P_e: mean probability).
- ``switch``: softmax, top-1, gate = the probability (not renormalised), same load-balancing loss.
- ``sigmoid_bias``: scores ``sigmoid(logits)``; selection by top-k of ``scores + bias`` where ``bias`` is
  a buffer (not trained by gradients); gates = the chosen *scores* (without bias) renormalised to sum 1 for
  k > 1, the score itself for k = 1 (as Megatron-core; renormalised, one gate is the constant 1 and the router
  got no gradient from the task loss).
  Aux-loss-free balancing: once per training forward that is backpropagated, the layer calls
  :meth:`Router.update_bias` with the token counts per expert ``c`` (summed over the expert-parallel group),
  and the bias moves by ``bias_e += bias_update_rate * sign(mean(c) - c_e)``: overloaded experts become less
  attractive. The layer applies the step when the gates' gradient arrives in the backward, not in the forward,
  so an activation-checkpoint recompute routes with the same bias as the forward it replays (applied in the
  forward, the recompute picked other experts: silently wrong gradients, and the bias moved twice).
- ``expert_choice``: softmax over experts; each expert takes its ``C = ceil(capacity_factor * T * k / E)``
  highest-probability tokens; gate = probability. Balanced by construction (no aux loss); a token chosen
  by no expert is counted as dropped.
- ``top_p`` (DynaMoE / "Harder tasks need more experts"): softmax, sort descending, keep the smallest
  prefix whose cumulative sum reaches ``p`` *including the element that crosses p*, capped at ``k_max``;
  gates = the probabilities, not renormalised. Entropy penalty ``entropy_coef * mean_t H(P_t)`` with
  ``H(P) = -sum_i P_i log P_i``: minimising it sharpens the router so it does not drift to uniform
  (which would activate k_max experts everywhere); written as the paper's ``sum P log P`` term with the
  sign that makes it a penalty on flatness. Optional controller (``target_k``): after each training
  forward ``p <- clip(p - controller_rate * (mean_k - target_k), p_min, 1)`` (:meth:`Router.controller_step`).
  ``mean_k`` counts the assignments kept after capacity drops: under a tight ``capacity_factor`` p climbs until the
  kept ones average ``target_k``, tokens asking for ever more experts (h46: 0.4 -> 0.84, 115 of 243 dropped).
  Inside an :class:`~adasched.runtime.moe.layer.MoELayer` the step is the layer's, timed like the bias step
  above, with ``mean_k`` over the whole expert-parallel group so ``p`` stays equal on every rank.

Aux-loss terms are means over this call's tokens (``sum / max(T, 1)``: a call with no tokens adds 0).

Capacity: ``capacity_factor=None`` is dropless (token-choice routers; ``expert_choice`` always has a capacity:
None there is a factor of 1, ``C = ceil(T * k / E)``, and a token no expert picks gets no expert - ``dropped``
counts it). Otherwise each expert keeps at most
``C = ceil(capacity_factor * N / E)`` assignments (N = assignments before drops; N = T*k for fixed top-k)
and drops the rest by ``drop_policy``: ``"position"`` keeps first choices before second choices and, within
a choice rank, earlier tokens first (GShard; DeepSpeed-MoE's top-2 gate); ``"probs"`` keeps the highest gates
(Megatron-core's "probs": the gates after renormalisation). Differences a peer's user may notice: Megatron-core's
"position" keeps by token position whatever the choice rank (for k > 1 it can keep a token's second choice
over a later token's first); DeepSpeed applies ``min_capacity`` (default 4), here C may be smaller; capacity is
per rank (the tokens this router sees), as in both. C is computed exactly with the factor as written
(:func:`expert_capacity`): ``1.1 * 100 / 2`` in floats is 55.000000000000007, which DeepSpeed and Megatron-core round
up to 56; here it is 55.

z-loss: ``z_loss_coef * mean_t logsumexp(logits_t)^2`` (all routers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import torch
from torch import nn

__all__ = ["ROUTER_KINDS", "RouterConfig", "Routing", "RouterStats", "Router", "expert_capacity"]

RouterKind = Literal["gshard", "switch", "sigmoid_bias", "expert_choice", "top_p"]
ROUTER_KINDS: tuple[str, ...] = ("gshard", "switch", "sigmoid_bias", "expert_choice", "top_p")


def expert_capacity(capacity_factor: float, assignments: int, num_experts: int) -> int:
    """``ceil(capacity_factor * assignments / num_experts)``, capped at ``assignments``, computed exactly with the
    factor's shortest decimal form (``1.1`` is 11/10): the float product rounded 162 of 600,000 cases up by one
    (factors 0.01..4.00 in steps of 0.01, 1..300 assignments, 2..64 experts; 1.1 * 100 / 2 = 55.000000000000007)."""
    if assignments <= 0:
        return 0
    if capacity_factor >= num_experts:  # keeps every assignment (and a factor of 1e308 stays a small fraction)
        return assignments
    return min(assignments, math.ceil(Fraction(repr(float(capacity_factor))) * assignments / num_experts))


@dataclass(kw_only=True)
class RouterConfig:
    """How tokens are routed. Validated in ``__post_init__``; errors name the field and value."""

    kind: RouterKind = "gshard"
    """Routing function (see module docstring)."""
    num_experts: int = 8
    """E, experts in the layer (all ranks together)."""
    top_k: int = 2
    """k for gshard/sigmoid_bias/expert_choice (switch forces 1); for top_p the default k_max."""
    capacity_factor: float | None = None
    """None = dropless (``expert_choice``: a factor of 1, its experts pick a fixed number of tokens); otherwise a
    positive factor on the mean load per expert (drop mode)."""
    drop_policy: Literal["position", "probs"] = "position"
    """Which assignments survive when an expert is over capacity."""
    aux_loss_coef: float = 1e-2
    """Weight of the load-balancing loss (gshard, switch, top_p; 0 disables)."""
    z_loss_coef: float = 1e-3
    """Weight of the router z-loss (0 disables)."""
    p: float = 0.4
    """top_p threshold in (0, 1]: the router's initial one (:meth:`Router.reset_parameters`). The live threshold is
    ``Router.p`` (a buffer the controller moves and a checkpoint saves): set that one to change it during a run."""
    k_max: int | None = None
    """top_p cap on experts per token (default top_k)."""
    entropy_coef: float = 1e-2
    """top_p entropy penalty weight."""
    target_k: float | None = None
    """top_p controller target for the mean experts per token (None = no controller)."""
    controller_rate: float = 0.01
    """top_p controller step on p per unit of (mean_k - target_k)."""
    p_min: float = 0.01
    """Lower clip of the controlled p."""
    bias_update_rate: float = 1e-3
    """sigmoid_bias: step of the sign update on the expert bias."""

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"router kind: {self.kind!r} is not one of {', '.join(ROUTER_KINDS)}")
        optional = ("capacity_factor", "target_k", "k_max")  # None means something for these only
        for name in ("num_experts", "top_k", "k_max"):  # a bool is not a count, 2.5 experts are not a count
            v = getattr(self, name)
            if (v is not None or name not in optional) and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"{name}: {v!r} must be an int")
        for name in ("capacity_factor", "aux_loss_coef", "z_loss_coef", "p", "entropy_coef", "target_k",
                     "controller_rate", "p_min", "bias_update_rate"):
            v = getattr(self, name)
            # (None for a required number compared with 0 below: a TypeError naming nothing, and a live config
            # kept the None)
            if (v is not None or name not in optional) and (
                    not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                raise ValueError(f"{name}: {v!r} must be a finite number")
        for name in ("aux_loss_coef", "z_loss_coef", "entropy_coef", "controller_rate", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 0 (0 disables it)")
        if self.num_experts < 1:
            raise ValueError(f"num_experts: {self.num_experts} must be >= 1")
        if self.top_k < 1 or self.top_k > self.num_experts:
            raise ValueError(
                f"top_k: {self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor: {self.capacity_factor} must be > 0 in capacity mode (None = dropless)")
        if not (0.0 < self.p <= 1.0):
            raise ValueError(f"p: {self.p} must be in (0, 1]")
        if self.k_max is not None and not (1 <= self.k_max <= self.num_experts):
            raise ValueError(f"k_max: {self.k_max} must be in [1, num_experts={self.num_experts}]")
        if self.drop_policy not in ("position", "probs"):
            raise ValueError(f"drop_policy: {self.drop_policy!r} is not 'position' or 'probs'")
        if self.target_k is not None and not (1.0 <= self.target_k <= self.effective_k_max):
            raise ValueError(f"target_k: {self.target_k} must be in [1, k_max={self.effective_k_max}]")
        if not (0.0 < self.p_min <= 1.0):
            raise ValueError(f"p_min: {self.p_min} must be in (0, 1]")
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name, value) -> None:
        """A field changed after construction (a capacity factor or k changed between steps) is validated like
        the constructor's: a bad value raises ValueError naming it and the old value stays (it was taken as is:
        ``capacity_factor = 0`` dropped every assignment, ``top_k = 9`` of 8 experts failed inside torch.topk)."""
        if not self.__dict__.get("_validated", False):
            object.__setattr__(self, name, value)
            return
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self.__post_init__()
        except BaseException:  # (ValueError; anything else must not leave the bad value either)
            object.__setattr__(self, name, old)
            raise

    @property
    def effective_k_max(self) -> int:
        """Most experts one token can get from top-k style routers."""
        if self.kind == "switch":
            return 1
        if self.kind == "top_p":
            return self.k_max if self.k_max is not None else self.top_k
        return self.top_k


@dataclass
class RouterStats:
    """Per-layer routing statistics of the last forward (detached, on CPU)."""

    tokens_per_expert: torch.Tensor
    """(E,) assignments each expert processed after drops."""
    mean_k: float
    """Mean experts per token after drops."""
    dropped: int
    """Assignments removed by the capacity limit (expert_choice: tokens chosen by no expert)."""
    num_tokens: int
    """Tokens routed."""
    p: float | None = None
    """top_p threshold this forward routed with (a controller step, if any, comes after it)."""

    def as_dict(self) -> dict:
        return {"tokens_per_expert": self.tokens_per_expert.tolist(), "mean_k": self.mean_k,
                "dropped": self.dropped, "num_tokens": self.num_tokens, "p": self.p}


@dataclass
class Routing:
    """Assignments sorted by (expert, token). ``weight`` carries the router's gradient."""

    token_idx: torch.Tensor
    """(N,) int64 token of each assignment."""
    expert_idx: torch.Tensor
    """(N,) int64 expert of each assignment (ascending)."""
    weight: torch.Tensor
    """(N,) gate of each assignment (float32, float64 for a float64 router; differentiable)."""
    counts: torch.Tensor
    """(E,) int64 assignments per expert."""
    num_tokens: int
    aux_loss: torch.Tensor
    """Scalar: load-balancing + z-loss + entropy terms, already weighted."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """The unweighted loss terms, for logging (detached 0-d tensors: read them when you log, no host sync here;
    Python floats before 2026-11-30)."""
    stats: RouterStats | None = None


def _sort_assignments(tok: torch.Tensor, exp: torch.Tensor, w: torch.Tensor, E: int, T: int):
    key = exp * max(T, 1) + tok
    order = torch.argsort(key)
    exp = exp[order]
    counts = torch.bincount(exp, minlength=E)
    return tok[order], exp, w[order], counts


def _apply_capacity(tok, exp, w, rank, cap: int, E: int, T: int, policy: str):
    """Keep at most ``cap`` assignments per expert. ``rank`` is the choice rank (0 = first choice)."""
    if policy == "position":
        prio = rank.to(torch.float64) * (T + 1) + tok.to(torch.float64)   # lower = keep first
    else:
        prio = -w.detach().to(torch.float64)
    # order by expert, then priority
    order = torch.argsort(prio, stable=True)
    order = order[torch.argsort(exp[order], stable=True)]
    exp_s = exp[order]
    counts = torch.bincount(exp_s, minlength=E)
    starts = torch.cumsum(counts, 0) - counts
    pos_in_expert = torch.arange(exp_s.numel(), device=exp.device) - starts[exp_s]
    keep = order[pos_in_expert < cap]
    return tok[keep], exp[keep], w[keep], int(exp.numel() - keep.numel())


class Router(nn.Module):
    """Linear router ``hidden -> num_experts`` plus the routing rule of ``config``."""

    def __init__(self, hidden: int, config: RouterConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(hidden, config.num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(config.num_experts), persistent=True)
        # the top_p threshold is state (the controller moves it): a persistent buffer, so a checkpoint resumes with
        # the controlled p (as a plain attribute it was not in the state_dict: a resumed run routed with config.p)
        self.register_buffer("p_threshold", torch.tensor(float(config.p), dtype=torch.float64), persistent=True)
        self.reset_parameters()
        self.last_stats: RouterStats | None = None
        #: True when the owner (an :class:`~adasched.runtime.moe.layer.MoELayer`) applies the top_p controller step
        #: itself (after the backward, on the expert-parallel group's mean k); False: :meth:`forward` applies it
        self.deferred_updates = False

    def reset_parameters(self) -> None:
        """Initial weights and routing state (normal(0, hidden^-1/2) projection, zero expert bias, p = config.p):
        what the constructor does, for meta-device init (``module.to_empty(device=...)`` leaves uninitialised
        memory in the buffers too, e.g. p = 6.9e-310)."""
        nn.init.normal_(self.proj.weight, std=self.proj.in_features ** -0.5)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.p_threshold.fill_(float(self.config.p))

    @property
    def p(self) -> float:
        """The current top_p threshold (``config.p`` until the controller moves it)."""
        return float(self.p_threshold)

    @p.setter
    def p(self, value: float) -> None:
        # checked as RouterConfig.p is: 1.5 or inf routed k_max experts to every token, 0, a negative or NaN one
        # expert, and a NaN threshold went into the state_dict where the controller could never move it again
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"p: {value!r} must be a number in (0, 1]") from None
        if isinstance(value, bool) or not (0.0 < v <= 1.0):
            raise ValueError(f"p: {value!r} must be in (0, 1]")
        with torch.no_grad():
            self.p_threshold.fill_(v)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.half()`` / ``.bfloat16()`` leave the routing state in full precision: in bf16 a
        ``bias_update_rate=1e-3`` step is under half an ulp once |bias| >= 0.5 (the bias stopped moving) and p's
        controller steps were rounded the same way. Device moves apply as usual. The values are taken from the
        full-precision buffers, not cast back from the cast ones (that rounded them once per cast: a bias at 0.6003
        became 0.6016, more than one update step)."""
        keep = {name: self._buffers.get(name) for name in ("expert_bias", "p_threshold")}
        super()._apply(fn, recurse)
        for name, dt in (("expert_bias", torch.float32), ("p_threshold", torch.float64)):
            b, old = self._buffers.get(name), keep[name]
            if b is not None and b.dtype != dt:
                src = old if old is not None and old.dtype == dt else b
                self._buffers[name] = src.detach().to(device=b.device, dtype=dt)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "p_threshold"
        if key not in state_dict:                  # a state_dict saved before p was a buffer: keep the current p
            state_dict[key] = self.p_threshold.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- public -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Routing:
        """x: (T, hidden). Returns the assignments, aux loss and statistics."""
        cfg = self.config
        logits = self.proj(x)
        # float32 at least (bf16/fp16 and autocast route in float32); a float64 model routes in float64 (its gates
        # and aux losses were rounded to float32: a float64 MoELayer failed gradcheck)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        T, E = logits.shape
        losses: dict[str, torch.Tensor] = {}
        aux = logits.new_zeros(())
        n_mean = float(max(T, 1))        # means over tokens as sum / max(T, 1): a rank with no tokens gets 0, not NaN
        if cfg.z_loss_coef > 0:
            z = torch.logsumexp(logits, dim=-1).square().sum() / n_mean
            aux = aux + cfg.z_loss_coef * z
            losses["z_loss"] = z.detach()
        kind = cfg.kind
        if kind == "expert_choice":
            tok, exp, w, dropped = self._expert_choice(logits)
            probs = None
        else:
            if kind == "sigmoid_bias":
                scores = torch.sigmoid(logits)
                sel = torch.topk(scores.detach() + self.expert_bias, cfg.top_k, dim=-1).indices
                gate = scores.gather(1, sel)
                # (+ the smallest normal: a token whose chosen logits are all below ~-104 (float32) has sigmoid 0
                # for each, and 0/0 made NaN gates and NaN router gradients; megatron-core adds 1e-20)
                tiny = torch.finfo(scores.dtype).tiny
                if cfg.top_k > 1:   # k = 1: s/s is the constant 1 - no gradient would reach the router
                    gate = gate / (gate.sum(-1, keepdim=True) + tiny)
                probs = scores / (scores.sum(-1, keepdim=True) + tiny)
                mask = torch.ones_like(sel, dtype=torch.bool)
            else:
                probs = torch.softmax(logits, dim=-1)
                if kind == "top_p":
                    sel, gate, mask = self._top_p(probs)
                    if cfg.entropy_coef > 0:
                        ent = -(probs * torch.log(probs.clamp_min(1e-20))).sum() / n_mean
                        aux = aux + cfg.entropy_coef * ent
                        losses["entropy"] = ent.detach()
                else:
                    k = 1 if kind == "switch" else cfg.top_k
                    top = torch.topk(probs, k, dim=-1)
                    sel, gate = top.indices, top.values
                    if kind == "gshard" and k > 1:
                        gate = gate / gate.sum(-1, keepdim=True)
                    mask = torch.ones_like(sel, dtype=torch.bool)
            K = sel.shape[1]
            rank = torch.arange(K, device=x.device).expand(T, K)
            tok_all = torch.arange(T, device=x.device).unsqueeze(1).expand(T, K)
            tok, exp, w, rk = tok_all[mask], sel[mask], gate[mask], rank[mask]
            if cfg.aux_loss_coef > 0 and kind != "sigmoid_bias":
                # (in the probabilities' dtype: float32 counts rounded a float64 router's loss, 3e-8 relative)
                frac = torch.bincount(exp, minlength=E).to(probs.dtype) / max(exp.numel(), 1)
                lb = E * (frac * probs.sum(0)).sum() / n_mean
                aux = aux + cfg.aux_loss_coef * lb
                losses["load_balance"] = lb.detach()
            dropped = 0
            if cfg.capacity_factor is not None:
                cap = expert_capacity(cfg.capacity_factor, exp.numel(), E)  # (1e19 overflowed ceil's int)
                tok, exp, w, dropped = _apply_capacity(tok, exp, w, rk, cap, E, T, cfg.drop_policy)
        tok, exp, w, counts = _sort_assignments(tok, exp, w, E, T)
        stats = RouterStats(tokens_per_expert=counts.detach().cpu(),
                            mean_k=float(exp.numel()) / max(T, 1), dropped=int(dropped),
                            num_tokens=T, p=self.p if kind == "top_p" else None)
        if kind == "top_p" and cfg.target_k is not None and self.training and not self.deferred_updates and T > 0:
            self.controller_step(stats.mean_k)         # (no tokens: no mean k to steer by; 0 would raise p)
        self.last_stats = stats
        return Routing(token_idx=tok, expert_idx=exp, weight=w, counts=counts, num_tokens=T,
                       aux_loss=aux, losses=losses, stats=stats)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Aux-loss-free balancing step (sigmoid_bias only): ``bias += rate * sign(mean - count)``."""
        if self.config.kind != "sigmoid_bias":
            return
        c = tokens_per_expert.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.config.bias_update_rate * torch.sign(c.mean() - c)

    def controller_step(self, mean_k: float | torch.Tensor) -> None:
        """top_p controller: ``p <- clip(p - controller_rate * (mean_k - target_k), p_min, 1)`` (no-op for other
        routers or without ``target_k``). ``mean_k`` may be a 0-d tensor: the step then stays on its device (no
        host sync; float64 as the float path)."""
        cfg = self.config
        if cfg.kind != "top_p" or cfg.target_k is None:
            return
        if isinstance(mean_k, torch.Tensor):
            with torch.no_grad():
                mk = mean_k.detach().to(self.p_threshold.device, torch.float64)
                self.p_threshold.copy_((self.p_threshold - cfg.controller_rate * (mk - cfg.target_k))
                                       .clamp(cfg.p_min, 1.0))
            return
        self.p = float(min(1.0, max(cfg.p_min, self.p - cfg.controller_rate * (mean_k - cfg.target_k))))

    # -- rules ------------------------------------------------------------------------------------
    def _top_p(self, probs: torch.Tensor):
        k_max = self.config.effective_k_max
        sp, si = torch.sort(probs, dim=-1, descending=True)
        sp, si = sp[:, :k_max], si[:, :k_max]
        # mass strictly before each element, as an exclusive prefix sum: cumsum - sp rounded the second element's to
        # one float32 ulp below the first probability and kept a second expert where the first alone reached p
        cs = torch.cumsum(sp, -1)
        before = torch.cat([torch.zeros_like(cs[:, :1]), cs[:, :-1]], -1)
        # keeps the element that crosses p (compared in sp's dtype); p = 1 keeps all k_max (a float32 cumulative sum
        # reached 1.0 early and dropped the last experts of 503 of 4,096 tokens at E = k_max = 64)
        mask = (before < self.p_threshold) | (self.p_threshold >= 1.0)
        mask[:, 0] = True
        return si, sp, mask

    def _expert_choice(self, logits: torch.Tensor):
        cfg = self.config
        T, E = logits.shape
        probs = torch.softmax(logits, dim=-1)
        cf = 1.0 if cfg.capacity_factor is None else cfg.capacity_factor
        cap = min(T, expert_capacity(cf, T * cfg.top_k, E))  # (no overflow: 1e308)
        top = torch.topk(probs.t(), cap, dim=-1)          # (E, C)
        tok = top.indices.reshape(-1)
        exp = torch.arange(E, device=logits.device).repeat_interleave(cap)
        w = top.values.reshape(-1)
        covered = torch.zeros(T, dtype=torch.bool, device=logits.device)
        covered[tok] = True
        return tok, exp, w, int(T - int(covered.sum()))

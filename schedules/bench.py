"""Budgeted-training benchmark of LR schedules on scikit-learn's digits (ships with scikit-learn).

Settings: {multinomial logistic regression, MLP 64-128-10} x {SGD-momentum, AdamW} x budgets (10/25/50/100 % of
``base_epochs``) x seeds. Schedules: constant, step (x0.1 at 50 % and 75 %), linear, cosine, OneCycle, REX, UBA with
phi in {0.5, 1, 2, 4}, and refined (Defazio et al.) from the gradient norms of the linear-decay run with the same
seed and budget (l2 norms for SGD, l1 for AdamW). The peak lr of every schedule is chosen from a 3-point grid
around a per-(model, optimizer) base by validation loss (200 held-out training images); the table reports test loss
and accuracy (497 images) at the chosen peak. Every schedule's lr per step comes from the real scheduler
object (ours or torch's) stepped on a one-parameter optimizer; training is vectorised over (seed, schedule)
members with batched matmuls and a hand-written SGD-momentum / AdamW that applies each member's own lr (the
same update rules as torch.optim.SGD / AdamW; a test checks this). Its time on 2 CPU cores is in BENCHMARKS.md.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from .lr import REX, UBA, LinearDecay, Refined

__all__ = ["BenchConfig", "SCHEDULES", "lr_table", "run_bench", "bench_rows", "plot_bench", "load_digits_split"]

SCHEDULES = ("constant", "step", "linear", "cosine", "onecycle", "rex", "uba0.5", "uba1", "uba2", "uba4", "refined")

#: Peak learning rates per (model, optimizer) (not tuned per schedule; the same for every schedule).
BASE_LR = {("logreg", "sgd"): 0.5, ("logreg", "adamw"): 0.05, ("mlp", "sgd"): 0.1, ("mlp", "adamw"): 0.01}


@dataclass
class BenchConfig:
    base_epochs: int = 30
    budgets: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    seeds: int = 5
    batch_size: int = 128
    hidden: int = 128
    models: tuple[str, ...] = ("logreg", "mlp")
    optimizers: tuple[str, ...] = ("sgd", "adamw")
    schedules: tuple[str, ...] = SCHEDULES
    momentum: float = 0.9
    sgd_weight_decay: float = 1e-4
    adamw_weight_decay: float = 1e-2
    refine_smoothing: float = 0.1
    #: peak lr = BASE_LR * each of these; per schedule and budget the one with the best validation loss is kept
    lr_mults: tuple[float, ...] = (1 / 3, 1.0, 3.0)

    @classmethod
    def quick(cls) -> "BenchConfig":
        return cls(base_epochs=6, budgets=(0.25, 1.0), seeds=2, hidden=32, lr_mults=(1.0,))


# ---------------------------------------------------------------------------------------------------- data
def load_digits_split(test_size: int = 497, val_size: int = 200, seed: int = 0):
    """Digits 8x8 (1797 images, 10 classes): stratified train (1100) / validation (200) / test (497) split,
    features standardised on train. Returns (xtr, ytr, xval, yval, xte, yte) tensors."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # (an optional dependency: `pip install adasched` without [bench] ended in a traceback)
        from adasched.profiler.io import InputError

        raise InputError("scikit-learn", "not installed: the schedules benchmark trains on its digits data "
                                         "(pip install 'adasched[bench]')") from None

    x, y = load_digits(return_X_y=True)
    xrest, xte, yrest, yte = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    xtr, xval, ytr, yval = train_test_split(xrest, yrest, test_size=val_size, random_state=seed, stratify=yrest)
    mu, sd = xtr.mean(0), xtr.std(0)
    sd = np.where(sd < 1e-3, 1.0, sd)  # pixels (almost) always blank in train: leave unscaled
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xval), torch.tensor(yval), f(xte), torch.tensor(yte)


# ---------------------------------------------------------------------------------------------------- schedules
def lr_table(name: str, steps: int, grad_norms=None, norm: str = "l2", smoothing: float = 0.1) -> np.ndarray:
    """Multiplier of the peak lr used at optimizer steps 0..steps-1, from the real scheduler objects."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    S = torch.optim.lr_scheduler
    makers: dict[str, Callable[[], object]] = {
        "constant": lambda: S.ConstantLR(opt, factor=1.0, total_iters=0),
        "step": lambda: S.MultiStepLR(opt, milestones=[steps // 2, (3 * steps) // 4], gamma=0.1),
        "linear": lambda: LinearDecay(opt, steps),
        "cosine": lambda: S.CosineAnnealingLR(opt, T_max=steps),
        "onecycle": lambda: S.OneCycleLR(opt, max_lr=1.0, total_steps=steps, cycle_momentum=False),
        "rex": lambda: REX(opt, steps),
        "refined": lambda: Refined(opt, grad_norms, norm=norm, smoothing=smoothing),
    }
    if name.startswith("uba"):
        sched = UBA(opt, steps, phi=float(name[3:]))
    else:
        sched = makers[name]()
    out = np.empty(steps)
    for s in range(steps):
        out[s] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return out


# ---------------------------------------------------------------------------------------------------- training
def _init_params(model: str, members_seeds: list[int], d_in: int, hidden: int, n_cls: int) -> list[torch.Tensor]:
    """Per-member parameters (torch default Linear init, from each member's seed)."""
    shapes = [(d_in, n_cls), (n_cls,)] if model == "logreg" else [(d_in, hidden), (hidden,), (hidden, n_cls), (n_cls,)]
    params = [torch.empty((len(members_seeds),) + s) for s in shapes]
    for m, seed in enumerate(members_seeds):
        g = torch.Generator().manual_seed(10_000 + seed)
        for i, s in enumerate(shapes):
            fan_in = shapes[i - (i % 2)][0]
            bound = 1.0 / math.sqrt(fan_in)
            params[i][m] = (torch.rand(s, generator=g) * 2 - 1) * bound
    return [p.requires_grad_() for p in params]


def _forward(model: str, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x: [M, B, d] -> logits [M, B, C]."""
    if model == "logreg":
        return torch.baddbmm(params[1][:, None, :], x, params[0])
    h = torch.relu(torch.baddbmm(params[1][:, None, :], x, params[0]))
    return torch.baddbmm(params[3][:, None, :], h, params[2])


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean CE per member: logits [M, B, C], y [M, B] -> [M]."""
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def train_members(model: str, opt: str, lrs: np.ndarray, seeds: list[int], data, cfg: BenchConfig,
                  record_norms: bool = False):
    """Train M members in lock-step. ``lrs``: [M, steps] absolute lrs; ``seeds``: each member's seed (init and
    batch order). Returns a dict of [M] arrays (val_loss, test_loss, test_acc) and ``norms``
    ([M, steps, 2] l2 and l1 of each step's gradient, or None)."""
    xtr, ytr, xval, yval, xte, yte = data
    M, steps = lrs.shape
    n, d = xtr.shape
    params = _init_params(model, seeds, d, cfg.hidden, 10)
    bs = cfg.batch_size
    per_epoch = n // bs
    # batch order: a fresh permutation per epoch per seed (identical for members that share a seed)
    order = {}
    for s in set(seeds):
        g = torch.Generator().manual_seed(seed_batches(s))
        epochs = -(-steps // per_epoch)
        order[s] = torch.cat([torch.randperm(n, generator=g)[: per_epoch * bs] for _ in range(epochs)]).view(-1, bs)
    idx = torch.stack([order[s][:steps] for s in seeds], 1)  # [steps, M, B]
    lr_t = torch.tensor(lrs, dtype=torch.float32)
    state = [torch.zeros_like(p) for p in params]
    state2 = [torch.zeros_like(p) for p in params]
    norms = torch.empty(M, steps, 2, dtype=torch.float64) if record_norms else None
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(steps):
        xb, yb = xtr[idx[t]], ytr[idx[t]]
        loss = _cross_entropy(_forward(model, params, xb), yb).sum()
        grads = torch.autograd.grad(loss, params)
        if record_norms:
            flat = torch.cat([g.reshape(M, -1) for g in grads], 1).double()
            norms[:, t, 0] = flat.norm(dim=1)
            norms[:, t, 1] = flat.abs().sum(1)
        with torch.no_grad():
            for p, g, m1, m2 in zip(params, grads, state, state2):
                lr = lr_t[:, t].view((M,) + (1,) * (p.dim() - 1))
                if opt == "sgd":  # torch.optim.SGD(momentum, weight_decay): coupled decay, buf = mu buf + g
                    g = g + cfg.sgd_weight_decay * p
                    if t == 0:
                        m1.copy_(g)
                    else:
                        m1.mul_(cfg.momentum).add_(g)
                    p.sub_(lr * m1)
                else:  # torch.optim.AdamW
                    p.mul_(1 - lr * cfg.adamw_weight_decay)
                    m1.mul_(b1).add_(g, alpha=1 - b1)
                    m2.mul_(b2).addcmul_(g, g, value=1 - b2)
                    c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
                    p.sub_(lr / c1 * m1 / (m2.sqrt() / math.sqrt(c2) + eps))
    out = {}
    with torch.no_grad():
        for key, xs, ys in (("val", xval, yval), ("test", xte, yte)):
            logits = _forward(model, params, xs.expand(M, -1, -1))
            loss = _cross_entropy(logits, ys.expand(M, -1))
            loss[~torch.isfinite(loss)] = float("inf")  # diverged
            out[f"{key}_loss"] = loss.numpy()
            out[f"{key}_acc"] = (logits.argmax(-1) == ys).float().mean(1).numpy()
    out["norms"] = None if norms is None else norms.numpy()
    return out


def seed_batches(seed: int) -> int:
    return 20_000 + seed


# ---------------------------------------------------------------------------------------------------- driver
@dataclass
class BenchResult:
    config: dict
    results: list[dict] = field(default_factory=list)  # one per (model, opt, budget, schedule)
    wall_s: float = 0.0


def run_bench(cfg: BenchConfig, progress: Callable[[int], None] | None = None) -> BenchResult:
    """Train every (model, optimizer, budget, schedule, seed); one torch thread (tiny matmuls: threads only
    contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_bench(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _run_bench(cfg: BenchConfig, progress: Callable[[int], None] | None = None) -> BenchResult:
    data = load_digits_split()
    n = data[0].shape[0]
    per_epoch = n // cfg.batch_size
    t0 = time.perf_counter()
    res = BenchResult(config=asdict(cfg) | {"steps_per_epoch": per_epoch, "train": n, "val": int(data[2].shape[0]),
                                            "test": int(data[4].shape[0]),
                                            "base_lr": {f"{m}/{o}": v for (m, o), v in BASE_LR.items()}})
    seeds = list(range(cfg.seeds))
    mults = list(cfg.lr_mults)
    for model in cfg.models:
        for opt in cfg.optimizers:
            base = BASE_LR[(model, opt)]
            for budget in cfg.budgets:
                steps = max(4, int(round(budget * cfg.base_epochs * per_epoch)))
                first = [s for s in cfg.schedules if s != "refined"]
                tables = {s: lr_table(s, steps) for s in first}
                members = [(s, k, seed) for s in first for k in range(len(mults)) for seed in seeds]
                lrs = np.stack([tables[s] * base * mults[k] for s, k, _ in members])
                need_norms = "refined" in cfg.schedules
                if need_norms and "linear" not in first:
                    raise ValueError("schedules: 'refined' needs 'linear' (its norms come from the linear run)")
                out = train_members(model, opt, lrs, [sd for *_, sd in members], data, cfg, record_norms=need_norms)
                per = {s: {k: [] for k in range(len(mults))} for s in cfg.schedules}
                for i, (s, k, _) in enumerate(members):
                    per[s][k].append(i)
                runs = {s: _select(out, per[s], mults) for s in first}
                if need_norms:
                    # norms of the linear-decay run (same seed, budget and peak lr chosen for linear)
                    k_lin = runs["linear"]["lr_mult_index"]
                    col = 0 if opt == "sgd" else 1
                    norm = "l2" if opt == "sgd" else "l1"
                    tabs = {sd: lr_table("refined", steps, out["norms"][i, :, col], norm, cfg.refine_smoothing)
                            for i, sd in zip(per["linear"][k_lin], seeds)}
                    rmembers = [(k, sd) for k in range(len(mults)) for sd in seeds]
                    rl = np.stack([tabs[sd] * base * mults[k] for k, sd in rmembers])
                    out2 = train_members(model, opt, rl, [sd for _, sd in rmembers], data, cfg)
                    runs["refined"] = _select(out2, {k: [i for i, (kk, _) in enumerate(rmembers) if kk == k]
                                                     for k in range(len(mults))}, mults)
                for s in cfg.schedules:
                    r = runs[s]
                    res.results.append({"model": model, "optimizer": opt, "budget": budget, "steps": steps,
                                        "schedule": s, **{k: v for k, v in r.items() if k != "lr_mult_index"}})
                _mark_best(res.results, model, opt, budget)
                if progress:
                    progress(1)
    res.wall_s = time.perf_counter() - t0
    return res


def _select(out: dict, groups: dict[int, list[int]], mults: list[float]) -> dict:
    """Pick the peak-lr multiplier with the lowest mean VALIDATION loss; report its test loss and accuracy."""
    best = min(groups, key=lambda k: (float(np.mean(out["val_loss"][groups[k]])), k))
    idx = groups[best]
    L, A = out["test_loss"][idx].astype(float), out["test_acc"][idx].astype(float)
    return {"lr_mult": mults[best], "lr_mult_index": best, "val_loss": float(np.mean(out["val_loss"][idx])),
            "loss_mean": float(L.mean()), "loss_std": float(L.std()), "acc_mean": float(A.mean()),
            "acc_std": float(A.std()), "losses": L.tolist(), "accs": A.tolist()}


TIE_REL = 1e-6
"""Means within this relative difference are ties: float32 rounding (~1e-8) told UBA phi=2 from cosine - the same
schedule - and ranked the two apart (7.81 against 7.94)."""


def _tied(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TIE_REL, abs_tol=0.0)


def _mark_best(results: list[dict], model: str, opt: str, budget: float) -> None:
    rows = [r for r in results if (r["model"], r["optimizer"], r["budget"]) == (model, opt, budget)]
    best_loss = min(r["loss_mean"] for r in rows)
    best_acc = max(r["acc_mean"] for r in rows)
    for r in rows:
        r["best_loss"] = _tied(r["loss_mean"], best_loss)
        r["best_acc"] = _tied(r["acc_mean"], best_acc)


def _ranks(rows: list[dict]) -> list[float]:
    """1-based ranks of ``rows`` by mean test loss, ties (:data:`TIE_REL`) sharing their average rank."""
    order = sorted(range(len(rows)), key=lambda i: rows[i]["loss_mean"])
    out = [0.0] * len(rows)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and _tied(rows[order[j]]["loss_mean"], rows[order[i]]["loss_mean"]):
            j += 1
        for k in order[i:j]:
            out[k] = (i + 1 + j) / 2.0  # mean of ranks i+1 .. j
        i = j
    return out


def summary(res: BenchResult) -> list[dict]:
    """Per schedule: mean rank of test loss over settings (1 = best), wins on loss and on accuracy."""
    keys = sorted({(r["model"], r["optimizer"], r["budget"]) for r in res.results})
    scheds = list(dict.fromkeys(r["schedule"] for r in res.results))
    ranks = {s: [] for s in scheds}
    wins = {s: [0, 0] for s in scheds}
    for k in keys:
        rows = [r for r in res.results if (r["model"], r["optimizer"], r["budget"]) == k]
        for r, rank in zip(rows, _ranks(rows)):
            ranks[r["schedule"]].append(rank)
            wins[r["schedule"]][0] += bool(r["best_loss"])
            wins[r["schedule"]][1] += bool(r["best_acc"])
    low = [k for k in keys if k[2] <= 0.25]
    low_ranks = {s: [] for s in scheds}
    for k in low:
        rows = [r for r in res.results if (r["model"], r["optimizer"], r["budget"]) == k]
        for r, rank in zip(rows, _ranks(rows)):
            low_ranks[r["schedule"]].append(rank)
    return [{"schedule": s, "mean_rank": float(np.mean(ranks[s])),
             "mean_rank_low_budget": float(np.mean(low_ranks[s])) if low_ranks[s] else float("nan"),
             "loss_wins": wins[s][0], "acc_wins": wins[s][1]} for s in scheds]


def bench_rows(res: BenchResult, model: str, opt: str) -> tuple[list[list[str]], list[str]]:
    """Table rows (schedule x budget) with 'loss±std acc%' and '*' on the best mean loss (and '+' best acc)."""
    budgets = sorted({r["budget"] for r in res.results})
    scheds = list(dict.fromkeys(r["schedule"] for r in res.results))
    cols = ["schedule"] + [f"{int(round(b * 100))}% ({_steps(res, model, opt, b)} st)" for b in budgets]
    rows = []
    for s in scheds:
        row = [s]
        for b in budgets:
            r = next(x for x in res.results if (x["model"], x["optimizer"], x["budget"], x["schedule"]) ==
                     (model, opt, b, s))
            mark = ("*" if r["best_loss"] else "") + ("+" if r["best_acc"] else "")
            row.append(f"{r['loss_mean']:.4f}±{r['loss_std']:.4f} {100 * r['acc_mean']:.1f}%{mark}")
        rows.append(row)
    return rows, cols


def _steps(res, model, opt, b):
    return next(r["steps"] for r in res.results if (r["model"], r["optimizer"], r["budget"]) == (model, opt, b))


def plot_bench(res: BenchResult, path) -> None:
    """Final test loss vs budget per schedule, one panel per (model, optimizer), plus the lr multipliers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["model"], r["optimizer"]) for r in res.results))
    scheds = list(dict.fromkeys(r["schedule"] for r in res.results))
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.2 * (len(keys) + 1), 3.8))
    cmap = plt.get_cmap("tab20")
    for ax, (model, opt) in zip(axes, keys):
        for i, s in enumerate(scheds):
            rows = sorted([r for r in res.results if (r["model"], r["optimizer"], r["schedule"]) == (model, opt, s)],
                          key=lambda r: r["budget"])
            ax.errorbar([r["budget"] * 100 for r in rows], [r["loss_mean"] for r in rows],
                        yerr=[r["loss_std"] for r in rows], label=s, color=cmap(i), marker="o", ms=3, capsize=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("budget (% of base epochs)")
        ax.set_ylabel("final test loss")
        ax.set_title(f"{model} / {opt}")
    ax = axes[-1]
    steps = 200
    for i, s in enumerate(scheds):
        if s == "refined":
            continue
        ax.plot(np.arange(steps) / steps, lr_table(s, steps), label=s, color=cmap(i))
    ax.set_xlabel("progress")
    ax.set_ylabel("lr / peak lr")
    ax.set_title("schedules")
    axes[0].legend(fontsize=7, ncol=2)
    from adasched.profiler.io import save_figure, tight_layout

    tight_layout(fig)

    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)

"""Human views of a ClusterProfile: table rows and a plot of its fitted models."""
from __future__ import annotations

import os

from .profile import ClusterProfile

__all__ = ["profile_rows", "plot_profile", "rough_fit_notes", "ROUGH_FIT"]


def _fit_note(rel_error: float, source: str) -> str:
    """'fit error x%' for a model fitted to measurements, with the notes its source carries after '; ' (a bandwidth
    the data did not resolve and a floor set, an attention fit without an s^2 term, a proportional linear model:
    shown as measured fits before); 'published constants' for one taken from a paper (it read "fit error 0.0%": no
    fit was made, no error is known)."""
    notes = [n.strip() for n in source.split("; ")[1:] if n.strip()]
    # (published constants keep their notes too: "extrapolated ... (optimistic)" past the paper's sizes was dropped)
    head = "published constants" if source.startswith("published") else f"fit error {rel_error:.1%}"
    return head + "".join(f"; {n}" for n in notes)


def profile_rows(p: ClusterProfile) -> list[tuple[str, str]]:
    rows = [
        ("name", p.name),
        ("source", p.source),
        ("cluster", f"{p.num_nodes} node(s) x {p.gpus_per_node} {p.device.kind}(s) = {p.world_size}"),
        ("device", f"{p.device.name}, {p.device.memory_bytes / 2**30:.1f} GiB"),
    ]
    if p.gemm_tflops:
        rows.append(("GEMM", f"{p.gemm_tflops:.4g} TFLOP/s"))
    if p.copy_GBps:
        rows.append(("copy", f"{p.copy_GBps:.1f} GB/s (read+write)"))
    if p.attention:
        a = p.attention
        rows.append(("attention fwd+bwd", f"{a.a1_ms_per_tok2:.3e}*s^2 + {a.a2_ms_per_tok:.3e}*s + {a.b_ms:.3g} ms "
                                          f"({_fit_note(a.fit_rel_error, a.source)})"))
    if p.linear:
        rows.append(("linear fwd+bwd", f"{p.linear.ms_per_token:.3e} ms/token + {p.linear.b_ms:.3g} ms "
                                       f"({_fit_note(p.linear.fit_rel_error, p.linear.source)})"))
    for c in sorted(p.collectives, key=lambda c: (c.op, c.group_size)):
        rows.append((f"{c.op} x{c.group_size} ({c.scope})",
                     f"alpha {c.alpha_ms:.4g} ms, {c.bandwidth_GBps:.3g} GB/s of bytes per rank, busbw "
                     f"{c.bus_bandwidth_GBps:.3g} GB/s ({_fit_note(c.fit_rel_error, c.source)})"))
    for name, m in p.model_costs.items():
        rows.append((f"model {name}", f"a1 {m.a1_ms_per_tok2:.4g}, a2 {m.a2_ms_per_tok:.4g}, b1 {m.b1_ms:.4g} ms, "
                                      f"{m.act_bytes_per_token / 2**20:.3f} MiB act/token"))
    return rows


def _points(rows, x: str, y: str, **match) -> list[tuple[float, float]]:
    """(x, y) of the rows of a profile's free-form ``raw`` that are dicts with positive finite numbers at ``x``
    and ``y`` (and ``match``'s values); anything else (a hand-edited or foreign raw section) is left out."""
    import math

    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if not isinstance(rows, list):
        return []
    return [(float(r[x]), float(r[y])) for r in rows
            if isinstance(r, dict) and num(r.get(x)) and num(r.get(y)) and all(r.get(k) == v for k, v in match.items())]


def plot_profile(p: ClusterProfile, path: str | os.PathLike) -> None:
    """Fitted attention, linear-layer and collective models, with the measured points where the profile
    keeps them in ``raw`` (written atomically as PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    raw = p.raw
    ax = axes[0]
    if p.attention:
        pts = _points(raw.get("attention_causal_sdpa_bf16_headdim128_batch1"), "seq", "fwd_bwd_ms",
                      heads=p.attention.heads) + _points(raw.get("attention"), "seq", "fwd_bwd_ms")
        lo, hi = (min(x for x, _ in pts) / 2, max(x for x, _ in pts) * 2) if pts else (2**10, 2**16)
        s = np.logspace(np.log2(lo), np.log2(hi), 50, base=2)
        ax.loglog(s, [p.attention.time_ms(x) for x in s],
                  label=f"fit a1 s^2 + a2 s + b (err {p.attention.fit_rel_error:.1%})")
        if pts:
            ax.loglog([x for x, _ in pts], [y for _, y in pts], "o", label="measured")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("attention fwd+bwd per layer (ms)")
        ax.set_title(f"attention, {p.attention.heads} heads x {p.attention.head_dim}", fontsize=9)
        ax.legend(fontsize=7)
    elif p.model_costs:  # a profile of published per-model terms (a100-64-flexsp-paper): its compute model
        s = np.logspace(7, 19, 50, base=2)
        for name, mc in sorted(p.model_costs.items()):
            ax.loglog(s, [(mc.a1_ms_per_tok2 * x * x + mc.a2_ms_per_tok * x) / mc.layers for x in s],
                      label=f"{name} ({mc.layers} layers)")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("compute per sequence per layer (ms)")
        ax.set_title("published model costs: (a1 s^2 + a2 s) / layers", fontsize=9)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no attention model", ha="center")
        ax.axis("off")
    ax = axes[1]
    if p.linear:
        dense = raw.get("dense_7b_layer_linear_fwd_bwd")
        pts = _points(dense.get("rows") if isinstance(dense, dict) else None, "tokens", "fwd_bwd_ms")
        pts += _points(raw.get("linear"), "tokens", "fwd_bwd_ms")
        lo, hi = (min(x for x, _ in pts) / 2, max(x for x, _ in pts) * 2) if pts else (2**8, 2**16)
        t = np.logspace(np.log2(lo), np.log2(hi), 50, base=2)
        ax.loglog(t, [p.linear.time_ms(x) for x in t], label=f"fit c t + b (err {p.linear.fit_rel_error:.1%})")
        if pts:
            ax.loglog([x for x, _ in pts], [y for _, y in pts], "o", label="measured")
        ax.set_xlabel("tokens")
        ax.set_ylabel("linear layers fwd+bwd per layer (ms)")
        ax.set_title(f"linear, hidden {p.linear.hidden}, ffn {p.linear.ffn_hidden}", fontsize=9)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no linear model", ha="center")
        ax.axis("off")
    ax = axes[2]
    coll = raw.get("collectives")
    points = coll.get("points") if isinstance(coll, dict) else None
    every = _points(points, "bytes", "ms")
    if every:
        sizes = np.logspace(np.log2(min(x for x, _ in every)), np.log2(max(x for x, _ in every)), 40, base=2)
    else:
        sizes = np.logspace(10, 30, 40, base=2)
    for i, c in enumerate(sorted(p.collectives, key=lambda c: (c.op, c.group_size))):
        colour = f"C{i % 10}"
        ax.loglog(sizes, [c.time_ms(x) for x in sizes], color=colour, label=f"{c.op} x{c.group_size}")
        mine = _points(points, "bytes", "ms", op=c.op, group_size=c.group_size)
        if mine:
            ax.loglog([x for x, _ in mine], [y for _, y in mine], "o", color=colour, markersize=3)
    ax.set_xlabel("bytes per rank")
    ax.set_ylabel("time (ms)")
    ax.set_title("collectives: alpha + beta * bytes" + (" (dots: measured)" if every else ""), fontsize=9)
    if p.collectives:
        ax.legend(fontsize=6, ncol=2)
    else:
        ax.text(0.5, 0.5, "no collective fits", ha="center", transform=ax.transAxes)
    fig.suptitle(f"profile {p.name}")
    from .io import save_figure, tight_layout

    tight_layout(fig)

    try:
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


#: a fit whose mean relative error is above this gets a note on stderr
ROUGH_FIT = 0.25


def rough_fit_notes(prof) -> list[str]:
    """The notes a freshly measured profile deserves (fits far off their points, an attention fit without s^2):
    `adasched profile` and launch/profile_collectives.py say the same (here: no typer on the torchrun path)."""
    notes = []
    for what, fit in (("attention", prof.attention), ("linear", prof.linear)):
        if fit is not None and fit.fit_rel_error > ROUGH_FIT:
            notes.append(f"note: the {what} fit is {fit.fit_rel_error:.0%} off its measured points on average (a "
                         "busy machine or a too-quick profile?); re-run, or without --quick, before planning with it")
    if prof.attention is not None and prof.attention.a1_ms_per_tok2 == 0:  # (a flat fit passed in silence)
        notes.append("note: the attention fit has no s^2 term (the measured times did not grow quadratically with "
                     "length: a busy machine?); long sequences will be underestimated - re-run before planning with "
                     "it")
    notes += _long_end_notes(prof)
    rough = [f"{c.op} x{c.group_size} {c.fit_rel_error:.0%}" for c in prof.collectives if c.fit_rel_error > ROUGH_FIT]
    if rough:
        notes.append(f"note: {len(rough)} collective fit(s) more than {ROUGH_FIT:.0%} off their measured points on "
                     f"average ({', '.join(rough)}); re-run on a quiet machine, or without --quick, before planning "
                     "with them")
    return notes


def _long_end_notes(prof) -> list[str]:
    """A fit far under its longest measured point (the one extrapolation starts from): the relative least squares
    weigh a noisy short point as much as the long one, so the mean error could pass while the longest length was
    priced at half its time (a quick CPU profile: s=512 measured 17.8 ms, fitted 6.8 ms)."""
    out = []
    for what, fit, key, size, model in (
            ("attention", prof.attention, "attention", "seq",
             lambda f, s: f.a1_ms_per_tok2 * s * s + f.a2_ms_per_tok * s + f.b_ms),
            ("linear", prof.linear, "linear", "tokens", lambda f, t: f.ms_per_token * t + f.b_ms)):
        rows = prof.raw.get(key)
        if fit is None or not isinstance(rows, list):
            continue
        pts = [(r[size], r["fwd_bwd_ms"]) for r in rows if isinstance(r, dict)
               and isinstance(r.get(size), (int, float)) and isinstance(r.get("fwd_bwd_ms"), (int, float))
               and r["fwd_bwd_ms"] > 0]
        if not pts:
            continue
        n, ms = max(pts)
        pred = model(fit, n)
        if pred < (1 - ROUGH_FIT) * ms:
            out.append(f"note: the {what} fit is {1 - pred / ms:.0%} under its longest measured point ({size} {n:g}: "
                       f"{pred:.3g} ms fitted, {ms:.3g} ms measured): longer ones will be underestimated - re-run, "
                       f"or without --quick, before planning with it")
    return out

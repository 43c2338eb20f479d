"""Human views of a ClusterProfile: table rows and a plot of its fitted models."""
from __future__ import annotations

import os

from .profile import ClusterProfile

__all__ = ["profile_rows", "plot_profile"]


def profile_rows(p: ClusterProfile) -> list[tuple[str, str]]:
    rows = [
        ("name", p.name),
        ("source", p.source),
        ("cluster", f"{p.num_nodes} node(s) x {p.gpus_per_node} {p.device.kind}(s) = {p.world_size}"),
        ("device", f"{p.device.name}, {p.device.memory_bytes / 2**30:.1f} GiB"),
    ]
    if p.gemm_tflops:
        rows.append(("GEMM", f"{p.gemm_tflops:.1f} TFLOP/s"))
    if p.copy_GBps:
        rows.append(("copy", f"{p.copy_GBps:.1f} GB/s (read+write)"))
    if p.attention:
        a = p.attention
        rows.append(("attention fwd+bwd", f"{a.a1_ms_per_tok2:.3e}*s^2 + {a.a2_ms_per_tok:.3e}*s + {a.b_ms:.3g} ms "
                                          f"(fit error {a.fit_rel_error:.1%})"))
    if p.linear:
        rows.append(("linear fwd+bwd", f"{p.linear.ms_per_token:.3e} ms/token + {p.linear.b_ms:.3g} ms "
                                       f"(fit error {p.linear.fit_rel_error:.1%})"))
    for c in sorted(p.collectives, key=lambda c: (c.op, c.group_size)):
        rows.append((f"{c.op} x{c.group_size} ({c.scope})",
                     f"alpha {c.alpha_ms:.4g} ms, {c.bandwidth_GBps:.2f} GB/s (fit error {c.fit_rel_error:.1%})"))
    for name, m in p.model_costs.items():
        rows.append((f"model {name}", f"a1 {m.a1_ms_per_tok2:.4g}, a2 {m.a2_ms_per_tok:.4g}, b1 {m.b1_ms:.4g} ms, "
                                      f"{m.act_bytes_per_token / 2**20:.3f} MiB act/token"))
    return rows


def plot_profile(p: ClusterProfile, path: str | os.PathLike) -> None:
    """Fitted attention and collective models (with the raw points where the profile has them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if p.attention:
        s = np.logspace(10, 16, 50, base=2)
        ax.loglog(s, [p.attention.time_ms(x) for x in s], label="fit a1 s^2 + a2 s + b")
        pts = [r for r in p.raw.get("attention_causal_sdpa_bf16_headdim128_batch1", []) if r.get("heads") == p.attention.heads]
        pts += p.raw.get("attention", [])
        if pts:
            ax.loglog([r["seq"] for r in pts], [r["fwd_bwd_ms"] for r in pts], "o", label="measured")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("attention fwd+bwd (ms)")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no attention model", ha="center")
    ax = axes[1]
    sizes = np.logspace(10, 30, 40, base=2)
    for c in sorted(p.collectives, key=lambda c: (c.op, c.group_size)):
        ax.loglog(sizes, [c.time_ms(x) for x in sizes], label=f"{c.op} x{c.group_size}")
    ax.set_xlabel("bytes per rank")
    ax.set_ylabel("time (ms)")
    if p.collectives:
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"profile {p.name}")
    fig.tight_layout()
    path = os.fspath(path)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

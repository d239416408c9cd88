"""Replay's tables (markdown) and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepprobe.stats import format_interval


def live_markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| KV blocks | policy | accuracy live / replay | x SC tokens live / replay | x SC time live / model "
            "| preemptions live / replay | pruned live / replay | traces pruned alike | problems right/wrong alike |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        a, b = r["live"], r["replay"]
        lines.append(f"| {r['kv_blocks'] or 'default'} | {r['policy']} | {a['accuracy']:.3f} / {b['accuracy']:.3f} | "
                     f"{a['token_ratio']:.2f} / {b['token_ratio']:.2f} | {_ratio(a['time_ratio'])} / {b['time_ratio']:.2f} | "
                     f"{a['preemptions']} / {b['preemptions']} | {a['pruned']} / {b['pruned']} | "
                     f"{r['traces_pruned_alike']:.3f} | {r['problems_voted_alike']:.3f} |")
    return head + "\n".join(lines) + "\n"


def _ratio(x: float | None) -> str:
    """A live time ratio; a bench row of a resumed cell (or one timed apart from its SC) has none."""
    return "–" if x is None else f"{x:.2f}"


def _iv(d: dict[str, Any] | None) -> str:
    return format_interval(d, signed=True, missing="–")


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| KV blocks | policy | vote | accuracy | Δ vs SC [95% CI] | random | SC same tokens | oracle "
            "| x SC time (model) | x admission-SC time | x SC tokens | preemptions | pruned |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        def acc(name: str) -> str:
            return f"{r[name]['accuracy']:.3f}" if name in r else "–"

        adm = r.get("admission_time_ratio")
        policy = r["policy"] + (f" ({r['rule']})" if r.get("rule") else "") + (
            f" (max_num_seqs {r['max_num_seqs']})" if r.get("max_num_seqs") else "")
        lines.append(f"| {r['kv_blocks'] or 'unlimited'} | {policy} | {r['vote']} | {r['accuracy']:.3f} | "
                     f"{_iv(r.get('vs_sc'))} | {acc('random')} | {acc('sc_same_tokens')} | {acc('oracle')} | "
                     f"{r['time_ratio']:.2f} | {'–' if adm is None else f'{adm:.2f}'} | "
                     f"{r['token_ratio']:.2f} | {r['preemptions']} | {r['pruned']}/{r['traces']} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = list(dict.fromkeys((r["policy"], r["vote"]) for r in rows))
    for policy in policies:
        sub = [r for r in rows if (r["policy"], r["vote"]) == policy]
        policy = f"{policy[0]} ({policy[1]})"
        for ax, key, label in ((axes[0], "output_tokens", "output tokens"), (axes[1], "model_time", "model time (token units)")):
            xs = [r[key] for r in sub]
            ax.plot(xs, [r["accuracy"] for r in sub], marker="o", label=policy)
            for r in sub:
                ax.annotate(str(r["kv_blocks"] or "∞"), (r[key], r["accuracy"]), fontsize=6)
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy")
    axes[0].set_title("accuracy vs. output tokens (labels: KV blocks)")
    axes[1].set_title("accuracy vs. model time")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""The trade-off study's outputs: the summary table, the equal-epoch table, the accuracy-vs-time
plot and TensorBoard scalars (see :mod:`lit.tradeoff`)."""

from __future__ import annotations

import csv
from pathlib import Path


def summarise(points: list[dict]) -> tuple[list[dict], str]:
    """One row per run (final point) and a markdown report with an equal-epoch table."""
    runs: dict[str, list[dict]] = {}
    for p in points:
        runs.setdefault(p["run"], []).append(p)
    rows = [{"run": name, "model": pts[-1]["model"], "params_M": round(pts[-1]["params"] / 1e6, 2),
             **{k: pts[-1][k] for k in ("keep_rate", "resolution", "train_s", "epochs", "images_per_s",
                                         "val_acc", "test_acc")}} for name, pts in runs.items()]
    lines = ["| run | params (M) | keep | res | train s | epochs | images/s | val acc | test acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        test = r["test_acc"] if r["test_acc"] is not None else "-"
        lines.append(f"| {r['run']} | {r['params_M']} | {r['keep_rate']} | {r['resolution']} | {r['train_s']} | "
                     f"{r['epochs']} | {r['images_per_s']} | {r['val_acc']:.4f} | {test} |")
    epoch_acc = {name: {round(p["epochs"]): p["val_acc"] for p in pts if p["at_epoch_end"]}
                 for name, pts in runs.items()}
    common = sorted(set().union(*epoch_acc.values())) if epoch_acc else []
    if common:
        lines += ["", "Validation accuracy at each epoch end (equal epochs):", "",
                  "| run | " + " | ".join(f"epoch {e}" for e in common) + " |",
                  "|---|" + "---|" * len(common)]
        for name, accs in epoch_acc.items():
            lines.append(f"| {name} | " + " | ".join(f"{accs[e]:.4f}" if e in accs else "-" for e in common) + " |")
    return rows, "\n".join(lines) + "\n"


def write_outputs(points: list[dict], out: Path) -> None:
    """curves.csv, summary.csv, summary.md, tradeoff.png and TensorBoard scalars under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    rows, markdown = summarise(points)
    for filename, table, fields in (("curves.csv", points, list(points[0])), ("summary.csv", rows, list(rows[0]))):
        with open(out / filename, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
    (out / "summary.md").write_text(markdown)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(p["run"] for p in points):
        pts = [p for p in points if p["run"] == name]
        ax.plot([p["train_s"] for p in pts], [p["val_acc"] for p in pts], marker="o", label=name)
        writer = SummaryWriter(str(out / "tb" / name))
        for p in pts:
            writer.add_scalar("tradeoff/val_acc", p["val_acc"], global_step=int(round(p["train_s"])))
            writer.add_scalar("tradeoff/val_acc_vs_epoch_x100", p["val_acc"], global_step=int(round(p["epochs"] * 100)))
        writer.close()
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("PatchDropout: accuracy vs training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)
    plt.close(fig)
    print(markdown)

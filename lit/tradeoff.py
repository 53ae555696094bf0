"""The PatchDropout time-accuracy trade-off study (Liu et al., arXiv 2208.07220, Sec. 5):
train a grid of (model size, keep rate, resolution) for a fixed training-time budget each and
compare accuracy against training time.

    python -m lit.tradeoff --models deit_fmnist_tiny_patch4_28 deit_fmnist_small_patch4_28 \\
        --keep_rates 1.0 0.5 0.25 --resolutions 28 --budget_s 120 --out runs/tradeoff

Every run trains an :class:`models.ImageClassifier` on Fashion-MNIST (real IDX files; images are
resized when the resolution is not 28) with AdamW and a warm-up + cosine schedule that ends
when the run ends: at the time budget (the schedule follows elapsed training time) or after
``--max_epochs`` (the schedule follows steps). Training time is wall time minus evaluation.
Validation accuracy (on ``--eval_images`` held-out images) is taken every ``--eval_every_s``
seconds and at every epoch end; the official 10k test set is scored once at the end.

Writes into ``--out``: ``curves.csv`` (every evaluation), ``summary.csv`` and ``summary.md``
(one row per run, plus accuracy at each common epoch), ``tradeoff.png`` (validation accuracy vs
training time) and TensorBoard scalars under ``tb/<run>``
(``tradeoff/val_acc`` with the step = training seconds).
"""

from __future__ import annotations

import argparse
import csv
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from datamodules.fashion_mnist import DEBIAN_DIR


@dataclass
class Point:
    """One evaluation of one run."""

    run: str
    model: str
    params: int
    keep_rate: float
    resolution: int
    train_s: float
    epochs: float
    steps: int
    images_per_s: float
    val_acc: float
    at_epoch_end: bool
    test_acc: float | None = None


class TrainClock:
    """Training seconds since the start, with evaluation time taken out.

    ``kind="wall"`` is wall time; ``kind="cpu"`` is this process's CPU time (all its threads),
    which other programs on a shared machine do not inflate: use it with ``--threads 1``.
    """

    def __init__(self, kind: str = "wall") -> None:
        self.now = time.perf_counter if kind == "wall" else time.process_time
        self.start = self.now()
        self.paused = 0.0

    def seconds(self) -> float:
        return self.now() - self.start - self.paused


def cosine_factor(progress: float, warmup: float = 0.05) -> float:
    """LR factor: linear warm-up over the first ``warmup`` of the run, then cosine to 0."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


class BudgetEvaluator(Callback):
    """Stops at the time budget, evaluates on a schedule, drives the LR by run progress."""

    def __init__(self, run: dict, clock: TrainClock, val_batches: list, budget_s: float | None,
                 eval_every_s: float, total_steps: int | None, device: torch.device, batch_size: int) -> None:
        self.batch_size = batch_size
        self.run, self.clock, self.val_batches = run, clock, val_batches
        self.budget_s, self.eval_every_s, self.total_steps = budget_s, eval_every_s, total_steps
        self.device = device
        self.points: list[Point] = []
        self.next_eval = eval_every_s

    def progress(self, trainer: Trainer) -> float:
        if self.budget_s is not None:
            return self.clock.seconds() / self.budget_s
        return trainer.global_step / max(1, self.total_steps or 1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        factor = cosine_factor(self.progress(trainer))
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = self.clock.seconds()
        if self.budget_s is not None and seconds >= self.budget_s:
            self.evaluate(trainer, pl_module, at_epoch_end=False)
            trainer.should_stop = True
        elif seconds >= self.next_eval:
            self.evaluate(trainer, pl_module, at_epoch_end=False)
            self.next_eval = seconds + self.eval_every_s

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.should_stop:
            self.evaluate(trainer, pl_module, at_epoch_end=True)

    def evaluate(self, trainer, pl_module, at_epoch_end: bool) -> None:
        paused = self.clock.now()
        seconds = self.clock.seconds()
        acc = accuracy(pl_module, self.val_batches, self.device)
        steps_per_epoch = max(1, trainer.num_training_batches)
        self.points.append(Point(**self.run, train_s=round(seconds, 2),
                                 epochs=round(trainer.global_step / steps_per_epoch, 3),
                                 steps=trainer.global_step,
                                 images_per_s=round(trainer.global_step * self.batch_size / max(seconds, 1e-9), 1),
                                 val_acc=round(acc, 4), at_epoch_end=at_epoch_end))
        print(f"  [{self.run['run']}] {seconds:7.1f}s  epoch {self.points[-1].epochs:5.2f}  val_acc {acc:.4f}",
              flush=True)
        self.clock.paused += self.clock.now() - paused


@torch.no_grad()
def accuracy(model, batches: list, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in batches:
        logits = model(images.to(device))
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += len(labels)
    model.train(was_training)
    return correct / max(1, total)


def run_one(args, model_name: str, keep_rate: float, resolution: int) -> list[Point]:
    from datamodules.fashion_mnist import FashionMNIST
    from models.image_classifier import ImageClassifier

    seed_everything(args.seed, verbose=False)
    transforms = None
    if resolution != 28:
        from torchvision.transforms.v2 import Resize

        transforms = [Resize((resolution, resolution), antialias=True)]
    data = FashionMNIST(data_dir=args.data_dir, batch_size=args.batch_size, val_size=args.eval_images,
                        seed=args.seed, num_workers=args.num_workers,
                        train_transforms=transforms, eval_transforms=transforms)
    data.setup("fit")
    lr = args.lr
    model = ImageClassifier(backbone=model_name, num_classes=10, in_chans=1, img_size=resolution,
                            keep_rate=keep_rate, label_smoothing=0.1,
                            optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.05))
    params = sum(p.numel() for p in model.parameters())
    name = f"{model_name}-keep{keep_rate:g}-res{resolution}"
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
                          else "cpu")
    val_batches = list(data.val_dataloader())
    steps_per_epoch = len(data.train_dataloader())
    total_steps = steps_per_epoch * args.max_epochs if args.max_epochs else None
    clock = TrainClock(args.clock)
    evaluator = BudgetEvaluator(
        {"run": name, "model": model_name, "params": params, "keep_rate": keep_rate, "resolution": resolution},
        clock, val_batches, args.budget_s, args.eval_every_s, total_steps, device, args.batch_size)
    trainer = Trainer(max_epochs=args.max_epochs or 10_000, accelerator="gpu" if device.type == "cuda" else "cpu",
                      devices=1, precision="bf16-mixed" if device.type == "cuda" else "32-true",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=[evaluator])
    print(f"run {name}: {params / 1e6:.2f}M parameters", flush=True)
    clock.start = clock.now()
    with warnings.catch_warnings():  # validation runs in the callback, not in Lightning's loop
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`")
        trainer.fit(model, train_dataloaders=data.train_dataloader())
    if evaluator.points:
        data.setup("test")
        test_batches = _first_images(data.test_dataloader(), args.test_images or len(data.test_set))
        test_acc = accuracy(model.to(device), test_batches, device)
        evaluator.points[-1].test_acc = round(test_acc, 4)
    return evaluator.points


def _first_images(batches, limit: int) -> list:
    """The first ``limit`` images of an iterable of batches (stops reading after them)."""
    out, seen = [], 0
    for images, labels in batches:
        if seen >= limit:
            break
        take = min(len(labels), limit - seen)
        out.append((images[:take], labels[:take]))
        seen += take
    return out


def summarise(points: list[Point]) -> tuple[list[dict], str]:
    """One row per run (final point) and a markdown report with an equal-epoch table."""
    runs: dict[str, list[Point]] = {}
    for p in points:
        runs.setdefault(p.run, []).append(p)
    rows = []
    for name, pts in runs.items():
        last = pts[-1]
        rows.append({"run": name, "model": last.model, "params_M": round(last.params / 1e6, 2),
                     "keep_rate": last.keep_rate, "resolution": last.resolution, "train_s": last.train_s,
                     "epochs": last.epochs, "images_per_s": last.images_per_s,
                     "val_acc": last.val_acc, "test_acc": last.test_acc})
    lines = ["| run | params (M) | keep | res | train s | epochs | images/s | val acc | test acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['params_M']} | {r['keep_rate']} | {r['resolution']} | {r['train_s']} | "
                     f"{r['epochs']} | {r['images_per_s']} | {r['val_acc']:.4f} | {r['test_acc'] if r['test_acc'] is not None else '-'} |")
    epoch_acc = {name: {round(p.epochs): p.val_acc for p in pts if p.at_epoch_end} for name, pts in runs.items()}
    common = sorted(set.union(set(), *[set(v) for v in epoch_acc.values()])) if epoch_acc else []
    if common:
        lines += ["", "Validation accuracy at each epoch end (equal epochs):", "",
                  "| run | " + " | ".join(f"epoch {e}" for e in common) + " |",
                  "|---|" + "---|" * len(common)]
        for name, accs in epoch_acc.items():
            lines.append(f"| {name} | " + " | ".join(f"{accs[e]:.4f}" if e in accs else "-" for e in common) + " |")
    return rows, "\n".join(lines) + "\n"


def write_outputs(points: list[Point], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    rows, markdown = summarise(points)
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.md").write_text(markdown)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(p.run for p in points):
        pts = [p for p in points if p.run == name]
        ax.plot([p.train_s for p in pts], [p.val_acc for p in pts], marker="o", label=name)
        writer = SummaryWriter(str(out / "tb" / name))
        for p in pts:
            writer.add_scalar("tradeoff/val_acc", p.val_acc, global_step=int(round(p.train_s)))
            writer.add_scalar("tradeoff/val_acc_vs_epoch_x100", p.val_acc, global_step=int(round(p.epochs * 100)))
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_fmnist_tiny_patch4_28", "deit_fmnist_small_patch4_28"],
                        help="timm model names (the 28x28 ones are registered by models.timm_tiny)")
    parser.add_argument("--keep_rates", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[28])
    parser.add_argument("--budget_s", type=float, default=None, help="training seconds per run")
    parser.add_argument("--max_epochs", type=int, default=None, help="epochs per run (with or without a budget)")
    parser.add_argument("--eval_every_s", type=float, default=30.0)
    parser.add_argument("--eval_images", type=int, default=2000, help="held-out training images for validation")
    parser.add_argument("--test_images", type=int, default=None, help="score only this many test images")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--data_dir", default=DEBIAN_DIR)
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="budget in wall seconds or in this process's CPU seconds (shared machines)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only_runs", nargs="+", default=None,
                        help="run only these grid points, named MODEL-keepK-resR (as in the output)")
    parser.add_argument("--out", default="runs/tradeoff")
    args = parser.parse_args(argv)
    if args.budget_s is None and args.max_epochs is None:
        parser.error("--budget_s or --max_epochs: give at least one, e.g. --budget_s 120")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget_s must be > 0 seconds, got {args.budget_s!r}")
    if any(not 0 < k <= 1 for k in args.keep_rates):
        parser.error(f"--keep_rates must be in (0, 1], got {args.keep_rates!r}")
    return args


def main(argv: list[str] | None = None) -> list[Point]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    points: list[Point] = []
    for model_name in args.models:
        for resolution in args.resolutions:
            for keep_rate in args.keep_rates:
                if args.only_runs and f"{model_name}-keep{keep_rate:g}-res{resolution}" not in args.only_runs:
                    continue
                points += run_one(args, model_name, keep_rate, resolution)
    if not points:
        raise SystemExit("no evaluation happened: raise --budget_s or --max_epochs")
    write_outputs(points, Path(args.out))
    return points


if __name__ == "__main__":
    main()

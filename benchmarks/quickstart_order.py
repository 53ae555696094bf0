"""Quickstart quality with the resumable training order vs the order it replaced.

``FashionMNIST`` now draws each epoch's order from ``(seed, epoch)`` (``datamodules.loader``) so
that a run resumed mid-epoch replays an uninterrupted one; before, ``DataLoader(shuffle=True)``
drew it from torch's global generator. Both are uniform random permutations, so test accuracy
should differ only by run-to-run noise. This runs the quickstart config through the CLI with
each order, for each seed, in one invocation, and prints test accuracy side by side::

    python benchmarks/quickstart_order.py --seeds 0 1 [--data-dir DIR] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader
from typing_extensions import override

from datamodules.fashion_mnist import FashionMNIST

ROOT = Path(__file__).resolve().parents[1]


class GlobalOrderFashionMNIST(FashionMNIST):
    """The previous training loader: shuffled by torch's global generator, not resumable."""

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


def run(order: str, seed: int, data_dir: str, epochs: int, out: Path) -> tuple[float, float]:
    """Test accuracy and wall seconds of one quickstart run."""
    args = [sys.executable, "-m", "lit", "fit", "--config", str(ROOT / "configs/quickstart.yaml"),
            f"--seed_everything={seed}", f"--trainer.max_epochs={epochs}",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}"]
    if order == "global":
        args += ["--data=benchmarks.quickstart_order.GlobalOrderFashionMNIST"]
    args += [f"--data.init_args.data_dir={data_dir}", "--data.init_args.batch_size=128",
             "--data.init_args.val_size=5000", f"--data.init_args.seed={seed}"]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    seconds = time.perf_counter() - start
    found = re.search(r"test/acc\s*[│|]\s*([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{order} seed {seed} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return float(found.group(1)), seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    opts = parser.parse_args(argv)
    print("| seed | order | test accuracy | wall s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in opts.seeds:
            for order in ("seeded (resumable)", "global"):
                acc, seconds = run(order.split()[0], seed, opts.data_dir, opts.epochs, Path(tmp))
                print(f"| {seed} | {order} | {acc:.4f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()

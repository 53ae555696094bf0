"""LLM.int8() accuracy of fine-tuned MiniLM on the Rotten Tomatoes snippets (CPU, real data).

Obtains two checkpoints the way ``benchmarks/bert_nm_quality.py`` does (same split: test = 20%
stratified, seed 0):

1. dense: fine-tune all-MiniLM-L6-v2 for ``--dense-steps`` steps;
2. 2:4: prune that dense model one-shot to 2:4 (``callbacks.NMPruning``) and fine-tune it for
   ``--sparse-steps`` steps;

(``--dense-ckpt`` / ``--sparse-ckpt`` reuse existing checkpoints instead), then tests each one in
fp32, in bf16 and with the encoder's 36 Linear layers in LLM.int8() (``models.int8``, threshold
6.0, outlier part in the model's dtype), and reports the outlier feature dimensions found on the
test text by ``callbacks.OutlierFeatures``.

    python benchmarks/int8_quality.py --out benchmarks/results/int8_quality.json

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from callbacks.nm_pruning import NMPruning  # noqa: E402
from datamodules.text_classification import TextClassification  # noqa: E402
from models.bert_classifier import BertClassifier  # noqa: E402
from models.nm_sparsity import is_nm_sparse, select_linears  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bert_nm_quality import INCLUDE, make_model  # noqa: E402  (the same fine-tuning recipe)

def fit(model: BertClassifier, dm: TextClassification, root: Path, steps: int, callbacks: list) -> None:
    trainer = L.Trainer(
        default_root_dir=str(root), max_epochs=1, limit_train_batches=steps, limit_val_batches=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, dm)
    trainer.save_checkpoint(root / "model.ckpt")


def train(args, dm: TextClassification, root: Path) -> tuple[Path, Path]:
    """The dense and 2:4 checkpoints: reused when given, else fine-tuned here."""
    dense = Path(args.dense_ckpt) if args.dense_ckpt else root / "dense" / "model.ckpt"
    if not dense.is_file():
        L.seed_everything(0)
        t = time.time()
        fit(make_model(args, None, args.lr, 0.1), dm, dense.parent, args.dense_steps, [])
        print(f"[int8] dense fine-tune: {args.dense_steps} steps in {time.time() - t:.0f}s", flush=True)
    sparse = Path(args.sparse_ckpt) if args.sparse_ckpt else root / "sparse24" / "model.ckpt"
    if not sparse.is_file():
        L.seed_everything(0)
        t = time.time()
        model = make_model(args, str(dense), args.sparse_lr, 0.0)
        fit(model, dm, sparse.parent, args.sparse_steps, [NMPruning(schedule="one_shot", patterns=["2:4"])])
        ok = all(is_nm_sparse(layer.weight, 2, 4) for layer in select_linears(model, INCLUDE).values())
        print(f"[int8] 2:4 one-shot fine-tune: {args.sparse_steps} steps in {time.time() - t:.0f}s, "
              f"exactly 2:4: {ok}", flush=True)
    return dense, sparse


RUNS = ("32-true:dynamic", "bf16-true:dynamic", "bf16-true:calibrated")


def evaluate(args, dm: TextClassification, name: str, ckpt: Path) -> list[dict]:
    """Test accuracy of one checkpoint in fp32 and bf16, each beside its int8 version.

    fp32 and bf16 runs use the paper's dynamic outlier detection; a third run repeats bf16 with
    ``outliers="calibrated"`` (only the calibrated columns leave the int8 part). The outlier
    features are recorded on the fp32 run. ``--runs`` picks others, e.g. ``bf16-true:plain``
    (threshold inf: plain row-wise int8, no 16-bit part).
    """
    from callbacks.int8_eval import Int8Eval
    from callbacks.outlier_features import OutlierFeatures

    rows = []
    for run in args.runs:
        precision, mode = run.split(":")
        model = make_model(args, str(ckpt), args.lr, 0.0).eval()
        threshold = float("inf") if mode == "plain" else args.threshold
        callbacks = [Int8Eval(threshold=threshold, outliers="dynamic" if mode == "plain" else mode)]
        outliers = None
        if precision == "32-true":
            outliers = OutlierFeatures(threshold=args.threshold,
                                       save_dir=str(Path(args.workdir) / "outliers" / name.split()[0]))
            callbacks.append(outliers)
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                            precision=precision, callbacks=callbacks)
        t = time.time()
        metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
        kept = sum(len(v) for v in callbacks[0].fp16_dims.values())
        row = {"checkpoint": name, "precision": precision, "outliers": mode,
               "test_acc": metrics["test/acc"], "test_loss": metrics["test/loss"],
               "int8_acc": metrics["test_int8/acc"], "int8_loss": metrics["test_int8/loss"],
               "weight_mb": metrics["test/weight_mb"], "int8_weight_mb": metrics["test_int8/weight_mb"],
               "linear_mb": metrics["test/linear_mb"], "int8_linear_mb": metrics["test_int8/linear_mb"],
               "kept_fp16_columns": kept, "seconds": round(time.time() - t, 1)}
        if outliers is not None:
            row["outlier_features"] = {k: v for k, v in outliers.summary.items()}
            row["outlier_features"]["consistency"] = {str(k): v for k, v in outliers.summary["consistency"].items()}
        rows.append(row)
        print(f"[int8] {name} {precision} {mode}: "
              f"{json.dumps({k: v for k, v in row.items() if k != 'outlier_features'})}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense-steps", type=int, default=150, help="dense fine-tuning steps (279 = 1 epoch)")
    parser.add_argument("--sparse-steps", type=int, default=50, help="2:4 fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--sparse-lr", type=float, default=5e-5)
    parser.add_argument("--threshold", type=float, default=6.0)
    parser.add_argument("--max-samples", type=int, default=None, help="stratified subset (dry runs)")
    parser.add_argument("--dense-ckpt", default=None, help="reuse this dense checkpoint")
    parser.add_argument("--sparse-ckpt", default=None, help="reuse this 2:4 checkpoint")
    parser.add_argument("--train-only", action="store_true", help="stop after obtaining the checkpoints")
    parser.add_argument("--runs", nargs="+", default=list(RUNS),
                        help="PRECISION:MODE test runs per checkpoint; MODE dynamic, calibrated or plain (threshold inf)")
    parser.add_argument("--freeze-embeddings", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--workdir", default="runs/int8_quality")
    parser.add_argument("--out", default="benchmarks/results/int8_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)

    L.seed_everything(0)
    dm = TextClassification(max_length=args.max_length, batch_size=args.batch_size, seed=0,
                            max_samples=args.max_samples)
    dm.setup("fit")
    print({k: len(v) for k, v in dm.splits.items()}, flush=True)
    dense, sparse = train(args, dm, root)
    if args.train_only:
        return
    rows = evaluate(args, dm, "dense", dense) + evaluate(args, dm, "2:4 one-shot", sparse)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))

    print("\n| checkpoint | precision (reference and int8 outlier part) | outlier columns | test acc | "
          "int8 test acc | int8 - ref (points) | test loss | int8 loss | encoder Linear MiB | kept 16-bit columns |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['precision']} | {r['outliers']} | {r['test_acc']:.4f} | {r['int8_acc']:.4f} | "
              f"{100 * (r['int8_acc'] - r['test_acc']):+.2f} | {r['test_loss']:.4f} | {r['int8_loss']:.4f} | "
              f"{r['linear_mb']:.2f} -> {r['int8_linear_mb']:.2f} | {r['kept_fp16_columns']} |")
    for r in rows:
        if "outlier_features" in r:
            s = r["outlier_features"]
            print(f"\n{r['checkpoint']}: {s['layers']} layers hooked, {s['tokens']} positions, "
                  f"systematic dims {s['systematic_dims']}")
            print(s["markdown"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

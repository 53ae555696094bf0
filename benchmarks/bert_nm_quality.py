"""Accuracy of N:M sparse MiniLM on the Rotten Tomatoes snippets (CPU, real data).

Runs, on the same stratified split (test = 20%, seed 0):

1. dense: fine-tune all-MiniLM-L6-v2 (the reference to beat: frozen mean-pooled embeddings +
   logistic regression reach 0.770);
2. 2:4 one-shot (ASP): prune the dense model once (test before fine-tuning), fine-tune;
3. 2:4 dynamic: same start and budget as 2, masks recomputed every ``--update-every`` steps;
4. inherited 4:8 -> 2:4 -> 1:4 (IDP): from the dense model, one stage after the other in one
   fit, dynamic masks within each stage; each stage checkpoint is tested.

    python benchmarks/bert_nm_quality.py --out benchmarks/results/bert_nm_quality.json

Prints a table; the budget is set by ``--dense-steps`` and ``--sparse-steps`` (steps of
``--batch-size``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from functools import partial  # noqa: E402

from callbacks.nm_pruning import NMPruning  # noqa: E402
from datamodules.text_classification import TextClassification  # noqa: E402
from lit.schedulers import WarmupDecay  # noqa: E402
from models.nm_sparsity import is_nm_sparse, nm_mask, select_linears  # noqa: E402
from models.bert_classifier import BertClassifier  # noqa: E402

INCLUDE = [r"encoder\.layer\.\d+\."]


def make_model(args, init_from: str | None, lr: float, warmup: float) -> BertClassifier:
    return BertClassifier(
        init_from=init_from,
        freeze_embeddings=args.freeze_embeddings,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
        lr_scheduler=partial(WarmupDecay, warmup_fraction=warmup, decay="linear"),
    )


def trainer(root: Path, steps_per_epoch: int, epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        default_root_dir=str(root), max_epochs=epochs, limit_train_batches=steps_per_epoch,
        limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, enable_checkpointing=False, num_sanity_val_steps=0,
    )


def test_acc(model: BertClassifier, dm: TextClassification) -> float:
    tr = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return float(tr.test(model, datamodule=dm, verbose=False)[0]["test/acc"])


def check_nm(model: BertClassifier, n: int, m: int) -> bool:
    return all(is_nm_sparse(layer.weight, n, m) for layer in select_linears(model, INCLUDE).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense-steps", type=int, default=279, help="dense fine-tuning steps (279 = 1 epoch)")
    parser.add_argument("--sparse-steps", type=int, default=100, help="fine-tuning steps per sparse run/stage")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--sparse-lr", type=float, default=5e-5)
    parser.add_argument("--update-every", type=int, default=20)
    parser.add_argument("--max-samples", type=int, default=None, help="stratified subset (dry runs)")
    parser.add_argument("--dense-ckpt", default=None, help="reuse this dense checkpoint (skips dense training)")
    parser.add_argument("--skip-inherited", action="store_true")
    parser.add_argument("--freeze-embeddings", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    parser.add_argument("--workdir", default="runs/bert_nm_quality")
    parser.add_argument("--out", default="benchmarks/results/bert_nm_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def record(name: str, acc: float, steps: int, seconds: float, nm_ok: bool | None) -> None:
        results.append({"run": name, "test_acc": acc, "train_steps": steps, "train_s": round(seconds, 1),
                        "exactly_nm": nm_ok})
        print(f"[quality] {name:<34} test acc {acc:.4f}  steps {steps}  {seconds:.0f}s  N:M ok {nm_ok}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))

    L.seed_everything(0)
    dm = TextClassification(max_length=args.max_length, batch_size=args.batch_size, seed=0,
                            max_samples=args.max_samples)
    dm.setup("fit")
    print({k: len(v) for k, v in dm.splits.items()}, flush=True)

    # 1. dense fine-tuning
    dense_ckpt = root / "dense.ckpt"
    if args.dense_ckpt is None:
        model = make_model(args, None, args.lr, 0.1)
        t = time.time()
        tr = trainer(root / "dense", args.dense_steps, 1, [])
        tr.fit(model, dm)
        tr.save_checkpoint(dense_ckpt)
        record("dense", test_acc(model, dm), args.dense_steps, time.time() - t, None)

        # 2a. 2:4 one-shot without fine-tuning (magnitude pruning of the dense model)
        with torch.no_grad():
            for layer in select_linears(model, INCLUDE).values():
                layer.weight.mul_(nm_mask(layer.weight, 2, 4))
        record("2:4 one-shot, no fine-tune", test_acc(model, dm), 0, 0.0, check_nm(model, 2, 4))
    else:
        dense_ckpt = Path(args.dense_ckpt)

    # 2b/3. 2:4 one-shot + fine-tune, 2:4 dynamic: same start (dense) and budget
    for name, callback in (
        ("2:4 one-shot (ASP) + fine-tune", NMPruning(schedule="one_shot", patterns=["2:4"])),
        ("2:4 dynamic + fine-tune", NMPruning(schedule="dynamic", patterns=["2:4"], update_every=args.update_every)),
    ):
        L.seed_everything(0)
        model = make_model(args, str(dense_ckpt), args.sparse_lr, 0.0)
        t = time.time()
        trainer(root / name.split()[1], args.sparse_steps, 1, [callback]).fit(model, dm)
        record(name, test_acc(model, dm), args.sparse_steps, time.time() - t, check_nm(model, 2, 4))
        if callback.dense:  # how far the dynamic mask moved from the one-shot mask of the dense model
            dense_net = make_model(args, str(dense_ckpt), args.sparse_lr, 0.0)
            start = {k: nm_mask(v.weight, 2, 4) for k, v in select_linears(dense_net, INCLUDE).items()}
            moved = sum(int((start[k] != callback.masks[k].cpu()).sum()) for k in start)
            print(f"[quality] dynamic masks: {moved / sum(v.numel() for v in start.values()):.4%} of entries "
                  f"differ from the one-shot mask", flush=True)

    if args.skip_inherited:
        return

    # 4. inherited 4:8 -> 2:4 -> 1:4 (IDP), a stage = one epoch of --sparse-steps steps
    L.seed_everything(0)
    patterns = ["4:8", "2:4", "1:4"]
    callback = NMPruning(schedule="inherited", patterns=patterns, update_every=args.update_every,
                         epochs_per_stage=1, stage_dir=str(root / "inherited"))
    model = make_model(args, str(dense_ckpt), args.sparse_lr, 0.0)
    t = time.time()
    trainer(root / "inherited", args.sparse_steps, len(patterns), [callback]).fit(model, dm)
    seconds = time.time() - t
    for stage in callback.stage_results:
        n, m = (int(x) for x in stage["pattern"].split(":"))
        staged = make_model(args, stage["checkpoint"], args.sparse_lr, 0.0)
        record(f"inherited stage {stage['stage']}: {stage['pattern']}", test_acc(staged, dm),
               args.sparse_steps * (stage["stage"] + 1), seconds / len(patterns) * (stage["stage"] + 1),
               check_nm(staged, n, m))

    print("\n| run | test acc | fine-tune steps | exactly N:M |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['test_acc']:.4f} | {r['train_steps']} | {r['exactly_nm']} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

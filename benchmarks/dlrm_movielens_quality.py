"""MovieLens-100k click prediction: DLRM (fused torchrec, under Lightning) vs logistic regression.

Both see the same features (user, item, age bucket, gender, occupation, zip prefix, release
decade, genres as a multi-hot bag, and the two dense values) and the same seed-0 split; the
logistic regression's C is chosen on the validation split. Prints both test AUROCs.

    python benchmarks/dlrm_movielens_quality.py [--epochs 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def one_hot_features(dm, split: str):
    """Sparse design matrix: one-hot ids (offset per feature), multi-hot genres, dense values."""
    from scipy.sparse import csr_matrix, hstack

    from datamodules.ctr.movielens import SINGLE

    t, rows = dm.tables, dm.rows[split]
    n = len(rows)
    blocks = []
    for name, card in zip(SINGLE, t.cardinalities):
        blocks.append(csr_matrix((np.ones(n), (np.arange(n), t.ids[name][rows])), shape=(n, card)))
    values, lengths = t.genres(rows)
    blocks.append(csr_matrix((np.ones(len(values)), (np.repeat(np.arange(n), lengths), values)),
                             shape=(n, t.cardinalities[-1])))
    blocks.append(csr_matrix(t.dense[rows].astype(np.float64)))
    return hstack(blocks).tocsr(), t.labels[rows]


def logistic_regression(dm) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x_tr, y_tr = one_hot_features(dm, "train")
    x_va, y_va = one_hot_features(dm, "val")
    x_te, y_te = one_hot_features(dm, "test")
    best = None
    for c in (0.03, 0.1, 0.3, 1.0, 3.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(x_tr, y_tr)
        auc = roc_auc_score(y_va, model.predict_proba(x_va)[:, 1])
        if best is None or auc > best[0]:
            best = (auc, c, model)
    val_auc, c, model = best
    return val_auc, roc_auc_score(y_te, model.predict_proba(x_te)[:, 1]), c


def dlrm(dm, epochs: int, seed: int) -> dict[str, float]:
    import lightning as L
    import torch

    from models.dlrm.module import DLRMModule

    L.seed_everything(seed, verbose=False)
    model = DLRMModule(embedding_dim=16, num_embeddings=10_000, dense_arch_layer_sizes=[32],
                       over_arch_layer_sizes=[64, 32], embedding_lr=0.05,
                       optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test = trainer.test(model, dm, verbose=False)[0]
    return {**val, **test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from datamodules.ctr.movielens import MovieLens100K

    dm = MovieLens100K(batch_size=256, seed=args.seed)
    t0 = time.perf_counter()
    lr_val, lr_test, c = logistic_regression(dm)
    t_lr = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = dlrm(dm, args.epochs, args.seed)
    t_dlrm = time.perf_counter() - t0
    print(f"MovieLens-100k, rating >= 4 as click; split seed {args.seed}: "
          f"{len(dm.rows['train'])} train / {len(dm.rows['val'])} val / {len(dm.rows['test'])} test")
    print(f"| model | val AUROC | test AUROC | test log loss | test NE | seconds |")
    print(f"|---|---|---|---|---|---|")
    print(f"| logistic regression (C={c}) | {lr_val:.4f} | {lr_test:.4f} | - | - | {t_lr:.0f} |")
    print(f"| DLRM, {args.epochs} epochs | {res['val/auroc']:.4f} | {res['test/auroc']:.4f} | "
          f"{res['test/logloss']:.4f} | {res['test/ne']:.4f} | {t_dlrm:.0f} |")


if __name__ == "__main__":
    main()

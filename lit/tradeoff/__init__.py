"""The PatchDropout time-accuracy trade-off study (Liu et al., arXiv 2208.07220, Sec. 5):
train a grid of (model size, keep rate, resolution) for a fixed training-time budget each and
compare accuracy against training time.

    python -m lit.tradeoff --models deit_fmnist_tiny_patch4_28 deit_fmnist_small_patch4_28 \\
        --keep_rates 1.0 0.5 0.25 --resolutions 28 --budget_s 120 --out runs/tradeoff

Each grid point is one ``python -m lit fit`` subprocess with a config written by this tool
(kept as ``<out>/runs/<run>/config.yaml``): :class:`models.ImageClassifier` on Fashion-MNIST
(resized when the resolution is not 28), AdamW, :class:`lit.schedulers.WarmupDecay` (5 % warm-up,
cosine) and :class:`callbacks.BudgetEvaluator`, which stops at the budget, ends the schedule
with the run, and scores ``--eval_images`` held-out images every ``--eval_every_s`` training
seconds and at every epoch end; the official test set is scored once at the end.

The grid (configs and subprocesses) is :mod:`lit.tradeoff.grid`, the tables and the plot
:mod:`lit.tradeoff.report`, the command line :mod:`lit.tradeoff.__main__`.

Writes into ``--out``: ``curves.csv`` (every evaluation), ``summary.csv`` and ``summary.md``
(one row per run, plus accuracy at each common epoch), ``tradeoff.png`` (validation accuracy vs
training time) and TensorBoard scalars under ``tb/<run>``
(``tradeoff/val_acc`` with the step = training seconds).
"""

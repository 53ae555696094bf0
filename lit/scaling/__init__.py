"""Scaling laws for recommendation models (Ardalani et al., "Understanding Scaling Laws for
Recommendation Models", arXiv 2208.08489): sweep a grid of DLRM runs, fit
``L(x) = alpha * x^(-beta) + gamma`` per curve with profile-likelihood confidence intervals (a
curve the data cannot pin down is reported "not identified"), and split a
compute budget between data and model size.

    python -m lit.scaling sweep --config configs/dlrm/scaling_synthetic.yaml
    python -m lit.scaling fit runs/scaling/synthetic/results.csv
    python -m lit.scaling allocate runs/scaling/synthetic/results.csv --compute 1e15

``sweep`` is :mod:`lit.scaling.sweep`, ``fit`` :mod:`lit.scaling.fit`, ``allocate``
:mod:`lit.scaling.allocate`.
"""

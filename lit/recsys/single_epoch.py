"""Deprecated alias of :mod:`callbacks.eval_at_samples` (use ``callbacks.EvalAtSamples``)."""

import warnings

from callbacks.eval_at_samples import EvalAtSamples, crossed, evaluate  # noqa: F401

warnings.warn("lit.recsys.single_epoch.EvalAtSamples moved to callbacks.EvalAtSamples; "
              "the old path goes in the next release", DeprecationWarning, stacklevel=2)

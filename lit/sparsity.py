"""Deprecated alias of :mod:`models.nm_sparsity`; goes in the next release."""

import warnings

from models.nm_sparsity import *  # noqa: F401,F403
from models.nm_sparsity import __all__  # noqa: F401

warnings.warn("lit.sparsity moved to models.nm_sparsity; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)

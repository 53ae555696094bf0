"""Deprecated alias of :mod:`models.dlrm.strategy`."""

import warnings

from models.dlrm.strategy import TorchrecDDPStrategy  # noqa: F401

warnings.warn("lit.recsys.strategy.TorchrecDDPStrategy moved to "
              "models.dlrm.strategy.TorchrecDDPStrategy; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)

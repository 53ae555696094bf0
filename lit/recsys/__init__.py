"""Deprecated: the recommendation code moved in 0.2 and this package goes in the next release.

Model side: :mod:`models.dlrm` (``module``, ``network``, ``sizing``, ``sharded``, ``metrics``,
``strategy``). Data side: :mod:`datamodules.ctr` (``batch``, ``stream``, ``sharding``). The
single-epoch evaluation callback is :class:`callbacks.EvalAtSamples`. The two paths that configs
used, ``lit.recsys.single_epoch.EvalAtSamples`` and ``lit.recsys.strategy.TorchrecDDPStrategy``,
still import, with a ``DeprecationWarning``.
"""

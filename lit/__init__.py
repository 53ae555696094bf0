"""Lightning recipes for 2022 efficiency papers.

Packages: ``lit`` (CLI, base module, optimizers, schedulers, sweep tools), ``models``,
``datamodules`` and ``callbacks``. Heavy libraries (timm, transformers, torchrec) are imported
only when a model that needs them is built, so ``python -m lit --help`` stays quick.
"""

__version__ = "0.1.0"

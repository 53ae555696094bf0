"""Lightning recipes for 2022 efficiency papers.

Packages, each importing only those before it: ``lit`` (the framework: CLI, base module,
schedulers, optimizers, checkpoint checks, the callbacks the CLI adds itself, and one
subpackage per run-driving tool: ``batch_size``, ``scaling``, ``tradeoff``, ``energy``),
``datamodules``, ``models`` and ``callbacks``. The CLI knows no model by name: a model's class
declares what it needs of it (see :class:`lit.module.LitModule`). Heavy libraries (timm,
transformers, torchrec) are imported only when a model that needs them is built, so
``python -m lit --help`` stays quick.
"""

__version__ = "0.1.0"

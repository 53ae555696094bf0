"""The project's LightningCLI: ``python -m lit {fit,validate,test,predict}``.

What it adds to Lightning's CLI:

* models and datamodules in subclass mode (``model: class_path: models.ImageClassifier``);
* ``--optimizer`` / ``--lr_scheduler`` shortcuts (any torch optimizer or scheduler, or ours such
  as ``lit.optim.Adan``) that are handed to :class:`lit.module.LitModule` models as callables,
  so each model still chooses which parameters its optimizer sees;
* TensorBoard logging, a ``ModelCheckpoint`` (``--checkpoint.*``) and a
  ``LearningRateMonitor`` (``--lr_monitor.*``) always present; more callbacks go under
  ``trainer.callbacks``;
* ``fit`` ends by testing the trained model (``--test_after_fit false`` to skip) and printing
  where the logs and checkpoints are;
* SIGINT / SIGTERM during ``fit`` save a checkpoint at the current step, print the resume
  command and exit with 130 / 143 (:class:`lit.signal_checkpoint.SignalCheckpoint`);
* ``--ckpt_path`` is checked before anything runs (a file, a Lightning checkpoint, of this
  config's model class), and a resumed ``fit`` logs into the checkpoint's own version folder, so
  TensorBoard shows one run (``--resume_same_version false`` for a new folder);
* ``--trainer.enable_checkpointing false`` turns the default ``ModelCheckpoint`` off.

The CLI knows no model by name: what a model needs of it, its class declares
(:attr:`lit.module.LitModule.ddp_strategy`: run instead of ``ddp``;
:attr:`lit.module.LitModule.sharded_checkpoint_strategy`: the one that reads its sharded
checkpoints), and the module defining the model registers those strategies with Lightning.
"""

from __future__ import annotations

import logging
import shlex
import sys
import warnings
from functools import partial
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit.checkpoints import (check_checkpoint, import_class, is_sharded_checkpoint,
                             resolve_class_path, version_of_checkpoint)
from lit.module import LitModule
import lit.optim.adan  # noqa: F401  (makes --optimizer Adan resolve)
from lit.run_hparams import RunHparams, flat_hparams
from lit.signal_checkpoint import SignalCheckpoint, StopRequested


class LoggerAwareLearningRateMonitor(LearningRateMonitor):
    """``LearningRateMonitor`` that stays quiet instead of failing when logging is off."""

    @override
    def on_train_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if not trainer.loggers:
            return
        super().on_train_start(trainer, *args, **kwargs)

    @override
    def on_train_batch_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    @override
    def on_train_epoch_start(self, trainer: Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")  # Lightning resolves these itself

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}


class LitCLI(LightningCLI):
    """LightningCLI with this project's defaults (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "yaml", "prog": "python -m lit"})
        super().__init__(*args, **kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Each run has its own version folder; a resumed run writes into its folder again and
        # should update last.ckpt rather than add last-v1.ckpt beside it.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(LoggerAwareLearningRateMonitor, "lr_monitor")
        parser.add_argument(
            "--resume_same_version",
            type=bool,
            default=True,
            help="When `fit` resumes from --ckpt_path inside a logger's version folder, log into "
                 "that folder (one TensorBoard run) instead of a new version.",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the datamodule's test split with the trained weights.",
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        if isinstance(args, (dict, Namespace)):
            self.argv: list[str] | None = None
            self.config = parser.parse_object(args)
        else:
            self.argv = help_for_class(list(sys.argv[1:] if args is None else args))
            for path in config_files(self.argv):
                problem = yaml_problem(path)
                if problem:
                    parser.error(problem)
            self.config = parser.parse_args(qualify_short_names(self.argv))

    @override
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (a file, a Lightning checkpoint, of this config's model class)
        with one clear line on failure, then take the model's saved hyperparameters as
        Lightning's CLI does (from a memory-mapped load: a DLRM's tables are not read)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in SPECIAL_CKPT_PATHS:
            return
        model = self.config[subcommand].get("model")
        model_class = model.get("class_path") if model is not None else None
        strategy = self.config[subcommand].get("trainer", {}).get("strategy")
        if is_sharded_checkpoint(ckpt_path) and isinstance(model_class, str):
            # The model's class names the strategy that reads its sharded checkpoints.
            needed = getattr(import_class(model_class), "sharded_checkpoint_strategy", None)
            if needed and not is_strategy(strategy, needed):
                sys.stderr.write(f"error: --ckpt_path {ckpt_path!r} is a sharded checkpoint (a "
                                 f"DCP folder): load it with --trainer.strategy {needed} (any "
                                 "--trainer.devices, 1 included)\n")
                sys.exit(2)
        try:
            checkpoint = check_checkpoint(ckpt_path, resolve_class_path(model_class)
                                          if isinstance(model_class, str) else None)
        except ValueError as error:
            sys.stderr.write(f"error: {error}\n")
            sys.exit(2)
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        elif isinstance(model_class, str):  # saved by Trainer.save_checkpoint outside the CLI
            hparams = {"class_path": model_class, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    @override
    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # The user's word beats our default checkpoint; fast_dev_run promises to write none.
        if config.get("enable_checkpointing") is False or config.get("fast_dev_run"):
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        # The model's module registered this strategy with Lightning when it was imported.
        swap = getattr(self.model, "ddp_strategy", None)
        if swap and config.get("strategy") == "ddp":
            rank_zero_info(f"[lit] {type(self.model).__name__} shards its own layers: "
                           f"--trainer.strategy ddp runs as {swap}")
            config = {**config, "strategy": swap}
        if self.subcommand == "fit":
            resolved = self.config.get(self.subcommand, self.config).as_dict()
            callbacks = [*callbacks, SignalCheckpoint(), RunHparams(flat_hparams(resolved))]
        return super()._instantiate_trainer(config, callbacks)

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path is not None and ckpt_path not in SPECIAL_CKPT_PATHS \
                and subcommand == "fit" and self._get(self.config, "resume_same_version", True):
            self._log_into_version_of(ckpt_path)
        if subcommand == "fit":  # RunHparams logs one readable entry; Lightning's would be a second
            for obj in (self.model, self.datamodule):
                if obj is not None:
                    obj._log_hyperparams = False
        try:
            super()._run_subcommand(subcommand)
        except StopRequested as stop:
            self._report_outputs()
            if stop.checkpoint and self.argv is not None:
                rank_zero_info("[lit] resume with: " + resume_command(self.argv, stop.checkpoint))
            sys.exit(stop.exit_code)

    def _log_into_version_of(self, ckpt_path: str) -> None:
        """Point an unversioned TensorBoard/CSV logger at the checkpoint's version folder."""
        logger = self.trainer.logger
        if logger is None or getattr(logger, "_version", "missing") is not None:
            return
        version = version_of_checkpoint(ckpt_path, Path(logger.save_dir) / (logger.name or ""))
        if version is not None:
            logger._version = version
            rank_zero_info(f"[lit] resuming in {logger.log_dir}")

    @override
    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """Hand ``--optimizer``/``--lr_scheduler`` to LitModule models as callables.

        Lightning's default instantiates the optimizer over ``model.parameters()`` here, before
        the model has chosen its param groups (no-decay groups, a DLRM's dense part). For our
        models the choice stays with the model; other LightningModules get Lightning's default.
        """
        if not isinstance(self.model, LitModule):
            return super()._add_configure_optimizers_method_to_model(subcommand)
        optimizer_init = self._get(self.config_init, "optimizer")
        scheduler_init = self._get(self.config_init, "lr_scheduler")
        if optimizer_init:
            self.model.optimizer = partial(instantiate_class, init=_as_dict(optimizer_init))
        if scheduler_init:
            self.model.lr_scheduler = partial(instantiate_class, init=_as_dict(scheduler_init))

    @override
    def after_fit(self) -> None:
        trainer = self.trainer
        if self._get(self.config, "test_after_fit", default=True) and not trainer.interrupted:
            if is_overridden_test(self.model, self.datamodule):
                trainer.test(self.model, datamodule=self.datamodule)
        self._report_outputs()

    def _report_outputs(self) -> None:
        trainer = self.trainer
        if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
            rank_zero_info(f"[lit] TensorBoard logs: {trainer.logger.log_dir}  "
                           f"(tensorboard --logdir {trainer.logger.save_dir})")
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            last = getattr(ckpt, "last_model_path", "") or ckpt.best_model_path
            if last:
                rank_zero_info(f"[lit] checkpoint: {last}")


def is_strategy(strategy, name: str) -> bool:
    """``--trainer.strategy`` as configured (a registered name, a ``class_path`` or an instance)
    is the strategy registered as ``name``: the name itself, or a class declaring it as its
    ``strategy_name`` (Lightning's convention)."""
    if isinstance(strategy, str):
        return strategy == name
    class_path = getattr(strategy, "class_path", None) or (
        strategy.get("class_path") if isinstance(strategy, dict) else None)
    if isinstance(class_path, str):
        try:
            cls = import_class(class_path)
        except (ImportError, AttributeError, ValueError):
            return False  # not that strategy (the parser reports a path that does not import)
    else:
        cls = type(strategy)
    return getattr(cls, "strategy_name", None) == name


def qualify_short_names(args: list[str]) -> list[str]:
    """``--optimizer SGD`` -> ``--optimizer torch.optim.SGD`` (likewise ``--lr_scheduler``).

    jsonargparse resolves a short name among all imported subclasses; once torchrec is imported
    (by a DLRM config) ``SGD``, ``Adam`` and ``Adagrad`` also exist in ``torchrec.optim`` and the
    short name becomes ambiguous. torch's own classes, then ours (``Adan``, ``WarmupDecay``), win.
    """
    import torch

    import lit.optim
    import lit.schedulers

    homes = {"--optimizer": (torch.optim, lit.optim),
             "--lr_scheduler": (torch.optim.lr_scheduler, lit.schedulers)}
    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        at = i if eq else i + 1
        if flag not in homes or at >= len(out):
            continue
        value = value if eq else out[at]
        if not value.isidentifier():  # already a class path, or a dict/JSON value
            continue
        for module in homes[flag]:
            if isinstance(getattr(module, value, None), type):
                qualified = f"{module.__name__}.{value}"
                out[at] = f"{flag}={qualified}" if eq else qualified
                break
    return out


def help_for_class(argv: list[str]) -> list[str]:
    """``fit --model models.X --help`` -> ``fit --model.help models.X`` (likewise ``--data``):
    the arguments of that class rather than the whole CLI's."""
    if "--help" not in argv and "-h" not in argv:
        return argv
    for i, arg in enumerate(argv):
        for key in ("--model", "--data"):
            if arg == key and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                return [*argv[:i], f"{key}.help", argv[i + 1]]
            if arg.startswith(key + "="):
                return [*argv[:i], f"{key}.help", arg[len(key) + 1:]]
    return argv


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config`` (as ``--config F`` or ``--config=F``)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--config="):
            out.append(arg[len("--config="):])
    return [path for path in out if Path(path).is_file()]


def yaml_problem(path: str) -> str | None:
    """A YAML syntax error in ``path`` as one message naming the file, line and column."""
    import yaml

    try:
        yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" line {where.line + 1}, column {where.column + 1}" if where else ""
        what = getattr(error, "problem", None) or str(error)
        return f"--config {path}:{at}: YAML syntax error: {what}"
    return None


def resume_command(argv: list[str], ckpt_path: str) -> str:
    """``python -m lit ARGV`` with ``--ckpt_path`` set to ``ckpt_path`` (replacing a given one)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if arg.startswith("--ckpt_path="):
            continue
        out.append(arg)
    return shlex.join(["python", "-m", "lit", *out, "--ckpt_path", ckpt_path])


def _as_dict(init: Namespace | dict) -> dict:
    return init.as_dict() if isinstance(init, Namespace) else dict(init)


def is_overridden_test(model: LightningModule, datamodule: LightningDataModule | None) -> bool:
    """True when the model has a test step and the datamodule a test loader."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("test_step", model):
        return False
    return datamodule is not None and is_overridden("test_dataloader", datamodule)


def quiet_third_party() -> None:
    """Silence third-party messages that ask nothing of the user of this CLI.

    * torchrec's planner warns that ``Topology`` was built directly and that its storage
      estimate may be off: we build the topology for the devices Lightning chose and plan
      fused tables, so neither applies (and "otherwise, the job will fail" is not true here).
    * torch deprecates ``ShardedTensor``, which torchrec still hands out; fbgemm and torch.fx
      log internal deprecations; Lightning advertises a cloud logger.
    * Lightning warns that an ``IterableDataset`` with ``__len__`` may be inexact with several
      workers: the CTR streams split their batches exactly between workers and ranks.
    """
    for message, category in (
        (r".*HeuristicalStorageReservation is known to cause issues", FutureWarning),
        (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
        (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
        (r"Your `IterableDataset` has `__len__` defined", Warning),
        (r"\s*Failed to import: fbgemm_gpu", Warning),
        (r"\s*The Python module fbgemm_gpu.split_table_batched_embeddings_ops is now DEPRECATED",
         Warning),
    ):
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("torchrec.distributed.planner", "torch.fx._symbolic_trace"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger("lightning.pytorch").handlers:
        handler.addFilter(_no_tips)  # a set: adding it again is a no-op


def _no_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def main(args: list[str] | None = None) -> LitCLI:
    """Entry point of ``python -m lit``."""
    quiet_third_party()
    return LitCLI(args=args)

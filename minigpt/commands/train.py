"""``minigpt fit / validate / test``: LightningCLI with minigpt's conventions.

* Block and vocabulary sizes are linked once (data -> model).
* A run lives under ``--trainer.default_root_dir`` (default: the current folder) in
  ``lightning_logs/version_N`` unless the logger is configured with its own ``save_dir``
  (Lightning's rule); ``--ckpt_path last|best`` and a resume into the same version follow it.
* The config holds only what it can write back: ``--print_config`` and a run's ``config.yaml`` re-run.
  The crash-safe checkpoint writer and the fixed callbacks are installed when the Trainer is built.
* No option abbreviations; a bad option or value is one line.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
import warnings
from argparse import ArgumentError
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from minigpt.callbacks import (
    EarlyValidation,
    GenerationCallback,
    GracefulStop,
    KeepFreedMemory,
    LearningRateLog,
    ProgressBar,
    ProgressLog,
)
from minigpt.checkpoint import data_settings, model_config, read_checkpoint, section
from minigpt.checkpointing import RunCheckpoint, use_atomic_writes
from minigpt.cli import did_you_mean, load_yaml_file, parser_options
from minigpt.configs import resolve_config_args
from minigpt.data.datamodule import IMDBDataModule
from minigpt.data.documents import CorpusSpec
from minigpt.errors import UserError
from minigpt.hardware import native_bf16, use_tensor_cores
from minigpt.lit_module import LitMiniGPT, should_compile

log = logging.getLogger(__name__)

RUNS = "lightning_logs"
"""Folder of the runs under the root dir (Lightning's default logger name)."""


def default_config() -> str:
    """The recommended recipe, shipped inside the package (configs/imdb.yaml)."""
    return str(files("minigpt.configs") / "imdb.yaml")


class MiniGPTCLI(LightningCLI):
    """LightningCLI with block/vocab size linked once, fixed checkpointing and same-folder resume."""

    def __init__(self, *args, **kwargs):
        # The options as typed, to tell values the user passed from values of a config file.
        self.typed_args = list(kwargs.get("args") or sys.argv[1:])
        self._checkpoints: dict[str, dict] = {}
        self._typed_parsers: list[LightningArgumentParser] = []
        kwargs.setdefault("save_config_callback", RunConfig)
        super().__init__(*args, **kwargs)

    def _checkpoint(self, path: str) -> dict:
        """Each checkpoint file read once per command (several hooks below need it)."""
        if path not in self._checkpoints:
            self._checkpoints[path] = read_checkpoint(path)
        return self._checkpoints[path]

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise ArgumentError(None, did_you_mean(str(err), self._options_of(self.typed_args[:1]))) from err
        # Lightning reads the checkpoint's hyper-parameters right after parsing, before any hook: check
        # the file first so a missing, empty, corrupt or foreign one is one line, not a traceback.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in ("last", "best"):
            self._checkpoint(ckpt)

    def _options_of(self, command: list[str]) -> list[str]:
        """The options of the subcommand that was typed (its parser's prog ends with its name)."""
        parsers = [p for p in self._typed_parsers if command and p.prog.split()[-1] == command[0]]
        return parser_options(parsers[0]) if parsers else []

    def _passed(self, prefix: str) -> set[str]:
        return {a.split("=")[0][len(prefix) :] for a in self.typed_args if a.startswith(prefix)}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self._typed_parsers.append(parser)  # for "did you mean" after an unknown option
        parser.link_arguments("data.block_size", "model.config.block_size")
        # The vocabulary is known only once the data is tokenized: link it at instantiation.
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_loss",
                "checkpoint.mode": "min",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{step}",
            }
        )
        parser.add_lightning_class_args(GenerationCallback, "generation")
        parser.add_lightning_class_args(EarlyValidation, "early_validation")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg["model"].get("init_from"):
            init_from = cfg["model"]["init_from"]
            self._architecture_from(cfg, init_from, self._checkpoint(init_from), self._passed("--model.config."))
        ckpt = cfg.get("ckpt_path")
        if ckpt:
            cfg["ckpt_path"] = ckpt = resolve_ckpt_path(ckpt, cfg)
            if self.subcommand != "fit":
                self._config_from_checkpoint(cfg, self._checkpoint(ckpt), self._passed("--data."))

    def before_fit(self) -> None:
        # A compile setting the machine cannot honour is refused before the run makes its folder.
        device = self.trainer.strategy.root_device
        should_compile(self.model.hparams.get("compile", False), device, announce=False)
        use_tensor_cores(device)  # before Trainer.fit, which warns about float32 products left to full precision
        if self.trainer.is_global_zero:
            log.info(budget_line(self.trainer, resumed=bool(self.config_init["fit"].get("ckpt_path"))))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # The classes validate their arguments in their constructors: that is bad input.
            raise UserError(_constructor_message(str(err)) or repr(err)) from err  # cli.py prints its first sentence

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = cfg["trainer"]
        if self.subcommand == "fit" and trainer_cfg.get("logger") in (None, True):
            ckpt = cfg.get("ckpt_path")
            kwargs["logger"] = run_logger(trainer_cfg.get("default_root_dir"), ckpt and self._checkpoint(ckpt), ckpt)
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_writes(trainer)
        return trainer

    @staticmethod
    def _architecture_from(cfg, init_from: str, ckpt: dict, passed: set[str]) -> None:
        """Fine-tuning: the model's architecture (and a pretrained tokenizer) come from the checkpoint."""
        for key, value in (ckpt["hyper_parameters"].get("config") or {}).items():
            if key not in ("vocab_size", "block_size", "dropout") and key not in passed:
                cfg["model"]["config"][key] = value
        stored_block = model_config(ckpt, init_from).block_size
        if cfg["data"]["block_size"] > stored_block:
            raise UserError(
                f"data.block_size {cfg['data']['block_size']} is larger than the position table of {init_from} "
                f"({stored_block}); use a block_size <= {stored_block}"
            )
        tok = section(ckpt).get("tokenizer") or {}
        if tok.get("kind") == "bpe" and not cfg["data"].get("tokenizer"):
            cfg["data"]["tokenizer"] = init_from

    @staticmethod
    def _config_from_checkpoint(cfg, hp: dict, passed: set[str]) -> None:
        """validate/test --ckpt_path: build the model (and data vocab) the checkpoint was trained with.

        Lightning fills the model from an explicit path already; ``last``/``best`` need this."""
        for key, value in (hp["hyper_parameters"].get("config") or {}).items():
            if key not in ("vocab_size",):
                cfg["model"]["config"][key] = value
        # Every setting that decides the token ids (CorpusSpec's fields, named as the data module's
        # arguments), so a new data option is carried over without being listed here.
        data = data_settings(hp)
        for key in (f.name for f in dataclasses.fields(CorpusSpec)):
            if key in data and key not in passed:
                cfg["data"][key] = data[key]
        cfg["data"]["block_size"] = cfg["model"]["config"]["block_size"]


def _constructor_message(text: str) -> str:
    """A constructor's own words, also when jsonargparse wraps them in its Union message.

    A class in a list or union (a ``--trainer.callbacks+=`` entry) that refuses its arguments reaches
    here as "Does not validate against any of the Union subtypes", followed by one error per subtype
    (in an order that changes between jsonargparse versions); the constructor's is the one that is not
    about the value's type.
    """
    text = text.strip()
    if not text.startswith("Does not validate against any of the Union subtypes") or "\nErrors:\n" not in text:
        return text
    listed = text.split("\nErrors:\n", 1)[1].split("\nGiven value type:", 1)[0]
    errors = [line[4:] for line in listed.splitlines() if line.startswith("  - ")]  # not their nested lists
    about_the_type = ("Expected a ", "Not a valid subclass of ", "Does not validate against ")
    own = [e for e in errors if not e.startswith(about_the_type)]
    return own[0] if len(own) == 1 else text


def runs_root(cfg) -> Path:
    """The folder holding the runs (version_N): the logger's own save_dir if given, else default_root_dir."""
    logger = cfg["trainer"].get("logger")
    init = logger.get("init_args", {}) if hasattr(logger, "get") else {}
    if init and init.get("save_dir"):
        return Path(init["save_dir"]) / (init.get("name") or RUNS)
    return Path(cfg["trainer"].get("default_root_dir") or ".") / RUNS


def resolve_ckpt_path(ckpt: str, cfg) -> str:
    """``last``/``best`` -> the newest such file under <runs root>/version_*/checkpoints/; else the path."""
    if ckpt in ("last", "best"):
        root = runs_root(cfg)
        pattern = "last.ckpt" if ckpt == "last" else "best-*.ckpt"
        found = sorted(root.glob(f"version_*/checkpoints/{pattern}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"--ckpt_path {ckpt}: no {pattern} under {root}/version_*/checkpoints/")
        return str(found[-1])
    return ckpt  # a given file was checked right after parsing (MiniGPTCLI.parse_arguments)


def run_logger(root: str | None, ckpt: dict | None, ckpt_path: str | None) -> TensorBoardLogger:
    """The TensorBoard logger of a run: a new version under root, or the version a checkpoint came from.

    A resumed run logs into the checkpoint's ``lightning_logs/version_N`` from the checkpoint's step
    on (events a killed run logged after it are dropped: one continuous curve).
    """
    kwargs: dict[str, Any] = {"save_dir": root or ".", "name": RUNS, "default_hp_metric": False}
    path = Path(ckpt_path) if ckpt_path else None
    if path is not None and path.parent.name == "checkpoints" and path.parent.parent.name.startswith("version_"):
        version_dir = path.parent.parent
        kwargs.update(save_dir=str(version_dir.parent.parent), name=version_dir.parent.name, version=version_dir.name)
        if ckpt and ckpt.get("global_step"):
            # Every event of step N is written before any checkpoint of step N (minigpt logs each value at
            # the number of optimizer steps done when it was measured), so later ones are the dropped ones.
            kwargs["purge_step"] = int(ckpt["global_step"]) + 1
    return TensorBoardLogger(**kwargs)


class RunConfig(SaveConfigCallback):
    """Lightning's config saving, without ``ckpt_path``: a run's ``config.yaml`` starts a new run.

    The saved file is how the run was made, to re-run it (elsewhere, or with other options); the
    checkpoint to resume from is given when resuming (``--ckpt_path last``), as the last lines of a fit
    print. A resume into the same version rewrites its ``config.yaml`` with the options it ran with.
    """

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        if "ckpt_path" in self.config:
            self.config = self.config.clone()
            self.config["ckpt_path"] = None
        super().setup(trainer, pl_module, stage)


def budget_line(trainer: Trainer, resumed: bool = False) -> str:
    """How long a fit will train, and how to change it: one line printed when training starts.

    Args:
        trainer: the fit's trainer, before it runs.
        resumed: the fit resumes a checkpoint, whose steps, epochs and time Lightning counts in its limits.

    Returns:
        e.g. "training for 10 minutes (trainer.max_time); --trainer.max_time 00:01:00:00 trains longer".
    """
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    seconds = timer.time_remaining("train") if timer is not None else None  # the whole budget: nothing ran yet
    limits = []
    if seconds is not None:
        hint = f"--trainer.max_time {_dd_hh_mm_ss(max(2 * seconds, 3600))}"
        limits.append((f"{_duration(seconds)} (trainer.max_time)", hint))
    if trainer.max_steps > 0:
        hint = f"--trainer.max_steps {2 * trainer.max_steps}"
        limits.append((f"{_count(trainer.max_steps, 'step')} (trainer.max_steps)", hint))
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        hint = f"--trainer.max_epochs {2 * trainer.max_epochs}"
        limits.append((f"{_count(trainer.max_epochs, 'epoch')} (trainer.max_epochs)", hint))
    if not limits:
        return "training until stopped (no trainer.max_time, max_steps or max_epochs); Ctrl-C saves and stops"
    words = " or ".join(limit for limit, _ in limits)
    words += " in all, the checkpoint's included" if resumed else ""
    words += ", whichever comes first" if len(limits) > 1 else ""
    return f"training for {words}; {limits[0][1]} trains longer"


def _count(n: int, unit: str) -> str:
    return f"{n:,} {unit}{'s' if n != 1 else ''}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    parts = [(seconds // 86400, "day"), (seconds // 3600 % 24, "hour"), (seconds // 60 % 60, "minute"),
             (seconds % 60, "second")]  # fmt: skip
    return " ".join(_count(n, unit) for n, unit in parts if n) or "0 seconds"


def _dd_hh_mm_ss(seconds: float) -> str:
    """Lightning's max_time string (DD:HH:MM:SS)."""
    seconds = round(seconds)
    return f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _NoTips(logging.Filter):
    """Lightning's advertising tips ("💡 Tip: ...") are not about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)  # where Lightning's rank_zero_info records are made
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())
    # "Seed set to 42" would stand before any one-line error about the data; the seed is in config.yaml.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    # Deprecation notices that dependencies raise about each other: nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # The summary's size estimate assumes 32-bit weights under bf16-mixed; the weights are 32-bit there.
    warnings.filterwarnings("ignore", message="Precision .* is not supported by the model summary")


def run_lightning_cli(command: str, argv: list[str]) -> None:
    argv = resolve_config_args(argv)  # --config tiny: the shipped recipe when no file of that name exists
    # `minigpt fit` alone runs the recommended recipe; a --config replaces it (never merges with it,
    # which would leak the recipe's settings into e.g. seed.yaml).
    if command == "fit" and not any(a in ("--config", "-c") or a.startswith("--config=") for a in argv):
        argv = ["--config", default_config(), *argv]
    for path in config_files(argv):
        load_yaml_file(path)  # a YAML error names the file, line and column (the parser says neither)
    _quiet_lightning()
    terminal = sys.stdout.isatty()
    callbacks = [LearningRateLog(), GracefulStop(), KeepFreedMemory()]
    callbacks.append(ProgressBar() if terminal else ProgressLog())
    try:
        cli = _build_and_run(command, argv, terminal, callbacks)
    except FloatingPointError as err:  # the run diverged (non-finite loss or gradient): a message, not a bug
        raise UserError(str(err)) from err
    if command == "fit":
        _print_next_steps(cli.trainer, next(c for c in callbacks if isinstance(c, GracefulStop)))


def config_files(argv: list[str]) -> list[str]:
    """The config files a command line names.

    Args:
        argv: the options after the command.

    Returns:
        The values of ``--config``/``-c`` that are existing paths or end in .yaml, .yml or .json (the
        parser also takes inline YAML, which is left to it).
    """
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    values += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return [v for v in values if Path(v).expanduser().exists() or v.endswith((".yaml", ".yml", ".json"))]


def _build_and_run(command: str, argv: list[str], terminal: bool, callbacks: list) -> MiniGPTCLI:
    return MiniGPTCLI(
        LitMiniGPT,
        IMDBDataModule,
        args=[command, *argv],
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        # Parse errors come back as exceptions so main() reports them in one line.
        parser_kwargs={
            "exit_on_error": False,
            "allow_abbrev": False,
            command: {"exit_on_error": False, "allow_abbrev": False},
        },
        trainer_defaults={
            # validate/test print their metrics; only training runs get a lightning_logs/version_N
            # (the run's logger is built in MiniGPTCLI.instantiate_trainer, under default_root_dir).
            **({} if command == "fit" else {"logger": False}),
            # A bar in a log file is noise: ProgressLog prints plain lines there instead.
            **({} if terminal else {"enable_progress_bar": False}),
            "callbacks": callbacks,
            "precision": default_precision(),
        },
    )


def default_precision() -> str:
    """The Trainer's precision when the config sets none: bf16-mixed where the device that trains (a GPU when
    there is one) computes bfloat16 natively, and 32-true elsewhere (emulated bfloat16 would be slower)."""
    return "bf16-mixed" if native_bf16("cuda" if torch.cuda.is_available() else "cpu") else "32-true"


def _print_next_steps(trainer: Trainer, stop: GracefulStop) -> None:
    """Where the run is and the commands that use it (the last lines of a fit that ended or stopped)."""
    if not trainer.is_global_zero or trainer.logger is None:
        return
    run = Path(trainer.logger.log_dir)
    ckpt = trainer.checkpoint_callback
    last = Path(ckpt.last_model_path) if ckpt is not None and ckpt.last_model_path else stop.saved
    if last is None or not last.is_file():
        return
    q = shlex.quote
    lines = [
        f"run         {run}  (checkpoint {last})",
        f"generate    minigpt generate --ckpt_path {q(str(last))} --prompt 'the movie was'",
        f"evaluate    minigpt evaluate --ckpt_path {q(str(last))}",
        f"resume      minigpt fit --config {q(str(run / 'config.yaml'))} --ckpt_path {q(str(last))}",
        f"tensorboard tensorboard --logdir {q(str(run.parent))}",
    ]
    print("\n".join(lines), file=sys.stderr)

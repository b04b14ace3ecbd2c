"""The ``minigpt`` command: Lightning's ``fit/validate/test`` plus minigpt's own tools.

    minigpt fit      [--config configs/imdb.yaml] [--trainer.* --model.* --data.*]
    minigpt validate / test --ckpt_path PATH
    minigpt prepare | plot | generate | evaluate | convert | compare  [--help]

Each command lives in ``minigpt/commands/<name>.py`` and is imported only when it runs, so
``minigpt --help`` and ``minigpt generate`` start without Lightning. A `UserError` (and an
argument error) is one line on stderr and exit code 2; ``MINIGPT_DEBUG=1`` adds its traceback.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from minigpt.errors import UserError

COMMANDS = {
    "fit": "train a model (default recipe: configs/imdb.yaml); Lightning's fit",
    "validate": "score a checkpoint on the validation split; Lightning's validate",
    "test": "score a checkpoint on the test split; Lightning's test",
    "prepare": "download (if asked), tokenize and cache the data; print what a run will see",
    "plot": "draw a run's train/validation loss curves from its TensorBoard files into a PNG",
    "generate": "continue prompts with a trained checkpoint (greedy, temperature, top-k, top-p)",
    "evaluate": "score a checkpoint on a split or a text file: loss, perplexity, bits per character",
    "convert": "Hugging Face GPT-2 folder -> minigpt checkpoint (--from_hf), or back (--to_hf)",
    "compare": "a minigpt checkpoint and a Hugging Face model side by side: samples and bits per character",
    "serve": "an OpenAI-compatible HTTP server (streaming, continuous batching) with a playground page",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test")


def __getattr__(name: str) -> Any:
    # Names older callers import from here; importing them loads Lightning, so only on demand.
    if name in ("MiniGPTCLI", "default_config"):
        return getattr(importlib.import_module("minigpt.commands.train"), name)
    if name == "spread":
        return importlib.import_module("minigpt.commands.evaluate").spread
    raise AttributeError(name)


def _usage() -> str:
    lines = ["usage: minigpt {" + ",".join(COMMANDS) + "} ...", ""]
    lines += [f"  {name:<9} {summary}" for name, summary in COMMANDS.items()]
    lines += ["", "minigpt COMMAND --help shows a command's options; minigpt --version, the versions in use."]
    return "\n".join(lines)


def _fail(message: str) -> None:
    print(f"minigpt: error: {message}", file=sys.stderr)
    sys.exit(2)


def _first_sentence(message: str) -> str:
    """The first line of an error, with the lines after it while it ends in a colon (jsonargparse writes
    'Parser key "model.optimizer":' and says what was wrong on the next line). Never cut inside a line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    sentence = lines.pop(0)
    while sentence.endswith(":") and lines:
        sentence = f"{sentence} {lines.pop(0)}"
    return sentence


def did_you_mean(message: str, options: Iterable[str]) -> str:
    """Name the closest known option for each unknown one in an argument parser's error.

    Args:
        message: the parser's error, e.g. "unrecognized arguments: --trainer.max_step 5".
        options: the options the parser knows (``--trainer.max_steps``, ...).

    Returns:
        ``message`` with "(did you mean --trainer.max_steps?)" added, or unchanged when it is not about
        unknown options or none is close.
    """
    if "unrecognized arguments" not in message.lower():
        return message
    known = sorted(set(options))
    unknown = [word.split("=")[0] for word in message.split(":", 1)[-1].split() if word.startswith("--")]
    pairs = [(word, _closest(word, known)) for word in unknown]
    hints = [f"{match} for {word}" if len(unknown) > 1 else match for word, match in pairs if match]
    return f"{message.rstrip('.')} (did you mean {', '.join(hints)}?)" if hints else message


def _closest(word: str, known: list[str]) -> str | None:
    # A cut-short option (--temp) means the shortest one it starts; otherwise the most similar spelling.
    started = [option for option in known if option.startswith(word)]
    if started:
        return min(started, key=len)
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return close[0] if close else None


def parser_options(parser) -> list[str]:
    """The options a jsonargparse parser accepts.

    Args:
        parser: a jsonargparse ``ArgumentParser`` (or Lightning's subclass).

    Returns:
        ``--name`` for each of its keys (nested ones dotted), with --help, --config and --print_config;
        empty when the parser cannot build its defaults.
    """
    try:
        keys = list(parser.get_defaults().keys())
    except Exception:  # a parser that cannot build its defaults just gets no suggestion
        return []
    return [f"--{key}" for key in keys] + ["--help", "--config", "--print_config"]


def load_yaml_file(path: str, option: str = "--config") -> Any:
    """Read a YAML config file.

    Args:
        path: the file.
        option: the option that named it, for the error message.

    Returns:
        The parsed YAML.

    Raises:
        UserError: the file is missing, a folder, not text, or not valid YAML (naming line and column).
    """
    import yaml

    file = Path(path).expanduser()
    if file.is_dir():
        raise UserError(f"{option} {path} is a folder; pass a YAML config file such as configs/tiny.yaml")
    if not file.is_file():
        raise UserError(f"{option} {path} does not exist")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{option} {path} is not a text file; pass a YAML config such as configs/tiny.yaml") from err
    except yaml.YAMLError as err:
        raise UserError(f"{option} {path} {_yaml_problem(err)}; fix the YAML syntax there") from err


def _yaml_problem(err: Exception) -> str:
    """Where and what a YAML syntax error is, as words: 'has a YAML error at line 3, column 6: ...'."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:
        return f"is not valid YAML ({_first_sentence(str(err)) or type(err).__name__})"
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None and (context_mark.line, context_mark.column) != (mark.line, mark.column):
        context = f" ({context} that starts at line {context_mark.line + 1}, column {context_mark.column + 1})"
    else:
        context = f" ({context})" if context else ""
    return f"has a YAML syntax error at {where}: {problem}{context}"


def _is_user_error(err: BaseException) -> bool:
    """Errors that are about the input, not bugs: minigpt's own, and the argument parsers'."""
    kinds: list[type] = [UserError]
    for module, name in (
        ("argparse", "ArgumentError"),
        ("jsonargparse", "ArgumentError"),
        ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),
    ):
        loaded = sys.modules.get(module)  # an error type of a module never imported cannot be raised
        if loaded is not None and hasattr(loaded, name):
            kinds.append(getattr(loaded, name))
    return isinstance(err, tuple(kinds))


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr (which tests and notebooks replace), not the one at start-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("minigpt")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


_default_formatwarning = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """minigpt's own warnings (e.g. unknown prompt words) as one line; others as Python prints them."""
    if "/minigpt/" in filename.replace("\\", "/"):
        return f"minigpt: warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


def run_command(name: str, argv: list[str]) -> None:
    """Parse ``argv`` into the arguments of ``minigpt.commands.<name>.<name>`` and call it.

    A command module may define ``add_arguments(parser, argv) -> set[str]`` for options that are
    not plain parameters (e.g. a class's arguments); the names it returns are left out of the signature.
    """
    from argparse import ArgumentError

    from jsonargparse import ArgumentParser

    module = importlib.import_module(f"minigpt.commands.{name}")
    function = getattr(module, name)
    parser = ArgumentParser(
        prog=f"minigpt {name}", description=COMMANDS[name], exit_on_error=False, allow_abbrev=False
    )  # fmt: skip
    skip = module.add_arguments(parser, argv) if hasattr(module, "add_arguments") else set()
    skip |= _add_flags(parser, function)
    parser.add_function_arguments(function, skip=skip, as_group=False)
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as err:
        raise ArgumentError(None, did_you_mean(str(err), parser_options(parser))) from err
    function(**cfg.as_dict())


def _add_flags(parser, function) -> set[str]:
    """Boolean parameters as flags (``--json``, ``--no_json``), lists of strings as repeatable options."""
    import inspect

    import docstring_parser
    from jsonargparse import ActionYesNo

    docs = {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__ or "").params}
    added = set()
    for name, param in inspect.signature(function).parameters.items():
        if param.annotation in (bool, "bool"):
            parser.add_argument(f"--{name}", action=ActionYesNo, default=param.default, help=docs.get(name))
        elif param.annotation in (list[str] | None, "list[str] | None"):
            parser.add_argument(f"--{name}", action="append", default=param.default, help=docs.get(name))
        else:
            continue
        added.add(name)
    return added


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        # From the installed metadata: importing torch or Lightning for this would take seconds.
        from importlib.metadata import PackageNotFoundError, version

        from minigpt import __version__

        found = []
        for dist in ("torch", "lightning"):
            try:
                found.append(f"{dist} {version(dist)}")
            except PackageNotFoundError:
                found.append(f"{dist} not installed")
        print(f"minigpt {__version__} ({', '.join(found)}, Python {sys.version.split()[0]})")
        return
    warnings.formatwarning = _one_line_warning
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _fail(f"unknown command {command!r}; run 'minigpt --help' for the list")
    _setup_logging()
    try:
        if command in LIGHTNING_COMMANDS:
            from minigpt.commands.train import run_lightning_cli

            run_lightning_cli(command, rest)
        else:
            run_command(command, rest)
    except KeyboardInterrupt:
        _fail("interrupted")
    except Exception as err:
        if not _is_user_error(err):
            raise
        if os.environ.get("MINIGPT_DEBUG") == "1":
            traceback.print_exc()
        _fail(_first_sentence(str(err)) or type(err).__name__)


if __name__ == "__main__":
    main()

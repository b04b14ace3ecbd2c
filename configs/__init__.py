"""The recipes shipped with minigpt (installed as ``minigpt.configs``): one LightningCLI YAML file each.

``--config`` takes a file, or the name of a recipe here (``--config tiny``), so a command run
outside the checkout, where there is no ``configs/`` folder, still finds them::

    minigpt fit --config tiny
    minigpt prepare --config imdb

A file of that name in the current folder wins over the recipe.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from minigpt.errors import UserError

_NAME = re.compile(r"[\w.-]+")  # no path separator, no YAML syntax: meant as a file name or a recipe name
_CONFIG_OPTIONS = ("--config", "-c")


def recipes() -> list[str]:
    """The names of the shipped recipes (``imdb``, ``seed``, ``tiny``, ...)."""
    return sorted(entry.name[: -len(".yaml")] for entry in files(__name__).iterdir() if entry.name.endswith(".yaml"))


def recipe_path(name_or_path: str) -> str:
    """The file a ``--config`` value means: an existing file as given, else the shipped recipe of that name.

    A value with a path separator or YAML syntax in it (``runs/config.yaml``, ``{trainer: {max_steps: 5}}``)
    is returned as it is, for the Lightning CLI to read or to report.

    Args:
        name_or_path: the value given to ``--config``.

    Returns:
        ``name_or_path`` itself, or the path of the installed recipe ``<name>.yaml``.

    Raises:
        UserError: ``name_or_path`` is a bare name that is neither a file nor a recipe.
    """
    if Path(name_or_path).is_file() or not _NAME.fullmatch(name_or_path):
        return name_or_path
    names = recipes()
    if name_or_path in names:
        return str(files(__name__) / f"{name_or_path}.yaml")
    raise UserError(
        f"--config {name_or_path} is neither a file nor a recipe; give a YAML file or one of {', '.join(names)}"
    )


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config``/``-c`` value passed through `recipe_path`.

    Args:
        argv: command-line options, e.g. ``["--config", "tiny", "--trainer.max_steps", "5"]``.

    Returns:
        A new list; only the config values differ.
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in _CONFIG_OPTIONS and i + 1 < len(out):
            out[i + 1] = recipe_path(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + recipe_path(arg.split("=", 1)[1])
    return out

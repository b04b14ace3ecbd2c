"""The installed package: what the wheel holds, ``minigpt --version``, and recipes by name (``--config tiny``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

import minigpt
from minigpt.cli import main
from minigpt.configs import recipe_path, recipes, resolve_config_args
from minigpt.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def _source_files() -> dict[str, Path]:
    """Path in the wheel -> file in the checkout, for every file the packages hold (caches aside)."""
    found = {}
    for top, prefix in ((ROOT / "minigpt", "minigpt"), (ROOT / "configs", "minigpt/configs")):
        for path in top.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                found[f"{prefix}/{path.relative_to(top).as_posix()}"] = path
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built as CI and a user build it: from a clean copy of the checkout (the files git would
    clone), so a stale build/ folder of the checkout cannot add or hide anything."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the tracked files from")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    clean = tmp_path_factory.mktemp("clean")
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a file deleted but not yet committed is listed too
            (clean / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clean / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(clean), "-w", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    (built,) = out.glob("minigpt-*.whl")
    return built


def test_wheel_holds_every_module_and_data_file_of_the_packages(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
        expected = _source_files()
        missing, extra = sorted(set(expected) - shipped), sorted(shipped - set(expected))
        assert not missing and not extra, f"missing from the wheel: {missing}; not in the source: {extra}"
        for name, path in expected.items():
            assert zf.read(name) == path.read_bytes(), name
        (info,) = {n.split("/")[0] for n in names} - {"minigpt"}
        metadata = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert metadata["Version"] == minigpt.__version__
    assert metadata["License-Expression"] == "MIT"
    assert "minigpt = minigpt.cli:main" in entry_points
    assert {"minigpt/commands/train.py", "minigpt/configs/tiny.yaml", "minigpt/data/datamodule.py"} <= shipped


def test_version_names_minigpt_torch_and_lightning_without_importing_them():
    code = (
        "import sys; from minigpt.cli import main; main(['--version']);"
        "print([m for m in ('torch', 'lightning', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    line, imported = out.splitlines()
    assert line.startswith(
        f"minigpt {minigpt.__version__} (torch {version('torch')}, lightning {version('lightning')}, Python "
    )
    assert imported == "[]"


def test_recipe_names_are_the_shipped_yaml_files():
    assert {"imdb", "seed", "tiny"} <= set(recipes())
    for name in recipes():
        shipped = Path(recipe_path(name))
        assert shipped.is_file() and shipped.read_bytes() == (ROOT / "configs" / f"{name}.yaml").read_bytes()


def test_config_value_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("trainer: {max_steps: 1}\n")
    assert recipe_path("tiny") == "tiny"  # a file of that name wins over the recipe
    assert Path(recipe_path("seed")).name == "seed.yaml" and Path(recipe_path("seed")).is_absolute()
    inline = "{trainer: {max_steps: 5}}"
    for given in ("runs/missing.yaml", inline):  # paths and inline YAML are the Lightning CLI's to read
        assert recipe_path(given) == given
    with pytest.raises(UserError, match=r"^--config tiny\.yml is neither a file nor a recipe; .* imdb, seed, tiny"):
        recipe_path("tiny.yml")
    argv = ["--config", "seed", "--config=imdb", "-c", inline, "--trainer.max_steps", "5"]
    assert resolve_config_args(argv) == [
        "--config", recipe_path("seed"), f"--config={recipe_path('imdb')}", "-c", inline, "--trainer.max_steps", "5"
    ]  # fmt: skip


def test_fit_config_by_name_outside_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "tiny", "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    assert printed["trainer"]["max_steps"] == tiny["trainer"]["max_steps"]
    assert printed["model"]["config"]["n_embd"] == tiny["model"]["config"]["n_embd"]


@pytest.mark.parametrize("command", ["fit", "validate", "prepare"])
def test_unknown_recipe_name_is_one_line_and_exit_2(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([command, "--config", "tiyn"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    names = ", ".join(recipes())
    assert err == f"minigpt: error: --config tiyn is neither a file nor a recipe; give a YAML file or one of {names}\n"


def test_prepare_reads_the_data_settings_of_a_recipe_by_name(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["prepare", "--config", "tiny", "--data.source", "text", "--data.text_path", str(corpus), "--json"])
    summary = json.loads(capsys.readouterr().out)
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["data"]
    assert (summary["block_size"], summary["batch_size"]) == (tiny["block_size"], tiny["batch_size"])

"""The source files a model folder needs so that transformers runs minigpt's architecture without minigpt.

`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` imports `configuration_minigpt.py` and
`modeling_minigpt.py` from DIR, and transformers copies beside them only the files those modules import
relatively (`from .name import ...`: `transformers.dynamic_module_utils.get_relative_import_files` follows
these lines, and nothing else). So the folder gets every minigpt module the two entry modules reach,
each under a flat name (`minigpt.config` -> `minigpt_config.py`; the modules of this subpackage keep their
own names), with each `from minigpt... import` statement rewritten into the flat relative import. Nothing
else in a file changes: the exported code is the package's code, not a second copy of the model.

In a folder loaded as remote code, this module runs from the flat files and finds them already
rewritten, so a model loaded either way saves a complete folder (`MiniGPTConfig.save_pretrained` calls
`write_source_files`). Only the standard library is imported here, because this file is exported too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "minigpt"
"""The package whose absolute imports are rewritten (`from minigpt.x import y` -> `from .minigpt_x import y`)."""
ENTRY_MODULES = ("configuration_minigpt", "modeling_minigpt")
"""The modules `config.json`'s `auto_map` names; every other file is reached from their imports."""

_HERE = Path(__file__).resolve().parent
# In the package this file is minigpt/<subpackage>/source_files.py; in an exported folder no `from minigpt`
# import is left, so neither name below is used there.
_ROOT = _HERE.parent
_SUBPACKAGE = f"{PACKAGE}.{_HERE.name}"


def flat_name(module: str) -> str:
    """The file name (without .py) of a package module in an exported folder: `minigpt.kernels.loss` ->
    `minigpt_kernels_loss`; a module of this subpackage keeps its own name."""
    if module.startswith(_SUBPACKAGE + "."):
        return module[len(_SUBPACKAGE) + 1 :]
    return module.replace(".", "_")


def source_files() -> dict[str, str]:
    """Every file an exported folder needs: flat file name -> source text (rewritten where it came from the package).

    Run from remote code, only the files transformers copied are there: those the configuration needs when
    only the configuration was loaded (then the model's files come from `custom_object_save`, see
    `PreTrainedModel.save_pretrained`).

    Raises:
        ValueError: a module imports minigpt in a form that has no flat equivalent (`import minigpt.x`, a
            name re-exported by a package `__init__`, a relative import above its own folder).
    """
    todo = [_HERE / f"{name}.py" for name in ENTRY_MODULES if (_HERE / f"{name}.py").is_file()]
    files: dict[str, str] = {}
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        text, needs = _rewrite(path)
        files[path.name if path.parent == _HERE else _flat_file(path)] = text
        todo += needs
    return dict(sorted(files.items()))


def write_source_files(folder: str | Path) -> list[Path]:
    """Write `source_files()` into `folder` (replacing files of the same names); returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in source_files().items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written


# -- one file ----------------------------------------------------------------------------------------


def _flat_file(path: Path) -> str:
    parts = path.relative_to(_ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return flat_name(".".join((PACKAGE, *parts))) + ".py"


def _module_path(module: str) -> Path | None:
    """The file of a package module (`minigpt.a.b` -> .../a/b.py or .../a/b/__init__.py), None if it is none."""
    base = _ROOT.joinpath(*module.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _rewrite(path: Path) -> tuple[str, list[Path]]:
    """(path's text with its minigpt imports made flat and relative, the files it imports)."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    lines = text.splitlines(keepends=True)
    needs: list[Path] = []
    edits: list[tuple[ast.stmt, list[str]]] = []
    for node in ast.walk(tree):  # imports inside functions too
        if isinstance(node, ast.Import):
            if any(a.name == PACKAGE or a.name.startswith(PACKAGE + ".") for a in node.names):
                raise ValueError(f"{path}:{node.lineno}: write `from {PACKAGE}.x import y`, not `import {PACKAGE}...`")
        elif isinstance(node, ast.ImportFrom) and node.level:
            if node.level > 1 or node.module is None:
                raise ValueError(f"{path}:{node.lineno}: only `from .name import ...` relative imports are exported")
            needs.append(path.parent / f"{node.module}.py")  # an exported folder's flat sibling
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            statements = _flat_imports(path, node, tree)
            edits.append((node, statements))
            needs += [p for p in (_module_path(m) for m in _imported_modules(node)) if p is not None]
    for node, statements in sorted(edits, key=lambda e: -e[0].lineno):
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][: node.col_offset]
        tail = lines[last][node.end_col_offset :]
        if indent.strip() or tail.strip():
            raise ValueError(f"{path}:{node.lineno}: put a minigpt import on lines of its own")
        lines[first : last + 1] = [indent + s + "\n" for s in statements]
    return "".join(lines), needs


def _imported_modules(node: ast.ImportFrom) -> list[str]:
    """The package modules the flat form of a `from minigpt... import` statement imports: the submodules it
    names, and its module when it also names something else."""
    submodules = [f"{node.module}.{a.name}" for a in node.names if _module_path(f"{node.module}.{a.name}")]
    return submodules if len(submodules) == len(node.names) else [node.module, *submodules]


def _flat_imports(path: Path, node: ast.ImportFrom, tree: ast.Module) -> list[str]:
    """The flat relative statements equivalent to one `from minigpt... import` statement.

    Names are imported from the flat file of their module. A submodule (`from minigpt import kernels`) is
    bound with `from . import minigpt_kernels as kernels`, which transformers' file search does not see, so
    a second line names the file through the attributes the module uses (`from .minigpt_kernels import a, b`).
    """
    names, statements = [], []
    for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        if _module_path(submodule) is None:
            names.append(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}")
            continue
        bound = alias.asname or alias.name
        used = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                       and isinstance(n.value, ast.Name) and n.value.id == bound})  # fmt: skip
        if not used:
            raise ValueError(f"{path}:{node.lineno}: module {submodule} is imported but none of its names is used")
        statements.append(f"from . import {flat_name(submodule)} as {bound}")
        statements.append(f"from .{flat_name(submodule)} import {', '.join(used)}  # noqa: F401 (names the file)")
    if names:
        if node.module == PACKAGE or _module_path(node.module) is None:
            what = ", ".join(names)
            raise ValueError(f"{path}:{node.lineno}: import {what} from the module that defines it, not {node.module}")
        statements.insert(0, f"from .{flat_name(node.module)} import {', '.join(names)}")
    return statements

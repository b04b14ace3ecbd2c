"""The minigpt checkpoint format: what a checkpoint file holds, and reading it back without Lightning.

A checkpoint is the dict Lightning's `Trainer.save_checkpoint` writes for a `LitMiniGPT`, with a
`"minigpt"` section that this module owns. Every value is a tensor or a plain Python type, so it
loads with `torch.load(weights_only=True)`::

    state_dict         {"model.<GPT parameter name>": Tensor, ...}
    hyper_parameters   {"config": asdict(GPTConfig), <LitMiniGPT's training arguments>...}
    minigpt            {"format": FORMAT_VERSION,
                        "tokenizer": tokenizer.to_dict(),   # word Vocab or BPE, see tokenizer.py
                        "data": {<IMDBDataModule arguments the model was trained with>},
                        "rng": {"torch": Tensor, "cuda": [Tensor] | None} | absent}
    (Lightning's own keys: epoch, global_step, loops, optimizer_states, lr_schedulers, callbacks, ...)

Inference (`load_model`), conversion and fine-tuning read only `state_dict`, `hyper_parameters.config`
and `minigpt.tokenizer`; resuming reads everything. This module imports torch and minigpt's pure
pieces only: `minigpt generate`/`evaluate` never load Lightning or transformers.

References: litgpt loads `lit_model.pth` with plain torch (`litgpt/utils.py` `load_checkpoint`).
"""

from __future__ import annotations

import errno
import importlib.metadata
import io
import os
import pickle
import re
import secrets
import shutil
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from minigpt.config import GPTConfig
from minigpt.errors import UserError
from minigpt.model import GPT
from minigpt.tokenizer import tokenizer_from_dict

FORMAT_VERSION = 1
"""Version of the `"minigpt"` section; a reader refuses a newer one."""

MODEL_PREFIX = "model."
"""`LitMiniGPT` holds the `GPT` as `self.model`, so its weights are stored under this prefix."""


# -- reading -------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a minigpt checkpoint without executing code (`weights_only=True`), or say why not.

    Raises:
        UserError: the file is missing, empty, not a PyTorch file, truncated or corrupt, a PyTorch
            file that is not a minigpt checkpoint, or of a newer format.
    """
    ckpt = _torch_load(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(
            f"{path} is a PyTorch file but not a minigpt checkpoint (it has no state_dict and hyper_parameters); "
            f"{_PASS_A_CHECKPOINT}"
        )
    version = section(ckpt).get("format", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format {version!r}, newer than this minigpt reads ({FORMAT_VERSION}); "
            "upgrade minigpt to load it"
        )
    return ckpt


_PASS_A_CHECKPOINT = "pass a .ckpt file written by minigpt fit"

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip: torch.save's format
_PICKLE_MAGIC = b"\x80"  # pickle protocol 2 and later: torch.save's format before PyTorch 1.6


def _torch_load(path: str | Path, what: str, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` of a file, or a `UserError` that says in one sentence what the file is.

    A file torch cannot read is told apart by its first bytes (torch writes a zip archive, or a pickle
    before PyTorch 1.6) rather than by torch's message, which is several paragraphs long.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{what} {path} is a folder; {_PASS_A_CHECKPOINT} (e.g. checkpoints/last.ckpt)")
    if not p.is_file():
        raise UserError(f"{what} {path} does not exist")
    if p.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(4)
    is_zip = head.startswith(_ZIP_MAGIC)
    if not is_zip and not head.startswith(_PICKLE_MAGIC):
        raise UserError(f"{path} is not a PyTorch checkpoint (it is not a zip or pickle file); {_PASS_A_CHECKPOINT}")
    if is_zip and not zipfile.is_zipfile(p):
        raise UserError(
            f"{what} {path} is truncated (its zip archive has no end: the file was cut off while it was written "
            "or copied); use another checkpoint of the run, e.g. its last.ckpt"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise UserError(_unreadable(path, what, is_zip, err)) from err


def _unreadable(path: str | Path, what: str, is_zip: bool, err: Exception) -> str:
    """Why torch could not load a zip or pickle file, in one sentence."""
    if isinstance(err, pickle.UnpicklingError) and re.search(r"Unsupported (global|class)", str(err)):
        # The weights-only unpickler refused to build a Python object (it never runs a file's code).
        return (
            f"{path} holds Python objects besides tensors and plain values, so it is not a minigpt {what} "
            f"(minigpt loads only those, without running code from the file); {_PASS_A_CHECKPOINT}"
        )
    if not is_zip:
        return f"{path} is a pickle file that PyTorch cannot load as a checkpoint; {_PASS_A_CHECKPOINT}"
    return (
        f"{what} {path} is corrupt: it is a zip archive, but PyTorch cannot read it as a checkpoint "
        f"({type(err).__name__}); use another checkpoint of the run, e.g. its last.ckpt"
    )


def section(ckpt: dict) -> dict:
    """The checkpoint's `"minigpt"` section (empty for a foreign Lightning checkpoint)."""
    return ckpt.get("minigpt") or {}


def model_state(ckpt: dict) -> dict[str, Tensor]:
    """The pure model's state dict (keys without the `model.` prefix)."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in ckpt["state_dict"].items()}


def model_config(ckpt: dict, path: str | Path = "the checkpoint") -> GPTConfig:
    """The `GPTConfig` the checkpoint's model was built with."""
    cfg = ckpt["hyper_parameters"].get("config")
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a minigpt checkpoint (no model config inside)")
    return GPTConfig(**cfg)


def tokenizer_of(ckpt: dict, path: str | Path = "the checkpoint"):
    """The tokenizer stored in the checkpoint (a word `Vocab` or a `BpeTokenizer`)."""
    tok = section(ckpt).get("tokenizer")
    if not tok:
        raise UserError(f"{path} is not a minigpt checkpoint (no tokenizer inside)")
    return tokenizer_from_dict(tok)


def load_tokenizer(spec: str | Path):
    """A pretrained tokenizer: a Hugging Face tokenizer folder, or the one inside a minigpt checkpoint.

    A checkpoint is memory-mapped, so only its (small) tokenizer entry is read from disk.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        from minigpt.bpe import BpeTokenizer  # imports `tokenizers` only for BPE

        return BpeTokenizer.from_pretrained(path)
    if not path.is_file():
        raise UserError(
            f"tokenizer {spec} does not exist; pass a Hugging Face tokenizer folder or a minigpt checkpoint"
        )
    ckpt = _torch_load(path, "tokenizer", mmap=True)
    tok = section(ckpt).get("tokenizer") if isinstance(ckpt, dict) else None
    if not tok:
        raise UserError(f"tokenizer {spec}: the checkpoint holds no minigpt tokenizer")
    return tokenizer_from_dict(tok)


def data_settings(ckpt: dict) -> dict[str, Any]:
    """The data module arguments the model was trained with (empty for a converted model)."""
    return dict(section(ckpt).get("data") or {})


def model_from_checkpoint(ckpt: dict, path: str | Path = "the checkpoint") -> tuple[GPT, Any]:
    """The pure model (eval mode, on the checkpoint tensors' device) and its tokenizer."""
    config, tokenizer = model_config(ckpt, path), tokenizer_of(ckpt, path)
    state = model_state(ckpt)
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path} does not match its own model config ({state_dict_mismatch(err)})") from err
    device = next(iter(state.values())).device if state else torch.device("cpu")
    return model.to(device).eval(), tokenizer


def state_dict_mismatch(err: RuntimeError) -> str:
    """The first problem `load_state_dict` reports, as one sentence.

    Args:
        err: the error of ``Module.load_state_dict``. Its message starts with a line that only names the
            module ("Error(s) in loading state_dict for GPT:") and lists each problem on a line of its own.

    Returns:
        e.g. 'Missing key(s) in state_dict: "lm_head.bias"'.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1].rstrip(". ")
    return lines[0].rstrip(". ") if lines else type(err).__name__


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, Any]:
    """`(GPT, tokenizer)` from a checkpoint file alone: no data, no Trainer, no Lightning import.

    Example::

        from minigpt.checkpoint import load_model
        model, tokenizer = load_model("lightning_logs/version_0/checkpoints/last.ckpt")
    """
    return model_from_checkpoint(read_checkpoint(path, map_location), path)


# -- writing -------------------------------------------------------------------------------------------


def minigpt_section(tokenizer, data: dict[str, Any] | None = None, rng: dict[str, Any] | None = None) -> dict:
    """The `"minigpt"` section of a checkpoint (see the module docstring)."""
    out: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "tokenizer": None if tokenizer is None else tokenizer.to_dict(),
        "data": dict(data or {}),
    }
    if rng is not None:
        out["rng"] = rng
    return out


def new_checkpoint(model: GPT, tokenizer, **hyper_parameters: Any) -> dict:
    """A checkpoint for a model that was not trained here (e.g. converted from Hugging Face).

    It holds weights, architecture and tokenizer, no optimizer or loop state: it starts runs
    (`--model.init_from`) and feeds `generate`/`evaluate`, it does not resume them. Training
    hyper-parameters not given take `LitMiniGPT`'s defaults when Lightning loads it.
    """
    return {
        "state_dict": {MODEL_PREFIX + k: v.detach().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": {**hyper_parameters, "config": asdict(model.config)},
        "minigpt": minigpt_section(tokenizer),
        "global_step": 0,
        "epoch": 0,
        # `LitMiniGPT.load_from_checkpoint` migrates by this key; the version is read without importing Lightning.
        "pytorch-lightning_version": importlib.metadata.version("lightning"),
    }


def save_checkpoint(checkpoint: dict, path: str | Path) -> Path:
    """Write a checkpoint so that a reader sees the old file or the new one, never half of one.

    The bytes go to a temporary file beside the target (same filesystem), are flushed to disk and
    renamed over the target. Lightning's own writer stages in the system temp folder, whose final
    move is a copy when that folder is on another filesystem. The file gets the permissions of any
    file the user creates (the umask applies), and a full disk is a `UserError` naming the file and
    the space it needs, with the previous file intact and no temporary file left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with 0o666 lets the umask decide the mode, as for any new file (mkstemp gives 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"no space left on the device to write {path} (it needs {_megabytes(buffer.getbuffer().nbytes)}, "
                f"{_megabytes(shutil.disk_usage(path.parent).free)} free); free some space and resume"
            ) from err
        raise
    return path


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"

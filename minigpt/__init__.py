"""minigpt: GPT-style causal language models trained on IMDB reviews with PyTorch Lightning.

The pure-torch pieces are importable without Lightning::

    from minigpt import GPT, GPTConfig, SamplingConfig, Vocab, generate

The names load on first use, so ``minigpt --help`` starts without importing torch.
"""

from importlib import import_module
from typing import Any

from minigpt.hf_model import install_registration as _install_registration

_EXPORTS = {
    "GPTConfig": "minigpt.config",
    "GPT": "minigpt.model",
    "lm_loss": "minigpt.model",
    "SamplingConfig": "minigpt.generation",
    "generate": "minigpt.generation",
    "generate_text": "minigpt.generation",
    "stream": "minigpt.generation",
    "Vocab": "minigpt.tokenizer",
    "basic_english": "minigpt.tokenizer",
    "load_model": "minigpt.checkpoint",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

# transformers' Auto classes learn the "minigpt" model type when they load (see minigpt.hf_model).
_install_registration()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'minigpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

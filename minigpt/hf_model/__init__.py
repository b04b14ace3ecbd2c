"""minigpt's architecture as a transformers model: `MiniGPTConfig` and `MiniGPTForCausalLM`.

`configuration_minigpt.py` and `modeling_minigpt.py` are the pair transformers expects of an architecture
(as in its own `models/gpt2/`); `source_files.py` writes them, with the minigpt modules they import, into a
model folder, so that the folder loads without minigpt (`trust_remote_code=True`); `card.py` writes the
folder's generation settings and model card (`minigpt convert --to_hf`, in `minigpt.convert`).

Where minigpt is installed, `from_pretrained(DIR)` needs no remote code: importing minigpt registers the
classes with `AutoConfig` and `AutoModelForCausalLM`. Registering imports transformers and torch, which
`import minigpt` must not do (`minigpt --help` starts without them), so it happens when transformers'
Auto classes are imported (`install_registration`: at once if they already are, else through a small
import hook that runs once and removes itself).
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from collections.abc import Callable

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    """Register `MiniGPTConfig` with `AutoConfig` (model_type "minigpt")."""
    from transformers import AutoConfig

    from minigpt.hf_model.configuration_minigpt import MiniGPTConfig

    AutoConfig.register(MiniGPTConfig.model_type, MiniGPTConfig, exist_ok=True)


def register_model() -> None:
    """Register `MiniGPTForCausalLM` with `AutoModelForCausalLM` (and its config with `AutoConfig`)."""
    from transformers import AutoModelForCausalLM

    from minigpt.hf_model.configuration_minigpt import MiniGPTConfig
    from minigpt.hf_model.modeling_minigpt import MiniGPTForCausalLM

    register_config()
    AutoModelForCausalLM.register(MiniGPTConfig, MiniGPTForCausalLM, exist_ok=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a function right after a module has been imported (found by the finders behind this one)."""

    def __init__(self, actions: dict[str, Callable[[], None]]) -> None:
        self.actions = actions

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.actions:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_act(module) -> None:
            exec_module(module)
            _run(self.actions.pop(fullname))
            if not self.actions and self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_then_act
        return spec


def _run(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as err:  # never break the user's import of transformers over a registration
        warnings.warn(
            f"minigpt could not register its model with transformers ({type(err).__name__}: {err}); "
            "load exported folders with trust_remote_code=True",
            stacklevel=2,
        )


def install_registration() -> None:
    """Register the classes now for the Auto modules transformers has already imported, and the rest when
    transformers imports them."""
    pending = {}
    for module, action in ((_CONFIG_MODULE, register_config), (_MODEL_MODULE, register_model)):
        if module in sys.modules:
            _run(action)
        else:
            pending[module] = action
    if pending and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(pending))

"""`MiniGPTConfig`: minigpt's `GPTConfig` as a transformers configuration (model_type "minigpt").

Every field of `GPTConfig` is an attribute of the same name in `config.json`; transformers' usual names
read them (`hidden_size` is `n_embd`, `max_position_embeddings` is `block_size`, ...). The special token
ids come from the tokenizer the model was trained with (`minigpt.convert` sets them).

Reference: transformers' "Customizing models" guide (a `PretrainedConfig` subclass with a `model_type`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from minigpt.config import GPTConfig
from minigpt.hf_model.source_files import write_source_files

AUTO_MAP = {
    "AutoConfig": "configuration_minigpt.MiniGPTConfig",
    "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
}
"""What `config.json` names for `trust_remote_code=True` loading (the files `write_source_files` writes)."""


class MiniGPTConfig(PretrainedConfig):
    """The architecture of a minigpt `GPT` (every `GPTConfig` field, validated by `GPTConfig`), plus what
    transformers reads: `tie_word_embeddings` (True when the linear head shares `wte`'s matrix) and the
    special token ids.

    Args:
        **kwargs: `GPTConfig` fields (missing ones take `GPTConfig`'s defaults) and `PretrainedConfig`
            arguments such as `bos_token_id`, `eos_token_id`, `pad_token_id`. Without `vocab_size` (transformers
            builds a default config to compare against) nothing is validated until `to_gpt_config`.
    """

    model_type = "minigpt"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "block_size",
    }

    def __init__(self, **kwargs: Any) -> None:
        values = {f.name: kwargs.pop(f.name, f.default) for f in dataclasses.fields(GPTConfig)}
        if values["vocab_size"]:
            values = dataclasses.asdict(GPTConfig(**values))  # validated, as minigpt validates it
        for name, value in values.items():
            setattr(self, name, list(value) if isinstance(value, tuple) else value)  # JSON has lists
        # Only the linear head has a tensor shared with the input; the tied adaptive input has no tensor of its own.
        kwargs["tie_word_embeddings"] = bool(values["tie_weights"]) and values["head"] == "linear"
        super().__init__(**kwargs)

    def to_gpt_config(self) -> GPTConfig:
        """The `GPTConfig` of this architecture."""
        return GPTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)})

    def to_diff_dict(self) -> dict[str, Any]:
        """`PretrainedConfig.to_diff_dict` (what `config.json` holds) with every architecture field, defaults too,
        so that a folder never depends on the defaults of the code that loads it."""
        return {**super().to_diff_dict(), **{f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)}}

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> None:
        """`PretrainedConfig.save_pretrained`, plus `auto_map` and the source files it names, so that the
        folder loads with `trust_remote_code=True` where minigpt is not installed (see `write_source_files`)."""
        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_source_files(save_directory)

"""`MiniGPTForCausalLM`: minigpt's `GPT` as a transformers causal LM (`generate`, `pipeline`, the Auto classes).

The class adds no layer of its own: `self.model` is `minigpt.model.GPT`. Under `generate()` the same blocks
run with transformers' KV cache through `TransformersCache`, which answers minigpt's cache protocol
(`minigpt.cache.Cache`: `prepare` before the new tokens, `update` in each layer, the argument order of
transformers' `Cache.update`). Positions come from the attention mask, so a left-padded batch gets the
logits minigpt gives each prompt alone. With the adaptive head, `logits` are log-probabilities (already
normalised; softmax, argmax, sampling and cross-entropy of them are exact).

Reference: transformers' "Customizing models" guide and `LlamaForCausalLM` (forward's arguments and outputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from minigpt.cache import attention_mask
from minigpt.hf_model.configuration_minigpt import MiniGPTConfig
from minigpt.model import GPT, rotary_tables, sinusoidal_positions

# transformers 5 names the cache `cache` in forward's arguments and outputs; earlier releases `past_key_values`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class TransformersCache:
    """minigpt's cache protocol over a transformers `Cache` (`DynamicCache`), or over none (no cache kept).

    Args:
        cache: The transformers cache holding the keys and values of the tokens already seen, or None.
        key_padding_mask: bool (B, S), True at pad tokens, over every key slot (the cached ones and the new
            tokens: transformers' 2-D attention mask, negated); None without padding.
        batch_size: B.
        device: Where positions and masks are built.
    """

    def __init__(self, cache: Any, key_padding_mask: Tensor | None, batch_size: int, device: torch.device) -> None:
        self.cache, self.key_padding_mask, self._batch_size, self.device = cache, key_padding_mask, batch_size, device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def prepare(self, T: int, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None, bool]:
        """Default positions, attention mask and causal flag of T new tokens after the cached ones (the padding of
        every slot was given to the constructor, so `key_padding_mask` of the new tokens adds nothing)."""
        start = self.cache.get_seq_length() if self.cache is not None else 0
        padding = self.key_padding_mask
        if padding is not None and padding.size(1) != start + T:
            raise ValueError(
                f"attention_mask covers {padding.size(1)} tokens, but the cache holds {start} and input_ids adds {T}."
            )
        return (torch.arange(start, start + T, device=self.device), *attention_mask(start, T, padding, self.device))

    def update(self, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Store one layer's new keys/values (B, nh, T, hs); return every key/value of that layer (B, nh, S, hs)."""
        return (k, v) if self.cache is None else self.cache.update(k, v, layer)


class MiniGPTForCausalLM(PreTrainedModel, GenerationMixin):
    """A minigpt `GPT` behind transformers' causal-LM interface.

    Args:
        config: The architecture (`MiniGPTConfig`).
    """

    config_class = MiniGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    # The tied linear head: `lm_head.weight` is `wte.weight` (only when config.tie_word_embeddings says so).
    _tied_weights_keys = {"model.lm_head.weight": "model.transformer.wte.weight"}

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__(config)
        self.model = GPT(config.to_gpt_config())
        self.post_init()
        if config.head == "adaptive":
            # The adaptive softmax computes in float32 (`GPT.head_logits`), so its weights stay float32 in any
            # dtype. Set on the instance, after `post_init`: transformers checks that the module exists.
            self._keep_in_fp32_modules_strict = {"adaptive"}

    def _init_weights(self, module: nn.Module) -> None:
        # `from_pretrained` builds the model on the meta device and fills in what the weights file holds;
        # the fixed position tables are buffers left out of it (minigpt rebuilds them at init), so they are
        # computed again here. Every weight is in the file.
        if isinstance(module, GPT):
            c = module.config
            if c.positional == "sinusoidal":
                module.sinusoidal.copy_(sinusoidal_positions(c.block_size, c.n_embd))
            elif c.positional == "rotary":
                cos, sin = rotary_tables(c.block_size, c.head_size, c.rope_base)
                module.rope_cos.copy_(cos)
                module.rope_sin.copy_(sin)

    def get_input_embeddings(self) -> nn.Module | None:
        """The token embedding `wte` (None with the tied adaptive input, which computes it from the head)."""
        return self.model.transformer["wte"] if "wte" in self.model.transformer else None

    def get_output_embeddings(self) -> nn.Module | None:
        """The linear head `lm_head` (None with the adaptive head)."""
        return self.model.lm_head if self.config.head == "linear" else None

    def prepare_inputs_for_generation(self, input_ids: Tensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """`GenerationMixin`'s inputs for the next step; past `block_size` tokens, the last `block_size` of them.

        Beyond its context every absolute position of the window moves, so, as in `minigpt.generation`,
        each such step reads the last `block_size` columns again with an empty cache (positions counted
        from the window's attention mask), and generation continues past the context.
        """
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        block_size = self.config.block_size
        if input_ids.size(1) <= block_size:
            new = inputs["input_ids"].size(1)
            if self.config.bigram_buckets and input_ids.size(1) > new:  # the cache holds the tokens before
                previous, mask = input_ids[:, -new - 1], inputs.get("attention_mask")
                if mask is not None:
                    previous = previous.masked_fill(mask[:, -new - 1] == 0, -1)  # a pad is no previous token
                inputs["previous_token_ids"] = previous
            return inputs
        inputs["input_ids"] = input_ids[:, -block_size:]
        inputs.pop("position_ids", None)
        if inputs.get("attention_mask") is not None:
            inputs["attention_mask"] = inputs["attention_mask"][:, -block_size:]
        for name in ("cache", "past_key_values"):
            if inputs.get(name) is not None:
                inputs[name] = DynamicCache()
        return inputs

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        previous_token_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Next-token scores of every position (of the last `logits_to_keep` ones when > 0).

        Args:
            input_ids: (B, T) token ids (with a cache, only the new tokens).
            attention_mask: (B, S) 1 for tokens, 0 for padding, over the cached tokens and the new ones.
            position_ids: (B, T) or (1, T); default: counted from the attention mask (left padding keeps each
                row's real positions), or after the cached tokens.
            cache: A transformers `Cache` (e.g. `DynamicCache`) of the tokens already seen; `past_key_values`
                is read as another name for it.
            inputs_embeds: Not supported: the input embedding is computed from token ids.
            labels: (B, T) targets for the loss, `input_ids` themselves (shifted inside); -100 is ignored.
            use_cache: Keep the new keys/values (a `DynamicCache` is made when none is given) and return the cache.
            logits_to_keep: Compute scores for the last N positions only (0 = all), or for these indices.
            previous_token_ids: (B,) the token before each row's first new token (-1: none), which a model with
                bigram embeddings (`bigram_buckets`) needs to continue a cache that holds tokens; `generate` passes it.

        Returns:
            `CausalLMOutputWithPast` with `logits` (B, T, vocab_size) (log-probabilities with the adaptive head),
            `loss` when `labels` are given, and the cache when `use_cache`.
        """
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("MiniGPTForCausalLM reads input_ids; its input embedding is computed from token ids, "
                             "so inputs_embeds is not supported.")  # fmt: skip
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"MiniGPTForCausalLM does not return per-layer tensors ({flag}=True).")
        if use_cache is False:
            cache = None
        elif use_cache and cache is None:
            cache = DynamicCache()
        B, T = input_ids.shape
        padding = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be (batch, tokens) of 1s and 0s, got shape "
                                 f"{tuple(attention_mask.shape)}.")  # fmt: skip
            if not bool(attention_mask.all()):
                padding = attention_mask == 0
        if position_ids is not None:
            positions = position_ids[0] if position_ids.size(0) == 1 else position_ids
        elif padding is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(padding, 0)[:, -T:]
        else:
            start = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device)
        hidden = self.model.hidden_states(
            input_ids, padding[:, -T:] if padding is not None else None, positions=positions,
            cache=TransformersCache(cache, padding, B, input_ids.device), previous=previous_token_ids,
        )  # fmt: skip
        hidden = hidden[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else hidden[:, logits_to_keep]
        logits = self.model.head_logits(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

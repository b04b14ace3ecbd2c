"""Hugging Face GPT-2 <-> minigpt conversion: configs, weights both ways, tokenizer export, checkpoint files.

- `gpt2_to_minigpt` / `convert_from_hf` turn `GPT2LMHeadModel` into minigpt's `GPT` (the
  `GPTConfig.gpt2` flavour) and into a minigpt checkpoint (`minigpt.checkpoint.new_checkpoint`) that
  `load_model`, `minigpt generate` and `minigpt fit --model.init_from` read.
- `minigpt_to_gpt2` / `convert_to_hf` go back: a minigpt model of the GPT-2 flavour becomes a folder
  with `config.json`, `model.safetensors` and tokenizer files (`word_level_hf_tokenizer` for the word
  `Vocab`, the BPE tokenizer as it came).

Weight layout: HF's GPT-2 stores its projections as `Conv1D` with (in, out) weights, minigpt as
`nn.Linear` with (out, in) weights, so every projection matrix is transposed; `c_attn` is fused with
rows [q; k; v] in both. Both scale attention by 1/sqrt(head_size).

References: karpathy/nanoGPT `model.py` (`GPT.from_pretrained`, the transposed `Conv1D` weights),
Lightning-AI/litgpt `litgpt/scripts/convert_hf_checkpoint.py` and transformers' `modeling_gpt2.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minigpt.bpe import BpeTokenizer
from minigpt.checkpoint import load_model, new_checkpoint, save_checkpoint
from minigpt.config import GPTConfig
from minigpt.errors import UserError
from minigpt.generation import Tokenizer
from minigpt.hf import load_hf_gpt2, quiet_transformers
from minigpt.model import GPT
from minigpt.tokenizer import Vocab

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel


_ACTIVATION_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


# -- HF -> minigpt -------------------------------------------------------------------------------------


def gpt2_config_to_minigpt(hf_config: GPT2Config) -> GPTConfig:
    """The `GPTConfig.gpt2` flavour with the sizes of a Hugging Face `GPT2Config`.

    Raises:
        ValueError: a GPT-2 option minigpt does not implement (cross-attention, unscaled or
            layer-scaled attention, an unknown activation).
    """
    if getattr(hf_config, "model_type", None) != "gpt2":
        raise UserError(
            f"only GPT-2 models convert to minigpt, got model_type {getattr(hf_config, 'model_type', None)!r}"
        )
    unsupported = {
        "add_cross_attention": True,
        "scale_attn_by_inverse_layer_idx": True,
        "scale_attn_weights": False,
    }
    for name, bad in unsupported.items():
        if getattr(hf_config, name, not bad) == bad:
            raise UserError(f"GPT-2 with {name}={bad} has no minigpt equivalent")
    activation = _ACTIVATION_FROM_HF.get(hf_config.activation_function)
    if activation is None:
        raise UserError(
            f"GPT-2 activation_function {hf_config.activation_function!r} has no minigpt equivalent "
            f"(supported: {', '.join(_ACTIVATION_FROM_HF)})"
        )
    dropouts = {hf_config.resid_pdrop, hf_config.embd_pdrop, hf_config.attn_pdrop}
    if len(dropouts) > 1:
        warnings.warn(
            f"minigpt has one dropout rate; using resid_pdrop={hf_config.resid_pdrop} for the embeddings and "
            f"attention too (embd_pdrop={hf_config.embd_pdrop}, attn_pdrop={hf_config.attn_pdrop})",
            stacklevel=2,
        )
    return GPTConfig.gpt2(
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.n_positions,
        n_embd=hf_config.n_embd,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        d_ff=hf_config.n_inner or 4 * hf_config.n_embd,
        dropout=float(hf_config.resid_pdrop),
        activation=activation,
        layer_norm_eps=float(hf_config.layer_norm_epsilon),
        tie_weights=bool(getattr(hf_config, "tie_word_embeddings", True)),
    )


def _weight_map(config: GPTConfig) -> Iterator[tuple[str, str, bool]]:
    """(minigpt name, HF GPT-2 name, transpose?) of every weight, biases included whatever `config.bias`."""
    yield "transformer.wte.weight", "transformer.wte.weight", False
    yield "transformer.wpe.weight", "transformer.wpe.weight", False
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            yield p + norm + ".weight", p + norm + ".weight", False
            yield p + norm + ".bias", p + norm + ".bias", False
        for proj in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            yield p + proj + ".weight", p + proj + ".weight", True  # nn.Linear (out, in) <-> Conv1D (in, out)
            yield p + proj + ".bias", p + proj + ".bias", False
    yield "transformer.ln_f.weight", "transformer.ln_f.weight", False
    yield "transformer.ln_f.bias", "transformer.ln_f.bias", False
    yield "lm_head.weight", "lm_head.weight", False


def gpt2_to_minigpt(hf_model: PreTrainedModel) -> GPT:
    """minigpt's `GPT` computing the same function as a Hugging Face `GPT2LMHeadModel`.

    Args:
        hf_model: A `GPT2LMHeadModel` (any dtype; minigpt's copy is float32).

    Returns:
        The converted model in eval mode (logits equal the HF model's within float rounding).

    Raises:
        ValueError: not a GPT-2 model, or an option minigpt does not implement.
    """
    config = gpt2_config_to_minigpt(hf_model.config)
    hf_state = hf_model.state_dict()
    if "lm_head.weight" not in hf_state:
        raise UserError(f"{type(hf_model).__name__} has no language-model head; load it as GPT2LMHeadModel")
    model = GPT(config)
    state = {mg: hf_state[hf].t() if transpose else hf_state[hf] for mg, hf, transpose in _weight_map(config)}
    model.load_state_dict(state)
    return model.eval()


# -- minigpt -> HF -------------------------------------------------------------------------------------


def gpt2_export_blockers(config: GPTConfig) -> list[str]:
    """Why a minigpt config cannot be written as GPT-2 (empty when it can).

    Exportable: pre-norm blocks, a linear head without bias, unscaled embeddings; any activation
    (relu, gelu, gelu_tanh), tied or untied head, any d_ff. Learned positions are copied; sinusoidal
    ones are written as GPT-2's (learned) position table holding the fixed values, and layers without
    biases (bias=False) get zero biases: both compute exactly the same function.
    """
    reasons = []
    if not config.norm_first:
        reasons.append(
            "post-norm (norm_first=False) has no GPT-2 equivalent: GPT-2 normalises before attention and MLP "
            "(pre-norm) and has a final ln_f"
        )
    if config.head != "linear":
        reasons.append(
            f"the {config.head} head (head={config.head!r}) has no GPT-2 equivalent: GPT-2's head is one linear "
            "layer over the vocabulary"
        )
    elif config.lm_head_bias:
        reasons.append("GPT-2's output layer has no bias (lm_head_bias=True)")
    if config.scale_embedding:
        reasons.append("GPT-2 does not multiply token embeddings by sqrt(n_embd) (scale_embedding=True)")
    if config.activation not in _ACTIVATION_TO_HF:
        reasons.append(f"activation {config.activation!r} has no GPT-2 equivalent")
    if config.positional == "rotary":
        reasons.append("GPT-2 adds learned positions; rotary positions (positional='rotary') have no equivalent")
    if config.norm != "layernorm":
        reasons.append(f"GPT-2 normalises with LayerNorm, not {config.norm!r}")
    if config.qk_norm:
        reasons.append("GPT-2 does not normalise queries and keys (qk_norm=True)")
    return reasons


def check_gpt2_exportable(config: GPTConfig) -> None:
    """Raise ValueError naming every setting that prevents writing `config` as GPT-2."""
    reasons = gpt2_export_blockers(config)
    if reasons:
        raise UserError(
            "cannot export this model as GPT-2: " + "; ".join(reasons) + ". Only the GPT-2 flavour "
            "(GPTConfig.gpt2(), e.g. a model converted with `minigpt convert --from_hf`) can be exported."
        )


def minigpt_to_gpt2(model: GPT, tokenizer: Tokenizer | None = None) -> GPT2LMHeadModel:
    """A Hugging Face `GPT2LMHeadModel` computing the same function as a minigpt model of the GPT-2 flavour.

    Args:
        model: The minigpt model (see `gpt2_export_blockers` for what can be exported).
        tokenizer: Its tokenizer, to record the eos/bos/pad ids in the HF config (optional).

    Returns:
        The HF model in eval mode, float32.

    Raises:
        ValueError: the model's config has no GPT-2 equivalent (the message says which setting).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = model.config
    check_gpt2_exportable(config)
    special: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.eot_index,
            "eos_token_id": tokenizer.eot_index,
            "pad_token_id": tokenizer.pad_index,
        }
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.d_ff,
        activation_function=_ACTIVATION_TO_HF[config.activation],
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_eps,
        tie_word_embeddings=config.tie_weights,
        **special,
    )
    with quiet_transformers():
        hf_model = GPT2LMHeadModel(hf_config)
    ours = model.state_dict()
    hf_shapes = {k: v.shape for k, v in hf_model.state_dict().items()}
    hf_state = {}
    for mg, hf, transpose in _weight_map(config):
        if mg in ours:
            hf_state[hf] = ours[mg].t() if transpose else ours[mg]
        elif mg == "transformer.wpe.weight":
            hf_state[hf] = model.sinusoidal  # the fixed table, as GPT-2's position embedding
        else:
            hf_state[hf] = torch.zeros(hf_shapes[hf])  # bias=False: a zero bias adds nothing
    hf_model.load_state_dict(hf_state)
    return hf_model.eval()


def word_level_hf_tokenizer(vocab: Vocab, model_max_length: int | None = None):
    """minigpt's word `Vocab` as a `transformers.PreTrainedTokenizerFast` (a `tokenizers` WordLevel model).

    Its normaliser applies `basic_english`'s rules (lower case, then the same ordered replacements) and
    it splits on white space, so it encodes like `Vocab.encode` (Unicode edge cases aside: Python and
    Rust disagree on a few lower-case and white-space characters). It decodes to space-joined words.

    Args:
        vocab: The word vocabulary.
        model_max_length: The model's context length, recorded in `tokenizer_config.json`.
    """
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from minigpt.tokenizer import BASIC_ENGLISH_REPLACEMENTS as _LITERAL_RULES  # all literal strings, in order

    tok = HfTokenizer(models.WordLevel(vocab=dict(vocab.stoi), unk_token=vocab.itos[vocab.unk_index]))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), *(normalizers.Replace(old, new) for old, new in _LITERAL_RULES)]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=vocab.itos[vocab.unk_index],
        pad_token=vocab.itos[vocab.pad_index],
        eos_token=vocab.itos[vocab.eot_index],
        bos_token=vocab.itos[vocab.eot_index],
        clean_up_tokenization_spaces=False,
        **({} if model_max_length is None else {"model_max_length": model_max_length}),
    )


# -- checkpoint files ----------------------------------------------------------------------------------


def convert_from_hf(hf_dir: str | Path, out_ckpt: str | Path, *, overwrite: bool = False) -> Path:
    """`minigpt convert --from_hf DIR --out CKPT`: a local HF GPT-2 folder -> a minigpt checkpoint file.

    Args:
        hf_dir: Folder (or cached Hub name) with config.json, the weights and the tokenizer files.
        out_ckpt: The checkpoint file to write.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        ValueError: unreadable input, a non-GPT-2 model, a tokenizer larger than the model's
            vocabulary, or an existing output without `overwrite`.
    """
    out = Path(out_ckpt).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or remove it")
    if out.is_dir():
        raise UserError(f"{out} is a folder; --out must name a checkpoint file (e.g. gpt2.ckpt)")
    hf_model, tokenizer = load_hf_gpt2(hf_dir)
    model = gpt2_to_minigpt(hf_model)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"the tokenizer in {hf_dir} has {len(tokenizer)} tokens but the model only {model.config.vocab_size}"
        )
    if len(tokenizer) < model.config.vocab_size:
        warnings.warn(
            f"the model has {model.config.vocab_size} token rows but the tokenizer only {len(tokenizer)} tokens; "
            "fine-tuning checks that both sizes agree",
            stacklevel=2,
        )
    return save_checkpoint(new_checkpoint(model, tokenizer), out)


def convert_to_hf(ckpt_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """`minigpt convert --ckpt_path CKPT --to_hf DIR`: a minigpt checkpoint -> a Hugging Face GPT-2 folder.

    Writes `config.json`, `generation_config.json`, `model.safetensors` and the tokenizer
    (`tokenizer.json` + `tokenizer_config.json`): the BPE tokenizer as it came, or the word `Vocab` as a
    WordLevel tokenizer (see `word_level_hf_tokenizer`). `GPT2LMHeadModel.from_pretrained(DIR)` and
    `AutoTokenizer.from_pretrained(DIR)` load the result.

    Args:
        ckpt_path: A minigpt checkpoint of the GPT-2 flavour.
        out_dir: The folder to write (created; must be empty unless `overwrite`).
        overwrite: Write into a non-empty folder (files of the same names are replaced).

    Returns:
        The folder written.

    Raises:
        ValueError: unreadable checkpoint, a model that has no GPT-2 equivalent, or a non-empty folder.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --to_hf must name a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; choose a new folder for the Hugging Face model")
    model, tokenizer = load_model(str(ckpt_path))
    hf_model = minigpt_to_gpt2(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        hf_model.save_pretrained(str(out))
        block_size = model.config.block_size
        if isinstance(tokenizer, BpeTokenizer):
            hf_tokenizer = tokenizer.to_transformers(block_size)
        else:
            hf_tokenizer = word_level_hf_tokenizer(tokenizer, block_size)
        hf_tokenizer.save_pretrained(str(out))
    return out

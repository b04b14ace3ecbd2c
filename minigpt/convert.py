"""Hugging Face <-> minigpt conversion: configs, weights both ways, tokenizer export, checkpoint files.

- Every minigpt model exports (`to_transformers`, `convert_to_hf`): a GPT-2-equivalent config as a native
  `GPT2LMHeadModel` (`minigpt_to_gpt2`), any other as minigpt's own architecture in transformers' terms,
  `MiniGPTForCausalLM` (`minigpt_to_hf`, `minigpt.hf_model`), whose folder carries its code. The folder
  also gets the tokenizer (`word_level_hf_tokenizer` for the word `Vocab`, the BPE tokenizer as it came),
  `generation_config.json` and a model card (`minigpt.hf_model.card`).
- Back (`hf_to_minigpt`, `convert_from_hf`): a `GPT2LMHeadModel` becomes minigpt's `GPT` of the
  `GPTConfig.gpt2` flavour (`gpt2_to_minigpt`), a `MiniGPTForCausalLM` gives back its own `GPT`; either
  becomes a minigpt checkpoint (`minigpt.checkpoint.new_checkpoint`) that `load_model`, `minigpt generate`
  and `minigpt fit --model.init_from` read.

GPT-2 weight layout: HF's GPT-2 stores its projections as `Conv1D` with (in, out) weights, minigpt as
`nn.Linear` with (out, in) weights, so every projection matrix is transposed; `c_attn` is fused with
rows [q; k; v] in both. Both scale attention by 1/sqrt(head_size).

References: karpathy/nanoGPT `model.py` (`GPT.from_pretrained`, the transposed `Conv1D` weights),
Lightning-AI/litgpt `litgpt/scripts/convert_hf_checkpoint.py` and transformers' `modeling_gpt2.py`.
"""

from __future__ import annotations

import dataclasses
import json
import string
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minigpt.bpe import BpeTokenizer
from minigpt.checkpoint import model_from_checkpoint, new_checkpoint, read_checkpoint, save_checkpoint
from minigpt.config import GPTConfig
from minigpt.errors import UserError
from minigpt.generation import SamplingConfig, Tokenizer, generate_text
from minigpt.hf import load_hf_gpt2, quiet_transformers
from minigpt.model import GPT
from minigpt.tokenizer import SPECIALS, Vocab, detokenize

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""`--dtype` choices: the precision of the exported weights."""

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
            "only GPT-2 models and minigpt's own exports (model_type 'minigpt') convert to minigpt, got model_type "
            f"{getattr(hf_config, 'model_type', None)!r}"
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
    if config.bigram_buckets:
        reasons.append("GPT-2 has no bigram embeddings (bigram_buckets > 0)")
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
        **special_token_ids(tokenizer),
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


def special_token_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    """The HF config's bos/eos/pad ids, from the tokenizer (all None without one): minigpt begins and ends
    documents with the tokenizer's end-of-text token and pads with its pad token."""
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    eot, pad = tokenizer.eot_index, tokenizer.pad_index
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": pad}


def minigpt_to_hf(model: GPT, tokenizer: Tokenizer | None = None) -> PreTrainedModel:
    """minigpt's architecture as a transformers model: a `MiniGPTForCausalLM` holding a copy of `model`.

    Works for every `GPTConfig`: the class runs minigpt's own `GPT` (see `minigpt.hf_model`).

    Args:
        model: The minigpt model.
        tokenizer: Its tokenizer, for the special token ids in the config (optional).

    Returns:
        The HF model in eval mode, float32, computing exactly what `model` computes.
    """
    from minigpt.hf_model.configuration_minigpt import MiniGPTConfig
    from minigpt.hf_model.modeling_minigpt import MiniGPTForCausalLM

    config = MiniGPTConfig(**dataclasses.asdict(model.config), **special_token_ids(tokenizer))
    with quiet_transformers():
        hf_model = MiniGPTForCausalLM(config)
    hf_model.model.load_state_dict(model.state_dict())
    return hf_model.float().eval()


def to_transformers(model: GPT, tokenizer: Tokenizer | None = None) -> PreTrainedModel:
    """The transformers model of a minigpt model: `GPT2LMHeadModel` when the config has a GPT-2 equivalent
    (`gpt2_export_blockers` is empty), else `MiniGPTForCausalLM`."""
    if gpt2_export_blockers(model.config):
        return minigpt_to_hf(model, tokenizer)
    return minigpt_to_gpt2(model, tokenizer)


def hf_to_minigpt(hf_model: PreTrainedModel) -> GPT:
    """minigpt's `GPT` computing what a transformers model computes: a `MiniGPTForCausalLM` gives back its own
    model (float32), a `GPT2LMHeadModel` converts (`gpt2_to_minigpt`).

    Raises:
        UserError: another architecture.
    """
    if getattr(hf_model.config, "model_type", None) != "minigpt":
        return gpt2_to_minigpt(hf_model)
    model = GPT(GPTConfig(**{f.name: getattr(hf_model.config, f.name) for f in dataclasses.fields(GPTConfig)}))
    model.load_state_dict(hf_model.model.state_dict())
    return model.eval()


def word_level_hf_tokenizer(vocab: Vocab, model_max_length: int | None = None):
    """minigpt's word `Vocab` as a `transformers.PreTrainedTokenizerFast` (a `tokenizers` WordLevel model).

    Its normaliser applies `basic_english`'s rules (lower case, then the same ordered replacements) and
    it splits on white space, so it encodes like `Vocab.encode` (Unicode edge cases aside: Python and
    Rust disagree on a few lower-case and white-space characters). It decodes like
    `Vocab.decode(ids, tidy=True)` with a space before the first word (`tidy_decoder`).

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
    tok.decoder = tidy_decoder()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=vocab.itos[vocab.unk_index],
        pad_token=vocab.itos[vocab.pad_index],
        eos_token=vocab.itos[vocab.eot_index],
        bos_token=vocab.itos[vocab.eot_index],
        clean_up_tokenization_spaces=False,
        **({} if model_max_length is None else {"model_max_length": model_max_length}),
    )


def tidy_decoder():
    """A `tokenizers` decoder that joins word tokens as `minigpt.tokenizer.detokenize` does (" the movie. it's").

    Every token gets a leading space, the tokens are fused into one string, and the spaces that `detokenize`
    leaves out are removed: before a closing punctuation token and after an opening one. Which punctuation
    marks glue to which side is read off `detokenize` itself (`basic_english` makes each of them a token of
    its own), so the two cannot drift apart. The first word keeps its space, as a GPT-2 token carries its
    own: a continuation decoded alone then joins its prompt (transformers' text-generation pipeline returns
    `prompt + decode(new ids)`).
    """
    from tokenizers import Regex, decoders

    glue_left = [p for p in string.punctuation if detokenize(["a", p]) == "a" + p]  # no space before p
    glue_right = [p for p in string.punctuation if detokenize([p, "a"]) == p + "a"]  # no space after p
    return decoders.Sequence([
        decoders.Replace(Regex("^"), " "),
        decoders.Fuse(),
        *(decoders.Replace(" " + p, p) for p in glue_left),
        *(decoders.Replace(p + " ", p) for p in glue_right),
    ])  # fmt: skip


def word_vocab_of(tokenizer: Any) -> Vocab | None:
    """The word `Vocab` a tokenizer read from a Hugging Face folder stands for, when it is one that
    `word_level_hf_tokenizer` wrote (a WordLevel model over minigpt's specials, with its normaliser,
    pre-tokenizer and decoder); None for any other tokenizer."""
    backend = getattr(tokenizer, "tokenizer", None)  # a `BpeTokenizer` wraps the `tokenizers.Tokenizer`
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "WordLevel":
        return None
    by_id = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    itos = [token for token, _ in by_id]
    if [i for _, i in by_id] != list(range(len(itos))) or tuple(itos[: len(SPECIALS)]) != SPECIALS:
        return None
    vocab = Vocab(itos)
    ours = json.loads(word_level_hf_tokenizer(vocab).backend_tokenizer.to_str())
    same = all(spec.get(part) == ours.get(part) for part in ("normalizer", "pre_tokenizer", "decoder"))
    return vocab if same else None


# -- checkpoint files ----------------------------------------------------------------------------------


def convert_from_hf(hf_dir: str | Path, out_ckpt: str | Path, *, overwrite: bool = False) -> Path:
    """`minigpt convert --from_hf DIR --out CKPT`: a local Hugging Face folder -> a minigpt checkpoint file.

    The folder holds a GPT-2 model, or a model minigpt exported in its own architecture (any `GPTConfig`;
    the checkpoint then holds the same weights, bit for bit, and the word vocabulary when the folder has one).

    Args:
        hf_dir: Folder (or cached Hub name) with config.json, the weights and the tokenizer files.
        out_ckpt: The checkpoint file to write.
        overwrite: Replace an existing file.

    Returns:
        The path written.

    Raises:
        UserError: unreadable input, another architecture, a tokenizer larger than the model's
            vocabulary, or an existing output without `overwrite`.
    """
    out = Path(out_ckpt).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or remove it")
    if out.is_dir():
        raise UserError(f"{out} is a folder; --out must name a checkpoint file (e.g. gpt2.ckpt)")
    hf_model, tokenizer = load_hf_gpt2(hf_dir)
    model = hf_to_minigpt(hf_model)
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


def convert_to_hf(
    ckpt_path: str | Path, out_dir: str | Path, *, overwrite: bool = False, dtype: str = "float32",
    license: str = "mit",
) -> Path:  # fmt: skip
    """`minigpt convert --ckpt_path CKPT --to_hf DIR`: a minigpt checkpoint -> a Hugging Face model folder.

    Writes `config.json`, `model.safetensors`, `generation_config.json`, the tokenizer (`tokenizer.json` +
    `tokenizer_config.json`: the BPE tokenizer as it came, or the word `Vocab` as a WordLevel tokenizer, see
    `word_level_hf_tokenizer`) and a model card `README.md`. A GPT-2-equivalent model is a `GPT2LMHeadModel`;
    any other is a `MiniGPTForCausalLM` whose code is written beside it (`minigpt.hf_model`), so
    `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it without minigpt installed.

    Args:
        ckpt_path: A minigpt checkpoint.
        out_dir: The folder to write (created; must be empty unless `overwrite`).
        overwrite: Write into a non-empty folder (files of the same names are replaced).
        dtype: Precision of the weights: "float32" or "bfloat16" (the adaptive head stays float32).
        license: The license of the weights, for the model card's front matter.

    Returns:
        The folder written.

    Raises:
        UserError: unreadable or foreign checkpoint, an unknown dtype, or a non-empty folder.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --to_hf must name a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; choose a new folder for the Hugging Face model")
    ckpt = read_checkpoint(ckpt_path)
    model, tokenizer = model_from_checkpoint(ckpt, ckpt_path)
    from minigpt.hf_model.card import SAMPLE_PROMPT, generation_config, model_card

    hf_model = to_transformers(model, tokenizer)
    hf_model.generation_config = generation_config(tokenizer)
    _cast(hf_model, DTYPES[dtype])
    seed = torch.Generator().manual_seed(0)
    sample = generate_text(model, tokenizer, SAMPLE_PROMPT, SamplingConfig(), generator=seed)
    block_size = model.config.block_size
    if isinstance(tokenizer, BpeTokenizer):
        hf_tokenizer = tokenizer.to_transformers(block_size)
    else:
        hf_tokenizer = word_level_hf_tokenizer(tokenizer, block_size)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        hf_model.save_pretrained(str(out))
        hf_tokenizer.save_pretrained(str(out))
    card = model_card(
        ckpt, model, tokenizer, name=out.resolve().name, hf_class=type(hf_model).__name__, sample=sample,
        license=license,
    )  # fmt: skip
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def _cast(hf_model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Cast the weights to `dtype`, except the modules the class keeps in float32 (`_keep_in_fp32_modules_strict`)."""
    hf_model.to(dtype)
    keep = set(getattr(hf_model, "_keep_in_fp32_modules_strict", None) or ())
    for name, module in hf_model.named_modules():
        if name.rpartition(".")[2] in keep:
            module.float()

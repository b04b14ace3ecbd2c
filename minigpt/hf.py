"""Hugging Face GPT-2 interop: load local GPT-2 folders, convert weights both ways, score and sample HF models.

- `load_hf_gpt2` reads a model and its tokenizer from a local folder (or the local Hugging Face
  cache); it never touches the network.
- `gpt2_to_minigpt` / `convert_from_hf` turn `GPT2LMHeadModel` into minigpt's `GPT` (the
  `GPTConfig.gpt2` flavour) and into a minigpt checkpoint that `load_model`, `LitMiniGPT` and
  `minigpt fit --model.init_from` read.
- `minigpt_to_gpt2` / `convert_to_hf` go back: a minigpt model of the GPT-2 flavour becomes a folder
  with `config.json`, `model.safetensors` and tokenizer files.
- `hf_bits_per_character` / `minigpt_bits_per_character` score texts with the same windows as
  `minigpt.evaluation`, and `hf_generate_text` samples an HF model with minigpt's sampler, so the two
  kinds of model are compared on equal terms.

Weight layout: HF's GPT-2 stores its projections as `Conv1D` with (in, out) weights, minigpt as
`nn.Linear` with (out, in) weights, so every projection matrix is transposed; `c_attn` is fused with
rows [q; k; v] in both. Both scale attention by 1/sqrt(head_size).

References: karpathy/nanoGPT `model.py` (`GPT.from_pretrained`, the transposed `Conv1D` weights),
Lightning-AI/litgpt `litgpt/scripts/convert_hf_checkpoint.py` and transformers' `modeling_gpt2.py`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt.bpe import BpeTokenizer
from minigpt.config import GPTConfig
from minigpt.data.corpus import encode_documents
from minigpt.evaluation import score_documents
from minigpt.generation import (
    GenerationResult,
    SamplingConfig,
    Tokenizer,
    banned_special_ids,
    collect,
    decode,
    encode_prompt,
    window,
)
from minigpt.model import GPT
from minigpt.tokenizer import IGNORE_INDEX, Vocab

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel


_ACTIVATION_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


# -- loading -------------------------------------------------------------------------------------------


def load_hf_gpt2(
    dir_or_name: str | Path, *, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, BpeTokenizer]:
    """A Hugging Face causal LM (GPT-2 or other) and its tokenizer, from local files only.

    Args:
        dir_or_name: A local folder (config.json, weights, tokenizer files), or a Hub name such as
            "gpt2" that is already in the local Hugging Face cache. Nothing is downloaded.
        cache_dir: The Hugging Face cache to look names up in (default: the usual HF_HOME cache).

    Returns:
        (the model in eval mode, its tokenizer as a `BpeTokenizer`).

    Raises:
        ValueError: one line saying why: not a folder and not cached, or a folder transformers cannot read.
    """
    folder = _local_folder(dir_or_name, cache_dir)
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load a Hugging Face causal LM from {folder}: {_first_line(err)}") from err
    model.eval()
    return model, BpeTokenizer.from_pretrained(folder)


def _local_folder(dir_or_name: str | Path, cache_dir: str | Path | None) -> Path:
    path = Path(dir_or_name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(dir_or_name), local_files_only=True, cache_dir=cache_dir))
    except ValueError as err:  # HFValidationError: not a Hub name either, so a folder that is missing
        raise ValueError(f"{str(dir_or_name)!r} is not a local folder (it does not exist)") from err
    except OSError as err:  # LocalEntryNotFoundError: a Hub name that is not in the local cache
        raise ValueError(
            f"{str(dir_or_name)!r} is not a local folder and not in the local Hugging Face cache; minigpt never "
            "downloads. Pass a folder with config.json, the weights and the tokenizer files, e.g. made once on a "
            f"machine with internet by `hf download {dir_or_name} --local-dir ./{path.name}`, or set HF_HOME to a "
            "cache that holds it."
        ) from err


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info messages and progress bars (a CLI prints one line per result)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# -- HF -> minigpt -------------------------------------------------------------------------------------


def gpt2_config_to_minigpt(hf_config: GPT2Config) -> GPTConfig:
    """The `GPTConfig.gpt2` flavour with the sizes of a Hugging Face `GPT2Config`.

    Raises:
        ValueError: a GPT-2 option minigpt does not implement (cross-attention, unscaled or
            layer-scaled attention, an unknown activation).
    """
    if getattr(hf_config, "model_type", None) != "gpt2":
        raise ValueError(
            f"only GPT-2 models convert to minigpt, got model_type {getattr(hf_config, 'model_type', None)!r}"
        )
    unsupported = {
        "add_cross_attention": True,
        "scale_attn_by_inverse_layer_idx": True,
        "scale_attn_weights": False,
    }
    for name, bad in unsupported.items():
        if getattr(hf_config, name, not bad) == bad:
            raise ValueError(f"GPT-2 with {name}={bad} has no minigpt equivalent")
    activation = _ACTIVATION_FROM_HF.get(hf_config.activation_function)
    if activation is None:
        raise ValueError(
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
        raise ValueError(f"{type(hf_model).__name__} has no language-model head; load it as GPT2LMHeadModel")
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
    return reasons


def check_gpt2_exportable(config: GPTConfig) -> None:
    """Raise ValueError naming every setting that prevents writing `config` as GPT-2."""
    reasons = gpt2_export_blockers(config)
    if reasons:
        raise ValueError(
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
    with _quiet_transformers():
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

    from minigpt.tokenizer import _LITERAL_RULES  # basic_english's ordered replacements, all literal strings

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


def minigpt_checkpoint(model: GPT, tokenizer: Vocab | BpeTokenizer, *, converted_from: str | None = None) -> dict:
    """The dict `LitMiniGPT` saves, for a model that was not trained here (plain types only).

    Its "data" entry is empty (no minigpt data settings trained it); `converted_from` records where the
    weights came from.

    `load_model`, `LitMiniGPT.load_from_checkpoint` and `LitMiniGPT(init_from=...)` read it; the
    training hyper-parameters are `LitMiniGPT`'s defaults. It holds no optimizer or loop state, so it
    starts runs (`--model.init_from`), it does not resume them (`--ckpt_path`).
    """
    import lightning

    from minigpt.checkpoint import FORMAT_VERSION as CHECKPOINT_FORMAT
    from minigpt.lit_module import LitMiniGPT

    defaults = {
        name: p.default
        for name, p in inspect.signature(LitMiniGPT.__init__).parameters.items()
        if name not in ("self", "config") and p.default is not inspect.Parameter.empty
    }
    return {
        "state_dict": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": {**defaults, "config": asdict(model.config)},
        "minigpt": {
            "format": CHECKPOINT_FORMAT,
            "tokenizer": tokenizer.to_dict(),
            "data": {},
            "converted_from": converted_from,
        },
        "pytorch-lightning_version": lightning.__version__,
        "global_step": 0,
        "epoch": 0,
    }


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
        raise ValueError(f"{out} already exists; choose another --out or remove it")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; --out must name a checkpoint file (e.g. gpt2.ckpt)")
    hf_model, tokenizer = load_hf_gpt2(hf_dir)
    model = gpt2_to_minigpt(hf_model)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer in {hf_dir} has {len(tokenizer)} tokens but the model only {model.config.vocab_size}"
        )
    if len(tokenizer) < model.config.vocab_size:
        warnings.warn(
            f"the model has {model.config.vocab_size} token rows but the tokenizer only {len(tokenizer)} tokens; "
            "fine-tuning checks that both sizes agree",
            stacklevel=2,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(minigpt_checkpoint(model, tokenizer, converted_from=str(hf_dir)), out)
    return out


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
    from minigpt.lit_module import load_model

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; --to_hf must name a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty; choose a new folder for the Hugging Face model")
    model, tokenizer = load_model(str(ckpt_path))
    hf_model = minigpt_to_gpt2(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        hf_model.save_pretrained(str(out))
        block_size = model.config.block_size
        if isinstance(tokenizer, BpeTokenizer):
            hf_tokenizer = tokenizer.to_transformers(block_size)
        else:
            hf_tokenizer = word_level_hf_tokenizer(tokenizer, block_size)
        hf_tokenizer.save_pretrained(str(out))
    return out


# -- scoring -------------------------------------------------------------------------------------------


def _score_documents(
    nll_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    block_size: int,
    stride: int | None,
    batch_size: int,
    device: torch.device,
) -> dict:
    """Bits per character and friends of `texts` under `nll_fn(x, y) -> (nll sum, count)`: the windows
    of `minigpt.evaluation.score_documents`, with every special id taken from `tokenizer`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    ids, offsets = encode_documents(tokenizer, texts)
    return score_documents(
        nll_fn, ids, offsets, sum(map(len, texts)), block_size=block_size, unk_index=tokenizer.unk_index,
        eot_index=tokenizer.eot_index, pad_index=tokenizer.pad_index, stride=stride, batch_size=batch_size,
        device=device,
    ).to_dict()  # fmt: skip


@torch.inference_mode()
def hf_bits_per_character(
    hf_model: PreTrainedModel,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    block_size: int | None = None,
    stride: int | None = None,
    *,
    batch_size: int = 4,
) -> dict:
    """Score every token of every text once with a Hugging Face causal LM, as `minigpt.evaluation` does.

    Each text becomes `<eot> text <eot>` (the tokenizer's end-of-text id) cut into windows of
    `block_size` targets; bits per character = total NLL in bits / characters of the texts, which does
    not depend on the tokenizer.

    Args:
        hf_model: e.g. a `GPT2LMHeadModel` (put in eval mode; its device is used).
        tokenizer: Its tokenizer with minigpt's interface (a `BpeTokenizer` from `load_hf_gpt2`).
        texts: The documents.
        block_size: Window length in tokens; default the model's context (`n_positions`).
        stride: Window step (< block_size gives later windows more context); default block_size.
        batch_size: Windows per forward pass (memory: batch_size x block_size x vocab floats).

    Returns:
        The keys of `minigpt.evaluation.EvalResult`: documents, characters, tokens, loss (nats/token),
        perplexity, bits_per_character, unk_rate, seconds.
    """
    hf_model.eval()
    context = _context_length(hf_model)
    block_size = block_size or context
    if not 1 <= block_size <= context:
        raise ValueError(f"block_size must be in [1, {context}] (the model's context), got {block_size}")
    device = next(hf_model.parameters()).device

    def nll_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        # Right padding after causal attention never changes the real positions: no attention mask.
        logits = hf_model(input_ids=x, use_cache=False).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        return nll, (y != IGNORE_INDEX).sum()

    return _score_documents(
        nll_fn, tokenizer, texts, block_size=block_size, stride=stride, batch_size=batch_size, device=device
    )


@torch.inference_mode()
def minigpt_bits_per_character(
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    block_size: int | None = None,
    stride: int | None = None,
    *,
    batch_size: int = 32,
) -> dict:
    """`hf_bits_per_character` for a minigpt model: the same windows, taking every special id from
    `tokenizer` (so BPE checkpoints score right too). With a word `Vocab` it equals
    `minigpt.evaluation.evaluate_ids` on the same texts.

    Args:
        model: The minigpt model (its mode is restored afterwards).
        block_size: Window length; default (and at most) `model.config.block_size`.
        The other arguments and the result are those of `hf_bits_per_character`.
    """
    block_size = block_size or model.config.block_size
    if not 1 <= block_size <= model.config.block_size:
        raise ValueError(f"block_size must be in [1, {model.config.block_size}], got {block_size}")
    was_training = model.training
    model.eval()

    def nll_fn(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return model.loss_sum_and_count(x, y, ignore_index=IGNORE_INDEX)

    try:
        return _score_documents(
            nll_fn, tokenizer, texts, block_size=block_size, stride=stride, batch_size=batch_size,
            device=model.transformer.wte.weight.device,
        )  # fmt: skip
    finally:
        model.train(was_training)


# -- generation ----------------------------------------------------------------------------------------


def _context_length(hf_model: PreTrainedModel) -> int:
    config = hf_model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of {type(hf_model).__name__} (no n_positions in its config)")


class _HFStep:
    """`minigpt.generation.StepFn` of a Hugging Face causal LM: its own cache, minigpt's loop and sampler."""

    def __init__(self, hf_model: PreTrainedModel, use_cache: bool) -> None:
        self.model, self.context, self.use_cache = hf_model, _context_length(hf_model), use_cache
        params = inspect.signature(hf_model.forward).parameters
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40).
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.past: Any = None

    def __call__(self, seq: Tensor, pad: Tensor | None, n: int) -> Tensor:
        if self.past is not None and n <= self.context:
            idx = seq[:, n - 1 : n]  # one new token after the cached ones
            keep = None if pad is None else torch.arange(n, device=seq.device) >= pad[:, None]  # (B, n)
            positions = None if pad is None else (n - 1 - pad)[:, None]
        else:  # prefill, or slide: past the context every position moves
            self.past = None
            idx, pad_mask, positions = window(seq, pad, max(0, n - self.context), n)
            keep = None if pad_mask is None else ~pad_mask
        extra = {} if keep is None else {"attention_mask": keep.long(), "position_ids": positions}
        past = {self.cache_kwarg: self.past}
        out = self.model(input_ids=idx, use_cache=self.use_cache, **past, **self.last_only, **extra)
        self.past = _returned_cache(out) if self.use_cache else None
        return out.logits[:, -1]


def hf_generate(
    hf_model: PreTrainedModel,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    stop_ids: Iterable[int] | None,
    generator: torch.Generator | None = None,
    banned_ids: Iterable[int] = (),
    use_cache: bool = True,
) -> list[GenerationResult]:
    """`minigpt.generation.generate` for a Hugging Face causal LM: the same loop and the same sampler.

    The settings mean exactly what they mean for minigpt (same order of penalty, temperature, top-k,
    top-p), a seeded `generator` makes the draw reproducible, and past the model's context the window
    slides and is recomputed each step, as in minigpt.

    Args:
        hf_model: e.g. a `GPT2LMHeadModel`.
        use_cache: Reuse the model's key/value cache between steps (False recomputes the window).
        The other arguments are those of `minigpt.generation.generate`.

    Returns:
        One `GenerationResult` per prompt.
    """
    steps = decode(
        hf_model, lambda _: _HFStep(hf_model, use_cache), prompt_ids, sampling,
        vocab_size=hf_model.get_output_embeddings().weight.size(0), stop_ids=stop_ids, generator=generator,
        banned_ids=banned_ids,
    )  # fmt: skip
    return collect(steps, stop_ids)


def _returned_cache(out: Any) -> Any:
    cache = out.get("cache")
    return out.get("past_key_values") if cache is None else cache


def hf_generate_text(
    hf_model: PreTrainedModel,
    tokenizer: Tokenizer,
    prompt: str,
    sampling: SamplingConfig = SamplingConfig(),
    *,
    generator: torch.Generator | None = None,
    allow_unk: bool = False,
    use_cache: bool = True,
) -> str:
    """`minigpt.generation.generate_text` for a Hugging Face causal LM: same prompt checks, same sampler,
    same banned ids (never `<pad>`, `<unk>` only with `allow_unk`).

    Stops at the tokenizer's end-of-text token or after `max_new_tokens`; returns the continuation only.
    """
    ids = encode_prompt(tokenizer, prompt, block_size=_context_length(hf_model))
    (result,) = hf_generate(
        hf_model, ids, sampling, stop_ids=(tokenizer.eot_index,), generator=generator,
        banned_ids=banned_special_ids(tokenizer, allow_unk=allow_unk), use_cache=use_cache,
    )  # fmt: skip
    return tokenizer.decode(result.tokens)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__

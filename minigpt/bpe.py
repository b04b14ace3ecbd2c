"""A byte-level BPE tokenizer (GPT-2's kind) behind the interface of minigpt's word `Vocab`.

`BpeTokenizer` wraps a `tokenizers.Tokenizer` read from a local Hugging Face tokenizer folder
(`tokenizer.json`, or `vocab.json` + `merges.txt`). Its whole definition is one JSON string, so
`to_dict()` embeds it in a checkpoint as plain data (loadable with `torch.load(weights_only=True)`)
and `save_pretrained` writes a folder that `transformers.AutoTokenizer.from_pretrained` loads.

Special ids, compared with the word `Vocab` (`<unk>`=0, `<pad>`=1, `<|endoftext|>`=2):

- `eot_index` is the tokenizer's end-of-text token (GPT-2: `<|endoftext|>` = 50256).
- `unk_index` is -1 when the model has no unknown token: byte-level BPE encodes every text, so no
  real id is "unknown" (GPT-2's config names `<|endoftext|>` as unk_token, but it never stands for
  an unknown word, so counting it as <unk> would be wrong).
- `pad_index` is the tokenizer's pad token if it has one, else `eot_index` (the usual Hugging Face
  choice for GPT-2, which has no pad token). It is only a filler for input positions that are
  masked anyway. It is NOT a safe `ignore_index` for the loss: with GPT-2 that would drop every
  `<|endoftext|>` target. Likewise minigpt's default `ignore_index=PAD_ID=1` is the token '"' in
  GPT-2's vocabulary, so padded targets must be ignored by position (e.g. -100), not by id.

`train_bpe` trains a new one on your text (`--data.tokenizer bpe:N`): GPT-2's byte-level
pre-tokenizer and decoder, a BPE model of N tokens (the 256 byte symbols and `<|endoftext|>`
included), no `<unk>` because every byte sequence has an encoding.

References: Hugging Face `tokenizers` (`Tokenizer.from_str`, `to_str`, `BpeTrainer`) and transformers'
`PreTrainedTokenizerFast(tokenizer_object=...)`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

EOT_TOKEN = "<|endoftext|>"
NO_ID = -1
"""`unk_index` of a tokenizer without an unknown token: an id that never occurs."""
MIN_BPE_SIZE = 257  # the 256 byte symbols and <|endoftext|>
_TRAIN_SPEC = re.compile(r"bpe:(\d+)")


def trained_bpe_size(spec: str | None) -> int | None:
    """N for a ``bpe:N`` tokenizer setting (train a BPE of N tokens here), else None.

    Raises:
        ValueError: ``bpe:N`` with N too small to hold the byte symbols and <|endoftext|>.
    """
    m = _TRAIN_SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        return None
    if int(m[1]) < MIN_BPE_SIZE:
        raise ValueError(f"data.tokenizer bpe:{m[1]} is too small: a byte-level BPE needs >= {MIN_BPE_SIZE} tokens")
    return int(m[1])


def train_bpe(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Train a byte-level BPE (GPT-2's kind) of ``vocab_size`` tokens on ``texts`` (streamed, deterministic).

    Args:
        texts: Training documents; read once, in any size (the trainer keeps word counts only).
        vocab_size: Tokens in the result, the 256 byte symbols and <|endoftext|> included.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_SIZE:
        raise ValueError(f"a byte-level BPE needs >= {MIN_BPE_SIZE} tokens, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BpeTokenizer(tok)


class BpeTokenizer:
    """A Hugging Face (byte-level BPE) tokenizer with `Vocab`'s interface: encode, decode, specials.

    Build it with `from_pretrained(folder)` or `from_dict(d)`; the constructor takes a ready
    `tokenizers.Tokenizer` and the names of its end-of-text and pad tokens.
    """

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer, *, eot_token: str = EOT_TOKEN, pad_token: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.eot_token = eot_token
        self.pad_token = pad_token
        eot = tokenizer.token_to_id(eot_token)
        if eot is None:
            raise ValueError(
                f"the tokenizer has no end-of-text token {eot_token!r}: minigpt separates documents with it "
                "(pass eot_token=... naming the tokenizer's end-of-text/eos token)"
            )
        self.eot_index: int = eot
        pad = tokenizer.token_to_id(pad_token) if pad_token is not None else None
        if pad_token is not None and pad is None:
            raise ValueError(f"the pad token {pad_token!r} is not in the tokenizer's vocabulary")
        self.pad_index: int = eot if pad is None else pad
        unk_token = getattr(tokenizer.model, "unk_token", None)
        unk = tokenizer.token_to_id(unk_token) if unk_token else None
        self.unk_index: int = NO_ID if unk is None else unk

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path) -> BpeTokenizer:
        """Read a local Hugging Face tokenizer folder (never the network).

        Args:
            folder: A folder with `tokenizer.json`, or `vocab.json` + `merges.txt` (+ optional
                `tokenizer_config.json` / `special_tokens_map.json` naming the eos/pad tokens).

        Raises:
            ValueError: the folder does not exist or holds no tokenizer transformers can read.
        """
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(f"tokenizer folder {folder} does not exist (expected a local Hugging Face folder)")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ValueError(
                f"cannot read a tokenizer from {folder} (expected tokenizer.json, or vocab.json + merges.txt): "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from err
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"the tokenizer in {folder} is not backed by the `tokenizers` library (no tokenizer.json)")
        eot_token = hf.eos_token or (EOT_TOKEN if backend.token_to_id(EOT_TOKEN) is not None else None)
        if eot_token is None:
            raise ValueError(f"the tokenizer in {folder} has no eos token and no {EOT_TOKEN!r}: minigpt needs one")
        pad_token = hf.pad_token if hf.pad_token and hf.pad_token != eot_token else None
        return cls(Tokenizer.from_str(backend.to_str()), eot_token=str(eot_token), pad_token=pad_token)

    # -- using ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __contains__(self, token: str) -> bool:
        return self.tokenizer.token_to_id(token) is not None

    @cached_property
    def itos(self) -> list[str]:
        """Id -> token string (byte-level symbols, e.g. 'Ġthe'), like `Vocab.itos`."""
        return [self.tokenizer.id_to_token(i) or "" for i in range(len(self))]

    def tokenize(self, text: str) -> list[str]:
        """The subword strings of `text` (one per id of `encode(text)`)."""
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without any special token added (minigpt adds `<|endoftext|>` itself)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (in parallel threads)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, tidy: bool = False) -> str:
        """Ids -> text. Byte-level BPE decodes exactly, so `tidy` changes nothing; special tokens are kept.

        A prefix of the ids may end inside a multi-byte character, which decodes as U+FFFD until the
        rest of its bytes follow.
        """
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # -- storage (plain strings) -----------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain data for a checkpoint: the kind, the whole `tokenizer.json` as a string and the special names."""
        return {
            "kind": self.kind,
            "tokenizer_json": self.tokenizer.to_str(),
            "eot_token": self.eot_token,
            "pad_token": self.pad_token,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BpeTokenizer:
        if not isinstance(d, dict) or d.get("kind") != cls.kind or not isinstance(d.get("tokenizer_json"), str):
            raise ValueError("not a minigpt bpe tokenizer (expected {'kind': 'bpe', 'tokenizer_json': '...'})")
        try:
            tokenizer = Tokenizer.from_str(d["tokenizer_json"])
        except Exception as err:  # the Rust parser raises plain Exception subclasses
            raise ValueError(f"the stored bpe tokenizer is corrupt: {str(err).splitlines()[0]}") from err
        return cls(tokenizer, eot_token=d.get("eot_token") or EOT_TOKEN, pad_token=d.get("pad_token"))

    def to_transformers(self, model_max_length: int | None = None):
        """A `transformers.PreTrainedTokenizerFast` over the same tokenizer (eos = bos = end-of-text).

        Args:
            model_max_length: The model's context length, recorded in `tokenizer_config.json`.
        """
        from transformers import PreTrainedTokenizerFast

        specials: dict = {"eos_token": self.eot_token, "bos_token": self.eot_token}
        if model_max_length is not None:
            specials["model_max_length"] = model_max_length
        if self.pad_token is not None:
            specials["pad_token"] = self.pad_token
        if self.unk_index != NO_ID:
            specials["unk_token"] = self.tokenizer.id_to_token(self.unk_index)
        # Byte-level decoding is exact; transformers' "clean up" would glue " ." and " 's" to the previous word.
        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(self.tokenizer.to_str()), clean_up_tokenization_spaces=False, **specials
        )

    def save_pretrained(self, folder: str | Path, *, model_max_length: int | None = None) -> list[str]:
        """Write `tokenizer.json` and `tokenizer_config.json` that `AutoTokenizer.from_pretrained` loads.

        Args:
            folder: Created if needed.
            model_max_length: The model's context length, recorded for transformers.

        Returns:
            The names of the files written.
        """
        Path(folder).mkdir(parents=True, exist_ok=True)
        written = self.to_transformers(model_max_length).save_pretrained(str(folder))
        return sorted({Path(f).name for f in written})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BpeTokenizer):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable-looking value object: equality by content, not hashable

    def __repr__(self) -> str:
        return f"BpeTokenizer(size={len(self)}, eot={self.eot_index})"

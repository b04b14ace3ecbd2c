"""``minigpt prepare``: download (if asked), tokenize and cache the data; print what a run will see."""

from __future__ import annotations

import time
from importlib.resources import files

from minigpt.cli import load_yaml_file
from minigpt.commands._common import Output, construct
from minigpt.configs import recipe_path
from minigpt.data.datamodule import IMDBDataModule


def add_arguments(parser, argv: list[str]) -> set[str]:
    parser.add_class_arguments(IMDBDataModule, "data")
    # The run's config gives the defaults of --data.*; options typed after it still win.
    parser.set_defaults({f"data.{k}": v for k, v in _config_data(_config_arg(argv)).items()})
    return {"data"}


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _config_data(path: str | None) -> dict:
    """The ``data:`` section of a fit config (default: the recipe ``minigpt fit`` runs, configs/imdb.yaml)."""
    cfg = load_yaml_file(recipe_path(path) if path else str(files("minigpt.configs") / "imdb.yaml")) or {}
    data = cfg.get("data") if isinstance(cfg, dict) else None
    return dict(data) if isinstance(data, dict) else {}


def prepare(data: dict, config: str | None = None, show: int = 0, json: bool = False) -> None:
    """Tokenize and cache the data of a run, and print what the run will see.

    Args:
        data: the data options (``--data.*``).
        config: a ``minigpt fit`` config file whose data settings to use (default: the recipe
            ``minigpt fit`` runs, configs/imdb.yaml); ``--data.*`` options override it.
        show: also print N decoded training pairs (input | target).
        json: print the summary as one JSON object on stdout (the rest goes to stderr).
    """
    out = Output(json)
    t0 = time.perf_counter()
    dm = construct(IMDBDataModule, data)
    corpus = dm.corpus
    summary = {
        "config": config or "configs/imdb.yaml (the default recipe)",
        "source": corpus.source,
        "input": corpus.meta["input"],
        "splits": {s: {"documents": corpus.documents(s), "tokens": corpus.tokens(s)} for s in corpus.splits},
        "vocab_size": len(corpus.vocab),
        "val_unk_rate": round(corpus.unk_rate("val"), 6),
        "block_size": dm.block_size,
        "batch_size": dm.batch_size,
        "sampling": dm.sampling,
        "seconds": round(time.perf_counter() - t0, 3),
        "cache": str(corpus.path),
        # The build that wrote the cache entry (on a cached start: that earlier build).
        "build": {k: corpus.meta.get(k) for k in ("megabytes", "seconds", "peak_rss_gb")},
    }
    out.say(f"config      {summary['config']}", f"source      {summary['source']} ({summary['input']})")
    for split, n in summary["splits"].items():
        out.say(f"{split:<11} {n['documents']:>9,} documents {n['tokens']:>12,} tokens")
    out.say(
        f"vocab       {summary['vocab_size']:,} tokens (min_freq {dm.spec.min_freq}, max_size {dm.spec.max_size})",
        f"val <unk>   {summary['val_unk_rate']:.2%} of validation tokens",
        f"batches     {dm.batch_size} x {dm.block_size} tokens, sampling {dm.sampling}",
        f"seconds     {summary['seconds']:.2f}   cache {summary['cache']}",
    )
    built = summary["build"]
    if built["megabytes"] and built["seconds"] and built["peak_rss_gb"]:
        out.say(
            f"built       {built['megabytes']:,.0f} MB in {built['seconds']:.1f} s "
            f"({built['megabytes'] / built['seconds']:.1f} MB/s), peak memory {built['peak_rss_gb'][0]:.2f} GB"
        )
    if show:
        dm.setup("fit")
        ds = dm.datasets["train"]
        for i in range(min(show, len(ds))):
            x, y = ds[i]
            out.say(f"[{i}] {dm.vocab.decode(x)}  |  {dm.vocab.decode(y)}")
    out.result(summary)

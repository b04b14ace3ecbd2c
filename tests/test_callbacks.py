"""minigpt.callbacks: EMAWeights (what a checkpoint holds, and a resume that continues the same run), and the
training-time samples beside compiled blocks."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minigpt.callbacks import GenerationCallback
from minigpt.cli import main
from minigpt.config import GPTConfig
from minigpt.generation import SamplingConfig
from minigpt.hardware import can_compile
from minigpt.model import GPT
from minigpt.tokenizer import SPECIALS, Vocab

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EMA = ["--trainer.callbacks+=minigpt.callbacks.EMAWeights", "--trainer.callbacks.decay", "0.5"]


def fit(corpus, root: Path, *extra) -> dict:
    # A constant rate: the first steps are the same whatever the run's length.
    main(["fit", "--config", str(CONFIGS / "tiny.yaml"), "--data.source", "text", "--data.text_path", str(corpus),
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
          "--model.scheduler", "constant", *extra])  # fmt: skip
    return torch.load(root / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)


def test_the_checkpoint_holds_the_moving_average_and_the_weights_being_trained(corpus, tmp_path):
    plain = fit(corpus, tmp_path / "plain", "--trainer.max_steps", "2")
    one = fit(corpus, tmp_path / "one", "--trainer.max_steps", "1", *EMA)
    two = fit(corpus, tmp_path / "two", "--trainer.max_steps", "2", *EMA)
    # The average changes nothing in training: the weights trained are those of a run without it.
    for name, value in plain["state_dict"].items():
        assert torch.equal(two["current_model_state"][name], value), name
    # After one step the average is the weights; after two, decay 0.5 weighs both steps alike.
    moved = 0
    for name, w2 in two["current_model_state"].items():
        w1 = one["current_model_state"][name]
        assert torch.equal(one["state_dict"][name], w1), name
        assert torch.allclose(two["state_dict"][name], 0.5 * w1 + 0.5 * w2, atol=1e-6), name
        moved += not torch.equal(w1, w2)
    assert moved > 10  # the step changed the weights, so the average differs from both


def test_a_run_resumed_mid_way_continues_the_average_and_the_weights(corpus, tmp_path):
    every_3 = ["--checkpoint.every_n_train_steps", "3", "--checkpoint.save_top_k", "-1", "--checkpoint.monitor", "null",
               "--checkpoint.filename", "{step}"]  # fmt: skip
    straight = fit(corpus, tmp_path, "--trainer.max_steps", "6", *every_3, *EMA)
    checkpoints = tmp_path / "lightning_logs/version_0/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=3.ckpt", "step=6.ckpt"]
    # From the step-3 checkpoint the run continues in its own folder and writes last.ckpt again.
    resumed = fit(corpus, tmp_path, "--trainer.max_steps", "6", "--ckpt_path", str(checkpoints / "step=3.ckpt"),
                  *every_3, *EMA)  # fmt: skip
    assert straight["global_step"] == resumed["global_step"] == 6
    for key in ("state_dict", "current_model_state"):
        assert straight[key].keys() == resumed[key].keys()
        for name, value in straight[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)


@pytest.mark.parametrize("limit", ["--trainer.max_steps", "--trainer.max_epochs"])
def test_a_finished_run_extended_continues_the_weights_not_the_average(corpus, tmp_path, limit):
    # A run that ends with an epoch writes its last checkpoint after Lightning moved the average into the model.
    budget = ["--trainer.max_steps", "-1"] if limit == "--trainer.max_epochs" else []
    straight = fit(corpus, tmp_path / "straight", *budget, limit, "2" if budget else "6", *EMA)
    fit(corpus, tmp_path / "extended", *budget, limit, "1" if budget else "3", *EMA)
    extended = fit(corpus, tmp_path / "extended", *budget, limit, "2" if budget else "6", "--ckpt_path", "last", *EMA)
    assert straight["global_step"] == extended["global_step"] >= 6
    for key in ("state_dict", "current_model_state"):
        for name, value in straight[key].items():
            assert torch.equal(extended[key][name], value), (key, name)


def test_evaluate_reads_the_average(corpus, tmp_path, capsys):
    ckpt = tmp_path / "run/lightning_logs/version_0/checkpoints/last.ckpt"
    saved = fit(corpus, tmp_path / "run", "--trainer.max_steps", "3", *EMA)
    capsys.readouterr()
    main(["evaluate", "--ckpt_path", str(ckpt), "--text_file", str(corpus), "--max_docs", "4", "--json"])
    averaged = json.loads(capsys.readouterr().out)["bits_per_character"]
    saved["state_dict"] = saved.pop("current_model_state")
    torch.save(saved, tmp_path / "current.ckpt")
    main(["evaluate", "--ckpt_path", str(tmp_path / "current.ckpt"), "--text_file", str(corpus), "--max_docs", "4",
          "--json"])  # fmt: skip
    current = json.loads(capsys.readouterr().out)["bits_per_character"]
    assert math.isfinite(averaged) and math.isfinite(current) and averaged != current


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="torch.compile needs a C++ compiler")
def test_samples_run_the_compiled_blocks_eagerly():
    from torch._dynamo.testing import CompileCounter

    vocab = Vocab(list(SPECIALS) + ["the", "movie", "was", "good", "bad", "."])
    model = GPT(GPTConfig.tiny(vocab_size=len(vocab)))
    counter = CompileCounter()  # counts the graphs torch.compile builds, and runs them as they are
    model.compile_parts(backend=counter)
    ids = torch.randint(0, len(vocab), (2, 8), generator=torch.Generator().manual_seed(0))
    model.loss(ids, ids).backward()  # training's graphs
    built = counter.frame_count
    assert built > 0
    trainer = SimpleNamespace(sanity_checking=False, global_step=1, logger=None)
    module = SimpleNamespace(model=model, tokenizer=vocab, device=torch.device("cpu"))
    callback = GenerationCallback(sampling=SamplingConfig.greedy(6))
    callback.on_validation_epoch_end(trainer, module)
    # A sample (other shapes, a KV cache, inference mode) compiled nothing new.
    assert callback.last_samples[0][0] == "the movie was" and counter.frame_count == built

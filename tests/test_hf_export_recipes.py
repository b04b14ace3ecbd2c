"""The recipes' checkpoints leave minigpt: exported, then loaded by transformers where minigpt cannot be imported.

`configs/imdb.yaml` (adaptive softmax with tied adaptive input, scaled embeddings, pre-norm with RMSNorm,
rotary positions, ReLU², QK-norm, no biases, hashed bigram embeddings) and `configs/seed.yaml` (the tutorial:
post-norm, ReLU, sinusoidal, untied linear head) each train a few steps with `minigpt fit` at their full width
on a small synthetic corpus (so the adaptive head keeps its first cluster, at 1,000 words). Each checkpoint is
exported with `minigpt convert`; a separate Python, in which `import minigpt` and `import lightning` fail,
loads both folders with `AutoModelForCausalLM` (`trust_remote_code=True`, offline) and runs them; its logits
and greedy text must be minigpt's, `pipeline` must run, and each folder converts back to the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt.checkpoint import load_model
from minigpt.cli import main
from minigpt.generation import SamplingConfig, generate_text

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROMPT = "the movie was"
# Beyond each recipe's context (64 and 30 tokens): both continue by re-reading their last block_size tokens.
NEW_TOKENS = 70

RECIPES = {
    "imdb": ["--data.block_size", "32", "--data.batch_size", "8"],
    "seed": ["--data.val_split", "train"],  # a text corpus has no official test split
}

CHILD = r"""
import contextlib, io, json, os, re, sys
sys.modules["minigpt"] = None  # `import minigpt` raises ImportError
sys.modules["lightning"] = None
sys.modules["pytorch_lightning"] = None
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

out = {}
for name, folder in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # it reads config.json too
    ids = torch.tensor(json.loads(sys.argv[2])[name])
    with torch.no_grad():
        logits = model(ids).logits
    prompt = tokenizer(sys.argv[3], return_tensors="pt")
    greedy = model.generate(**prompt, do_sample=False, max_new_tokens=int(sys.argv[4]))
    pipe = transformers.pipeline("text-generation", model=folder, trust_remote_code=True, device="cpu")
    out[name] = {
        "class": type(model).__module__ + "." + type(model).__name__,
        "logits": logits.tolist(),
        "greedy": greedy[0, prompt["input_ids"].size(1):].tolist(),
        "pipeline": pipe(sys.argv[3], max_new_tokens=8)[0]["generated_text"],
    }
    # Saved again from remote code (e.g. after fine-tuning), the folder keeps the same code.
    model.save_pretrained(folder + "-again")
    out[name]["same_code_saved"] = all(
        open(os.path.join(folder + "-again", f)).read() == open(os.path.join(folder, f)).read()
        for f in os.listdir(folder) if f.endswith(".py")
    ) and sorted(f for f in os.listdir(folder + "-again") if f.endswith(".py")) == sorted(
        f for f in os.listdir(folder) if f.endswith(".py"))
    # The model card's example, as a reader copies it, next to the folder.
    card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    os.chdir(os.path.dirname(folder))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), {})
    out[name]["card_example"] = printed.getvalue()
try:
    import minigpt  # noqa: F401
    out["minigpt_importable"] = True
except ImportError:
    out["minigpt_importable"] = False
out["lightning_loaded"] = any(m.split(".")[0] in ("lightning", "pytorch_lightning") and sys.modules[m] is not None
                              for m in sys.modules)
print(json.dumps(out))
"""


def _corpus(path: Path) -> Path:
    """Reviews over 1,500 made-up words (each seen at least twice: imdb.yaml keeps words seen twice), each
    beginning with the prompt's words."""
    words = [f"w{i}" for i in range(1500)]
    docs = [f"The movie was {' '.join(words[(d * 37 + k * 11) % len(words)] for k in range(40))}. It's fun!"
            for d in range(160)]  # fmt: skip
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """recipe -> (checkpoint, exported folder), trained and exported with the command line."""
    root = tmp_path_factory.mktemp("recipes")
    corpus = _corpus(root / "corpus.txt")
    out = {}
    for name, extra in RECIPES.items():
        (root / name).mkdir()
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root / name)
            main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--data.source", "text", "--data.text_path",
                  str(corpus), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                  "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", *extra])  # fmt: skip
        ckpt = root / name / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
        folder = root / f"{name}-hf"
        main(["convert", "--ckpt_path", str(ckpt), "--to_hf", str(folder)])
        out[name] = ckpt, folder
    return out


def test_recipes_load_and_match_without_minigpt(recipes, tmp_path):
    ids, expected = {}, {}
    for name, (ckpt, _) in recipes.items():
        model, tok = load_model(ckpt)
        c = model.config
        if name == "imdb":
            assert (c.head, c.tie_weights, c.positional, c.norm_first, c.n_embd) == ("adaptive", True, "rotary",
                                                                                    True, 160)  # fmt: skip
            block = (c.norm, c.activation, c.qk_norm, c.zero_init_proj, c.bias)
            assert block == ("rmsnorm", "relu2", True, True, False)
            assert c.adaptive_cutoffs_used == (1000,) and c.vocab_size > 1000
            assert (c.bigram_buckets, c.bigram_dim, c.bigram_dropout) == (65536, 64, 0.3)
        else:
            assert (c.head, c.tie_weights, c.positional, c.norm_first, c.activation, c.d_ff) == (
                "linear", False, "sinusoidal", False, "relu", 2048)  # fmt: skip
        idx = torch.randint(0, c.vocab_size, (2, c.block_size), generator=torch.Generator().manual_seed(0))
        ids[name] = idx.tolist()
        with torch.no_grad():
            expected[name] = model(idx), generate_text(model, tok, PROMPT, SamplingConfig.greedy(NEW_TOKENS)), tok
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH="")
    folders = {name: str(folder) for name, (_, folder) in recipes.items()}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(folders), json.dumps(ids), PROMPT, str(NEW_TOKENS)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    *_, last = done.stdout.strip().splitlines() or [""]
    assert last.startswith("{"), done.stdout[-3000:] + done.stderr[-3000:]
    got = json.loads(last)
    assert got.pop("minigpt_importable") is False and got.pop("lightning_loaded") is False
    for name, (logits, text, tok) in expected.items():
        result = got[name]
        assert result["class"].startswith("transformers_modules.") and result["class"].endswith("MiniGPTForCausalLM")
        torch.testing.assert_close(torch.tensor(result["logits"]), logits, atol=1e-5, rtol=0)
        # transformers' greedy tokens (generation_config.json stops at <|endoftext|> and never picks <pad> or
        # <unk>, as minigpt) decoded by minigpt are minigpt's greedy text, past the context too.
        new = result["greedy"][:-1] if result["greedy"][-1:] == [tok.eot_index] else result["greedy"]
        assert tok.decode(new, tidy=True) == text and len(new) > 0
        assert result["pipeline"].startswith(PROMPT) and len(result["pipeline"]) > len(PROMPT)
        assert result["same_code_saved"] is True
        assert result["card_example"].startswith(PROMPT) and len(result["card_example"]) > len(PROMPT) + 20


def test_recipes_round_trip_exactly(recipes, tmp_path):
    for name, (ckpt, folder) in recipes.items():
        back = tmp_path / f"{name}.ckpt"
        main(["convert", "--from_hf", str(folder), "--out", str(back)])
        (model, tok), (again, tok_again) = load_model(ckpt), load_model(back)
        assert again.config == model.config and tok_again.to_dict() == tok.to_dict()
        ours, theirs = model.state_dict(), again.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
        with torch.no_grad():
            assert torch.equal(model(idx), again(idx)), name  # delta logit 0


def test_import_minigpt_stays_cheap_and_registers_on_transformers_import():
    """`import minigpt` imports neither torch nor transformers; importing transformers' Auto classes afterwards
    registers minigpt's classes (and the import hook removes itself)."""
    script = (
        "import sys, minigpt\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "config = AutoConfig.for_model('minigpt', vocab_size=8)\n"
        "assert type(AutoModelForCausalLM.from_config(config)).__name__ == 'MiniGPTForCausalLM'\n"
        "assert not any(type(f).__name__ == '_AfterImport' for f in sys.meta_path)\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

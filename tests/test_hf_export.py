"""Every minigpt architecture as a transformers model: equivalence, generation, sources, tokenizer, folder.

Tiny random models cover every `GPTConfig` option; each is exported with `save_pretrained` into a temporary
folder and loaded back with `AutoModelForCausalLM` (the classes minigpt registers). Loading without minigpt
installed is tested in tests/test_hf_export_recipes.py. Nothing touches the network.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.dynamic_module_utils import get_relative_import_files

import minigpt
from minigpt import hf_model
from minigpt.bpe import BpeTokenizer, train_bpe
from minigpt.checkpoint import load_model, new_checkpoint, save_checkpoint
from minigpt.config import GPTConfig
from minigpt.convert import (
    convert_from_hf,
    convert_to_hf,
    minigpt_to_hf,
    to_transformers,
    word_level_hf_tokenizer,
    word_vocab_of,
)
from minigpt.data.sources import read_imdb
from minigpt.errors import UserError
from minigpt.generation import SamplingConfig, banned_special_ids, generate, generate_text
from minigpt.hf import hf_generate
from minigpt.hf_model import source_files
from minigpt.hf_model.configuration_minigpt import MiniGPTConfig
from minigpt.hf_model.modeling_minigpt import MiniGPTForCausalLM
from minigpt.model import GPT, lm_loss
from minigpt.tokenizer import Vocab

VOCAB = 48
PAD = 1
TEXTS = [
    "The movie was great, I loved every minute of it! (Really.)",
    'A terrible film... Don\'t watch it; the plot is "boring" and the actors are bad?',
    "It's not very good: but the story's fun <br /><br />and the ending ( twist ) works.",
] * 4

# One tiny config per family of options; together they cover every value of every GPTConfig choice.
GRID = {
    "seed": dict(dropout=0.1),  # the tutorial: post-norm, ReLU, sinusoidal, scaled, untied linear head with bias
    "imdb": dict(positional="learned", norm_first=True, activation="gelu", head="adaptive",
                 adaptive_cutoffs=(16, 32), adaptive_div_value=2.0, tie_weights=True),
    "modern": dict(positional="rotary", rope_base=500.0, norm="rmsnorm", activation="swiglu", qk_norm=True,
                   bias=False, tie_weights=True, lm_head_bias=False, scale_embedding=False, norm_first=True,
                   zero_init_proj=True, bigram_buckets=40, bigram_dim=8),
    "adaptive-untied": dict(head="adaptive", adaptive_cutoffs=(20,), activation="relu2", positional="learned",
                            layer_norm_eps=1e-6, lm_head_bias=False),
    "gpt2-like": dict(positional="learned", norm_first=True, activation="gelu_tanh", tie_weights=True,
                      lm_head_bias=False, scale_embedding=False),
    # configs/imdb.yaml's options: the adaptive input with a shortlist table of its own, rotary, the bigram table
    "own-shortlist": dict(positional="rotary", norm="rmsnorm", activation="relu2", qk_norm=True, bias=False,
                          norm_first=True, head="adaptive", adaptive_cutoffs=(16, 32), adaptive_div_value=2.0,
                          tie_weights=True, tie_shortlist=False, bigram_buckets=40, bigram_dim=8),
}  # fmt: skip

# A value other than the default for every GPTConfig field (and what it needs to be valid). A field added to
# GPTConfig without an entry here fails `test_every_config_field_survives_export`.
ALTERNATIVES = {
    "vocab_size": (40, {}),
    "block_size": (12, {}),
    "n_embd": (24, {}),
    "n_layer": (3, {}),
    "n_head": (4, {}),
    "d_ff": (40, {}),
    "dropout": (0.3, {}),
    "positional": ("rotary", {}),
    "rope_base": (100.0, {"positional": "rotary"}),
    "norm_first": (True, {}),
    "activation": ("swiglu", {}),
    "norm": ("rmsnorm", {}),
    "qk_norm": (True, {}),
    "zero_init_proj": (True, {}),
    "scale_embedding": (False, {}),
    "bias": (False, {}),
    "layer_norm_eps": (1e-3, {}),
    "head": ("adaptive", {"adaptive_cutoffs": (20,)}),
    "tie_weights": (True, {}),
    "tie_shortlist": (False, {"head": "adaptive", "adaptive_cutoffs": (20,), "tie_weights": True}),
    "lm_head_bias": (False, {}),
    "adaptive_cutoffs": ((10, 30), {"head": "adaptive"}),
    "adaptive_div_value": (2.0, {"head": "adaptive", "adaptive_cutoffs": (20,)}),
    "bigram_buckets": (50, {}),
    "bigram_dim": (8, {"bigram_buckets": 50}),
    "bigram_dropout": (0.2, {"bigram_buckets": 50}),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)


def random_gpt(vocab_size: int = VOCAB, **overrides) -> GPT:
    """A tiny GPT with weights far from init, so that logits and greedy tokens vary."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=vocab_size, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 if p.dim() > 1 else p + 0.1 * torch.randn_like(p))
    return model


def export(model: GPT, folder: Path, tokenizer=None) -> Path:
    minigpt_to_hf(model, tokenizer).save_pretrained(folder)
    return folder


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (the minigpt model, the transformers model loaded from its exported folder)."""
    pairs = {}
    for name, overrides in GRID.items():
        model = random_gpt(**overrides)
        pairs[name] = model, load(export(model, tmp_path_factory.mktemp(name)))
    return pairs


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids padded on the left with PAD, and transformers' attention mask (1 = token)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    return ids, mask


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20, 21]]


# -- the model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GRID)
def test_logits_equal_minigpt_with_and_without_left_padding(exported, name):
    model, hf = exported[name]
    assert type(hf) is MiniGPTForCausalLM  # registered: no remote code
    idx = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=0)
        ids, mask = left_padded(PROMPTS)
        padded = hf(ids, attention_mask=mask).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's real positions
        expected = model(ids, mask == 0, positions=positions)
        real = mask.bool()
        torch.testing.assert_close(padded[real], expected[real], atol=1e-5, rtol=0)
        for i, p in enumerate(PROMPTS):  # the same function as each prompt alone (up to float rounding)
            torch.testing.assert_close(padded[i, -len(p) :], model(torch.tensor([p]))[0], atol=1e-4, rtol=1e-5)
        # explicit position ids (what transformers' generate passes) mean the same
        torch.testing.assert_close(hf(ids, attention_mask=mask, position_ids=positions).logits, padded)


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("name", GRID)
def test_greedy_generate_equals_minigpt(exported, name, use_cache):
    """Left-padded prompts, run past the 16-token context (both slide the window)."""
    model, hf = exported[name]
    expected = [r.tokens for r in generate(model, PROMPTS, SamplingConfig.greedy(20), stop_ids=None)]
    ids, mask = left_padded(PROMPTS)
    settings = GenerationConfig(do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=PAD,
                                use_cache=use_cache)  # fmt: skip
    got = hf.generate(ids, attention_mask=mask, generation_config=settings)[:, ids.size(1) :].tolist()
    assert got == expected
    assert len({t for row in got for t in row}) > 3  # real sequences, not one repeated token


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("name", GRID)
def test_minigpt_loop_over_the_exported_model_equals_minigpt(exported, name, use_cache):
    """`minigpt compare`'s path: minigpt's decoding loop driving the transformers model (`hf_generate`)."""
    model, hf = exported[name]
    expected = [r.tokens for r in generate(model, PROMPTS, SamplingConfig.greedy(20), stop_ids=None)]
    got = [r.tokens for r in hf_generate(hf, PROMPTS, SamplingConfig.greedy(20), stop_ids=None, use_cache=use_cache)]
    assert got == expected


def _cache(output):
    # transformers 5 returns the cache as `cache`, earlier releases as `past_key_values`
    return output.cache if "cache" in output else output.past_key_values


def test_kv_cache_steps_equal_full_forward(exported):
    """The cache adapter: feeding tokens one by one through transformers' DynamicCache gives the full forward."""
    model, hf = exported["modern"]
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        full = hf(ids, attention_mask=mask).logits
        out = hf(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, ids.size(1)):
            previous = ids[:, t - 1].masked_fill(mask[:, t - 1] == 0, -1)  # its bigram embedding reads it
            out = hf(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=_cache(out), use_cache=True,
                     previous_token_ids=previous)  # fmt: skip
            steps.append(out.logits)
    assert _cache(out).get_seq_length() == ids.size(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_sampling_runs_and_is_reproducible(exported):
    _, hf = exported["imdb"]
    ids, mask = left_padded(PROMPTS)
    settings = GenerationConfig(do_sample=True, temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=12,
                                eos_token_id=None, pad_token_id=PAD, suppress_tokens=[0, PAD])  # fmt: skip
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(hf.generate(ids, attention_mask=mask, generation_config=settings)[:, ids.size(1) :])
    assert torch.equal(draws[0], draws[1]) and draws[0].shape == (3, 12)
    assert int(draws[0].min()) >= 2 and int(draws[0].max()) < VOCAB  # suppressed <unk>/<pad> never drawn
    torch.manual_seed(4)
    assert not torch.equal(hf.generate(ids, attention_mask=mask, generation_config=settings)[:, ids.size(1) :],
                           draws[0])  # fmt: skip


@pytest.mark.parametrize("name", ["seed", "imdb"])
def test_labels_give_minigpts_loss(exported, name):
    model, hf = exported[name]
    idx = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        loss = hf(idx, labels=idx).loss
        expected = lm_loss(model(idx[:, :-1]), idx[:, 1:])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


def test_inputs_it_cannot_use_are_refused(exported):
    _, hf = exported["seed"]
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        hf(inputs_embeds=torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="output_attentions"):
        hf(torch.tensor([[3, 4]]), output_attentions=True)
    with pytest.raises(ValueError, match="attention_mask covers 5 tokens, but the cache holds 0"):
        hf(torch.tensor([[3, 4]]), attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))


def test_every_config_field_survives_export(tmp_path):
    names = [f.name for f in dataclasses.fields(GPTConfig)]
    assert sorted(ALTERNATIVES) == sorted(names), "give every GPTConfig field an alternative value above"
    small = dict(n_embd=16, n_layer=1, n_head=2, d_ff=32)
    for name in names:
        value, needs = ALTERNATIVES[name]
        config = GPTConfig(**{**dataclasses.asdict(GPTConfig.tiny(vocab_size=VOCAB, **small)), **needs, name: value})
        assert value != GPTConfig.__dataclass_fields__[name].default, name
        model = GPT(config).eval()
        folder = export(model, tmp_path / name)
        assert json.loads((folder / "config.json").read_text())[name] == (
            list(value) if isinstance(value, tuple) else value
        )
        assert AutoConfig.from_pretrained(folder).to_gpt_config() == config
        hf = load(folder)
        idx = torch.randint(0, config.vocab_size, (1, config.block_size))
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=0, msg=name)


def test_tied_weights_are_stored_once_and_stay_tied(exported, tmp_path):
    for name, key in (("gpt2-like", "model.transformer.wte.weight"), ("imdb", "model.adaptive.head.weight")):
        model, hf = exported[name]
        folder = export(model, tmp_path / name)
        with safe_open(folder / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        assert key in keys and "model.lm_head.weight" not in keys and not any("wte" in k for k in keys - {key})
    _, hf = exported["gpt2-like"]
    assert hf.model.lm_head.weight is hf.model.transformer.wte.weight
    assert hf.config.tie_word_embeddings and not exported["imdb"][1].config.tie_word_embeddings
    _, untied = exported["seed"]
    assert untied.model.lm_head.weight.data_ptr() != untied.model.transformer.wte.weight.data_ptr()


def test_gpt2_equivalent_configs_stay_native_gpt2():
    gpt2 = GPT(GPTConfig.gpt2(vocab_size=VOCAB, block_size=16, n_embd=32, n_layer=1, n_head=4))
    assert type(to_transformers(gpt2)).__name__ == "GPT2LMHeadModel"
    assert type(to_transformers(random_gpt(**GRID["imdb"]))) is MiniGPTForCausalLM


# -- the folder's code -------------------------------------------------------------------------------


def _absolute_imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):  # inside functions too
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


class _DropOwnImports(ast.NodeTransformer):
    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.ImportFrom | None:
        return None if node.level or (node.module or "").split(".")[0] == "minigpt" else node


def _without_own_imports(tree: ast.Module) -> ast.Module:
    """The module without its imports of minigpt (absolute, in the package) or of its siblings (relative)."""
    return _DropOwnImports().visit(tree)


def test_exported_code_is_the_package_code(exported, tmp_path):
    model, loaded = exported["imdb"]
    folder = export(model, tmp_path / "f")
    written = {p.name: p.read_text() for p in folder.glob("*.py")}
    assert written == source_files.source_files()
    loaded.save_pretrained(tmp_path / "again")  # a loaded model saves the same self-contained folder
    assert {p.name: p.read_text() for p in (tmp_path / "again").glob("*.py")} == written
    assert {"configuration_minigpt.py", "modeling_minigpt.py", "minigpt_model.py", "minigpt_config.py"} <= set(written)
    # Each file is a package module (minigpt/a/b.py -> minigpt_a_b.py; minigpt/hf_model/x.py keeps its name)
    # with only its minigpt imports changed into relative ones.
    package = Path(minigpt.__file__).parent
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not parts:
            continue  # minigpt/__init__.py is never exported
        flat = parts[1] if parts[0] == "hf_model" and len(parts) == 2 else "_".join(("minigpt", *parts))
        modules[flat + ".py"] = path
    for name, text in written.items():
        source = modules[name].read_text()
        assert ast.dump(_without_own_imports(ast.parse(text))) == ast.dump(_without_own_imports(ast.parse(source)))
        added = [line for line in text.splitlines() if line not in source.splitlines()]
        assert all(line.lstrip().startswith("from .") for line in added), (name, added)
    # Only torch, transformers, the standard library and the folder's own files.
    allowed = {"torch", "transformers", *sys.stdlib_module_names}
    for name, text in written.items():
        tree = ast.parse(text)
        assert _absolute_imports(tree) <= allowed, (name, _absolute_imports(tree) - allowed)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module or node.names[0].name}.py" in written, (name, node.module)
    # transformers copies exactly the files the two entry modules reach through `from .x import` lines.
    reached = {Path(p).name for m in ("configuration_minigpt", "modeling_minigpt")
               for p in get_relative_import_files(folder / f"{m}.py")}  # fmt: skip
    assert reached | {"configuration_minigpt.py", "modeling_minigpt.py"} == set(written)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_minigpt.MiniGPTConfig",
        "AutoModelForCausalLM": "modeling_minigpt.MiniGPTForCausalLM",
    }


def test_source_rewrite_refuses_imports_without_a_flat_form(tmp_path, monkeypatch):
    pkg = tmp_path / "minigpt"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("X = 1\n")
    monkeypatch.setattr(source_files, "_ROOT", pkg)
    cases = {
        "import minigpt.a\n": "not `import minigpt",
        "from minigpt import X\n": "from the module that defines it",
        "x = 1; from minigpt.a import X\n": "lines of its own",
        "from minigpt import a\nY = 2\n": "none of its names is used",
    }
    for text, message in cases.items():
        (pkg / "sub" / "m.py").write_text(text)
        with pytest.raises(ValueError, match=message):
            source_files._rewrite(pkg / "sub" / "m.py")
    (pkg / "sub" / "m.py").write_text("def f():\n    from minigpt import a\n    return a.X\n")
    text, needs = source_files._rewrite(pkg / "sub" / "m.py")
    assert text == (
        "def f():\n    from . import minigpt_a as a\n"
        "    from .minigpt_a import X  # noqa: F401 (names the file)\n    return a.X\n"
    )
    assert needs == [pkg / "a.py"]
    # a package's modules flatten too: minigpt/sub/b.py -> minigpt_sub_b.py, minigpt/sub/__init__.py -> minigpt_sub.py
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("Y = 2\n")
    (pkg / "c.py").write_text("from minigpt.sub.b import Y as Z\nfrom minigpt.sub import b\nW = b.Y + Z\n")
    text, needs = source_files._rewrite(pkg / "c.py")
    assert text.splitlines()[:3] == [
        "from .minigpt_sub_b import Y as Z",
        "from . import minigpt_sub_b as b",
        "from .minigpt_sub_b import Y  # noqa: F401 (names the file)",
    ]
    assert sorted(needs) == [pkg / "sub" / "b.py", pkg / "sub" / "b.py"]
    assert source_files._flat_file(pkg / "sub" / "__init__.py") == "minigpt_sub.py"


def test_registration_when_transformers_came_first(monkeypatch):
    """minigpt imported after transformers' Auto classes registers at once (and installs no import hook)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    monkeypatch.delitem(CONFIG_MAPPING._extra_content, "minigpt")
    monkeypatch.delitem(MODEL_FOR_CAUSAL_LM_MAPPING._extra_content, MiniGPTConfig)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    with pytest.raises(KeyError):
        CONFIG_MAPPING["minigpt"]
    hf_model.install_registration()
    assert (
        CONFIG_MAPPING["minigpt"] is MiniGPTConfig and MODEL_FOR_CAUSAL_LM_MAPPING[MiniGPTConfig] is MiniGPTForCausalLM
    )
    assert not any(type(f).__name__ == "_AfterImport" for f in sys.meta_path)


# -- tokenizer ---------------------------------------------------------------------------------------


def test_word_level_tokenizer_encodes_and_decodes_like_minigpt():
    vocab = Vocab.build(TEXTS[:2])  # the third text has unknown words
    tok = word_level_hf_tokenizer(vocab)
    for text in TEXTS[:3] + ["(( '' )) ... ,, !? ' ( ) end", ". a", ""]:
        ids = vocab.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.decode(ids).removeprefix(" ") == vocab.decode(ids, tidy=True)  # each word has its space
    assert word_level_hf_tokenizer(Vocab.build(TEXTS)).decode(Vocab.build(TEXTS).encode("It's (not) good.")) == (
        " it's (not) good."
    )
    assert tok.decode(vocab.encode(". it")) == ". it"  # a first token that glues left has no space to lose


def test_word_level_tokenizer_on_real_reviews(real_archive):
    docs = read_imdb(real_archive, ("test",))["test"]
    texts = [d.text for d in docs[:: len(docs) // 1000]][:1000]
    vocab = Vocab.build(texts[:500], min_freq=2)  # the other 500 reviews bring unknown words
    tok = word_level_hf_tokenizer(vocab)
    ids = [vocab.encode(t) for t in texts]
    assert tok(texts, add_special_tokens=False)["input_ids"] == ids
    assert sum(i.count(vocab.unk_index) for i in ids) > 1000
    assert [t.removeprefix(" ") for t in tok.batch_decode(ids)] == [vocab.decode(i, tidy=True) for i in ids]


# -- checkpoint <-> folder ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_ckpt(tmp_path_factory):
    vocab = Vocab.build(TEXTS)
    model = random_gpt(len(vocab), **GRID["imdb"])
    path = tmp_path_factory.mktemp("ckpt") / "word.ckpt"
    return save_checkpoint(new_checkpoint(model, vocab), path)


def test_round_trip_is_exact(word_ckpt, tmp_path):
    folder = convert_to_hf(word_ckpt, tmp_path / "hf")
    back = convert_from_hf(folder, tmp_path / "back.ckpt")
    (model, vocab), (again, vocab_again) = load_model(word_ckpt), load_model(back)
    assert isinstance(vocab_again, Vocab) and vocab_again.itos == vocab.itos
    assert again.config == model.config
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), again(idx))  # delta logit 0


def test_pipeline_continues_like_minigpt(word_ckpt, tmp_path):
    folder = convert_to_hf(word_ckpt, tmp_path / "hf")
    model, vocab = load_model(word_ckpt)
    prompt = vocab.encode("the movie was")
    (result,) = generate(model, prompt, SamplingConfig.greedy(10), stop_ids=(vocab.eot_index,),
                         banned_ids=banned_special_ids(vocab))  # fmt: skip
    assert GenerationConfig.from_pretrained(folder).suppress_tokens == [vocab.pad_index, vocab.unk_index]
    pipe = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    (got,) = pipe("the movie was", do_sample=False, max_new_tokens=10)
    # The pipeline returns the prompt + the continuation decoded alone (which begins with its word's space).
    assert got["generated_text"] == "the movie was" + pipe.tokenizer.decode(result.tokens)
    assert vocab.encode(got["generated_text"]) == prompt + result.tokens
    sampled = pipe("the movie was", max_new_tokens=10)  # generation_config.json: minigpt's default sampling
    assert sampled[0]["generated_text"].startswith("the movie was")


def test_folder_is_ready_to_publish(tmp_path):
    from huggingface_hub import ModelCard

    tok = train_bpe(TEXTS, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=len(tok), **GRID["modern"])).eval()
    ckpt = new_checkpoint(model, tok)
    ckpt.update(global_step=123, epoch=2, callbacks={"RunCheckpoint{}": {"monitor": "val_loss", "best_model_score":
                torch.tensor(2.5)}}, minigpt={**ckpt["minigpt"], "data": {"source": "bundled", "block_size": 16,
                "batch_size": 4}})  # fmt: skip
    folder = convert_to_hf(save_checkpoint(ckpt, tmp_path / "m.ckpt"), tmp_path / "my-model", license="apache-2.0")
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= names
    gen = GenerationConfig.from_pretrained(folder)
    defaults = SamplingConfig()
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens) == (
        True, defaults.temperature, defaults.top_k, defaults.top_p, defaults.max_new_tokens)  # fmt: skip
    assert gen.eos_token_id == tok.eot_index == json.loads((folder / "config.json").read_text())["eos_token_id"]
    assert tok.eot_index != 2 and not gen.suppress_tokens  # BPE pads with <|endoftext|>, has no <unk>
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.datasets == ["stanfordnlp/imdb"] and "custom_code" in card.data.tags
    assert card.data.eval_results[1].metric_value == pytest.approx(math.exp(2.5), abs=1e-3)
    for text in ("Steps: 123 ", "rmsnorm, QK-norm", "rotary, context 16", "2.5000 nats/token", "trust_remote_code=True",
                 "## Sample", f"{model.num_parameters():,}", "Byte-level BPE of 300 tokens"):  # fmt: skip
        assert text in card.text, text
    sample = card.text.split("> the movie was ", 1)[1].split("\n", 1)[0]
    assert sample == generate_text(model, tok, "the movie was", defaults, generator=torch.Generator().manual_seed(0))
    hf_tok = AutoTokenizer.from_pretrained(folder)
    assert hf_tok.encode(TEXTS[2], add_special_tokens=False) == tok.encode(TEXTS[2])
    assert word_vocab_of(BpeTokenizer.from_pretrained(folder)) is None  # a BPE stays a BPE on the way back


def test_other_architectures_are_refused_in_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe(TEXTS, 300)
    tok.save_pretrained(tmp_path / "llama")
    config = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="only GPT-2 models and minigpt's own exports .* got model_type 'llama'"):
        convert_from_hf(tmp_path / "llama", tmp_path / "llama.ckpt")
    assert not (tmp_path / "llama.ckpt").exists()


def test_bfloat16_export_keeps_the_adaptive_head_in_float32(word_ckpt, tmp_path):
    folder = convert_to_hf(word_ckpt, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(folder / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if ".adaptive." in k} == {"F32"}
    assert {d for k, d in dtypes.items() if ".h." in k} == {"BF16"}
    hf = load(folder)
    model, _ = load_model(word_ckpt)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        got, expected = hf(idx).logits, model(idx)
    assert got.dtype == torch.float32 and not torch.equal(got, expected)  # the blocks ran in bfloat16
    assert (got - expected).abs().mean() < 0.1 and (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8
    assert hf.generate(idx[:, :4], max_new_tokens=4, do_sample=False).shape == (2, 8)

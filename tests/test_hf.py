"""Hugging Face GPT-2 interop: BPE tokenizer, conversion both ways, generation and scoring parity.

Everything is built here: a byte-level BPE trained on a few sentences and a tiny random GPT-2, saved
as Hugging Face folders under a temporary directory. Nothing touches the network.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict

import pytest
import tokenizers
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

from minigpt.bpe import BpeTokenizer, train_bpe
from minigpt.checkpoint import load_model, new_checkpoint, save_checkpoint
from minigpt.config import GPTConfig
from minigpt.convert import (
    check_gpt2_exportable,
    convert_from_hf,
    convert_to_hf,
    gpt2_config_to_minigpt,
    gpt2_to_minigpt,
    minigpt_to_gpt2,
)
from minigpt.data.samples import flatten
from minigpt.evaluation import evaluate_ids
from minigpt.generation import SamplingConfig, generate, generate_text
from minigpt.hf import (
    _first_line,
    hf_bits_per_character,
    hf_generate,
    hf_generate_text,
    load_hf_gpt2,
    minigpt_bits_per_character,
)
from minigpt.lit_module import LitMiniGPT
from minigpt.model import GPT
from minigpt.tokenizer import Vocab, tokenizer_from_dict

TEXTS = [
    "The movie was great, I loved every minute of it!",
    "A terrible film. Don't watch it, the plot is boring and the actors are bad.",
    "Héllo wörld: naïve café, 😀 and <br /> tags.",
    "It's not very good, but the story is fun.",
] * 5
EOT = "<|endoftext|>"


def _train_bpe() -> tokenizers.Tokenizer:
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1, special_tokens=[EOT], show_progress=False)
    return bpe._tokenizer


def _tiny_gpt2(vocab_size: int, eot: int, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    values = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=vocab_size)
    values.update(overrides)
    config = GPT2Config(bos_token_id=eot, eos_token_id=eot, **values)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger weights than GPT-2's init (std 0.02), so greedy text is not one repeated token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A local Hugging Face GPT-2 folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("hf_gpt2")
    tok = _train_bpe()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)
    fast.save_pretrained(str(folder))
    _tiny_gpt2(tok.get_vocab_size(), tok.token_to_id(EOT)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def hf_pair(hf_dir):
    return load_hf_gpt2(hf_dir)


@pytest.fixture(scope="module")
def converted_ckpt(hf_dir, tmp_path_factory):
    return convert_from_hf(hf_dir, tmp_path_factory.mktemp("ckpt") / "gpt2.ckpt")


def _random_ids(vocab_size: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# -- the BPE tokenizer -------------------------------------------------------------------------------


def test_bpe_tokenizer_interface(hf_dir):
    tok = BpeTokenizer.from_pretrained(hf_dir)
    reference = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    assert tok.kind == "bpe" and len(tok) == 300
    assert tok.eot_index == reference.eos_token_id == tok.tokenizer.token_to_id(EOT)
    assert tok.pad_index == tok.eot_index  # GPT-2 has no pad token
    assert tok.unk_index == -1  # byte-level BPE has no unknown token
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert len(tok.tokenize(text)) == len(ids)
        assert tok.decode(ids) == text  # exact, accents and emoji included
        assert tok.decode(ids, tidy=True) == text
    assert tok.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]
    assert tok.itos[tok.eot_index] == EOT


def test_bpe_tokenizer_travels_in_checkpoints(hf_dir, tmp_path):
    tok = BpeTokenizer.from_pretrained(hf_dir)
    torch.save({"tokenizer": tok.to_dict()}, tmp_path / "t.pt")
    d = torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"]
    again = tokenizer_from_dict(d)
    assert isinstance(again, BpeTokenizer) and again == tok
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    assert isinstance(tokenizer_from_dict(Vocab.build(TEXTS).to_dict()), Vocab)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "sentencepiece"})
    with pytest.raises(ValueError, match="corrupt"):
        BpeTokenizer.from_dict({"kind": "bpe", "tokenizer_json": "{not json"})


def test_bpe_save_pretrained_loads_in_transformers(hf_dir, tmp_path):
    tok = BpeTokenizer.from_pretrained(hf_dir)
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert loaded.encode(TEXTS[2], add_special_tokens=False) == tok.encode(TEXTS[2])
    assert loaded.eos_token == EOT
    assert BpeTokenizer.from_pretrained(tmp_path / "tok") == tok


def test_bpe_from_vocab_and_merges(tmp_path):
    """Older GPT-2 folders have vocab.json + merges.txt and no tokenizer.json."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1, special_tokens=[EOT], show_progress=False)
    bpe.save_model(str(tmp_path))
    GPT2Config(vocab_size=300, n_embd=8, n_layer=1, n_head=2).save_pretrained(str(tmp_path))
    tok = BpeTokenizer.from_pretrained(tmp_path)
    assert tok.eot_index == bpe.token_to_id(EOT)
    assert tok.encode(TEXTS[0]) == bpe.encode(TEXTS[0]).ids
    assert tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]


# -- HF -> minigpt ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": False, "activation_function": "gelu", "n_inner": 48, "layer_norm_epsilon": 1e-6}],
    ids=["gpt2", "untied-gelu-ninner"],
)
def test_gpt2_to_minigpt_logits_match(overrides):
    hf = _tiny_gpt2(300, 0, **overrides)
    if not hf.config.tie_word_embeddings:
        with torch.no_grad():
            hf.lm_head.weight.normal_(std=0.3)  # distinct from wte, so a wrong tie would show
    model = gpt2_to_minigpt(hf)
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_embd, c.n_layer, c.n_head) == (300, 64, 32, 2, 4)
    assert c.norm_first and c.positional == "learned" and not c.scale_embedding and not c.lm_head_bias
    assert c.tie_weights == hf.config.tie_word_embeddings
    assert c.d_ff == (hf.config.n_inner or 128) and c.layer_norm_eps == hf.config.layer_norm_epsilon
    idx = _random_ids(300, (3, 64))
    with torch.no_grad():
        expected = hf(idx).logits
        got = model(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_unsupported_gpt2_options_are_refused():
    for option, message in [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"activation_function": "silu"}, "activation_function 'silu'"),
    ]:
        with pytest.raises(ValueError, match=message):
            gpt2_config_to_minigpt(GPT2Config(**option))
    with pytest.warns(UserWarning, match="one dropout rate"):
        assert gpt2_config_to_minigpt(GPT2Config(resid_pdrop=0.1, attn_pdrop=0.0)).dropout == 0.1


# -- checkpoint files -------------------------------------------------------------------------------


def test_convert_from_hf_checkpoint_round_trip(hf_dir, hf_pair, converted_ckpt, tmp_path):
    ckpt = torch.load(converted_ckpt, weights_only=True)  # plain data only
    assert ckpt["minigpt"]["tokenizer"]["kind"] == "bpe"
    assert set(ckpt["minigpt"]) == {"format", "tokenizer", "data"}  # written by minigpt.checkpoint, nothing extra
    assert ckpt["hyper_parameters"]["config"]["vocab_size"] == 300
    hf_model, _ = hf_pair
    model, tok = load_model(str(converted_ckpt))
    assert isinstance(tok, BpeTokenizer) and tok.eot_index == hf_model.config.eos_token_id
    idx = _random_ids(300, (2, 40), seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, atol=1e-5, rtol=0)
    # The Lightning module loads it too, and starts a fine-tuning run from it.
    lit = LitMiniGPT.load_from_checkpoint(str(converted_ckpt), map_location="cpu")
    assert isinstance(lit.tokenizer, BpeTokenizer)
    finetune = LitMiniGPT(GPTConfig(**ckpt["hyper_parameters"]["config"]), init_from=str(converted_ckpt))
    torch.testing.assert_close(finetune.model.lm_head.weight, model.lm_head.weight)
    assert finetune.tokenizer == tok
    with pytest.raises(ValueError, match="already exists"):
        convert_from_hf(hf_dir, converted_ckpt)


def test_offline_name_gives_one_clear_error_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not a local folder and not in the local Hugging Face cache") as err:
        load_hf_gpt2("gpt2", cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    assert "gpt2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not a local folder .it does not exist"):
        load_hf_gpt2(tmp_path / "no" / "such" / "folder")
    with pytest.raises(ValueError, match="not a local folder"):
        convert_from_hf(tmp_path / "missing", tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_a_library_error_is_never_cut_inside_a_word(tmp_path):
    """A folder whose config.json is not JSON: transformers' long message is shortened to whole sentences."""
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load a Hugging Face causal LM") as err:
        load_hf_gpt2(tmp_path)
    assert "\n" not in str(err.value)
    long = "Weights only load failed. " + "In PyTorch 2.6, the default changed. " * 8 + "Please file an issue."
    short = _first_line(ValueError(long + "\nsecond line"))
    assert long.startswith(short) and short.endswith(".") and 25 <= len(short) <= 200
    assert _first_line(ValueError("x" * 300)) == "x" * 300  # one sentence stays whole, however long
    assert _first_line(ValueError("")) == "ValueError"


# -- minigpt -> HF ----------------------------------------------------------------------------------


def test_convert_to_hf_loads_in_transformers(converted_ckpt, tmp_path):
    out = convert_to_hf(converted_ckpt, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model, tok = load_model(str(converted_ckpt))
    assert hf_tok.encode(TEXTS[2], add_special_tokens=False) == tok.encode(TEXTS[2])
    assert hf_tok.eos_token_id == tok.eot_index == hf.config.eos_token_id
    assert hf_tok.decode(hf_tok.encode(TEXTS[1], add_special_tokens=False)) == TEXTS[1]  # no "clean up"
    assert hf_tok.model_max_length == hf.config.n_positions == 64
    idx = _random_ids(300, (2, 64), seed=2)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not empty"):
        convert_to_hf(converted_ckpt, out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"  # native: no code in the folder
    assert not list(out.glob("*.py"))


def test_gpt2_flavour_built_in_minigpt_exports_exactly():
    """bias=False and sinusoidal positions have exact GPT-2 forms (zero biases, a fixed wpe table)."""
    torch.manual_seed(0)
    for overrides in ({}, {"bias": False, "positional": "sinusoidal", "tie_weights": False, "activation": "relu"}):
        model = GPT(GPTConfig.gpt2(vocab_size=50, block_size=16, n_embd=32, n_layer=2, n_head=4, **overrides)).eval()
        hf = minigpt_to_gpt2(model)
        idx = _random_ids(50, (2, 16), seed=3)
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=0)


def test_trained_bpe_model_exports_and_runs_in_transformers_pipeline(tmp_path):
    # What `--data.tokenizer bpe:N` trains, with a GPT-2-flavour model, exported and used through the
    # Auto classes and `pipeline` the way a Hugging Face user would.
    tok = train_bpe(TEXTS, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig.gpt2(vocab_size=len(tok), block_size=32, n_embd=32, n_layer=2, n_head=4, dropout=0.0))
    save_checkpoint(new_checkpoint(model.eval(), tok), tmp_path / "bpe.ckpt")
    out = convert_to_hf(tmp_path / "bpe.ckpt", tmp_path / "bpe_hf")

    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    prompt = "The movie was"
    ids = hf_tok(prompt)["input_ids"]
    assert ids == tok.encode(prompt)
    assert hf_tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    assert hf_tok.eos_token == EOT and hf_tok.eos_token_id == tok.eot_index
    with torch.no_grad():
        torch.testing.assert_close(
            hf_model(torch.tensor([ids])).logits[0], model(torch.tensor([ids]))[0], atol=1e-5, rtol=0
        )

    sampling = SamplingConfig.greedy(max_new_tokens=8)
    expected = generate_text(model, tok, prompt, sampling)
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tok, device="cpu")
    result = pipe(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)
    assert result[0]["generated_text"] == expected


def test_word_vocab_checkpoint_exports_a_word_level_tokenizer(tmp_path):
    vocab = Vocab.build(TEXTS)
    model = GPT(GPTConfig.gpt2(vocab_size=len(vocab), block_size=16, n_embd=32, n_layer=1, n_head=4)).eval()
    save_checkpoint(new_checkpoint(model, vocab), tmp_path / "word.ckpt")
    out = convert_to_hf(tmp_path / "word.ckpt", tmp_path / "word_hf")
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = 'The MOVIE was great... It\'s <br />not (very) good; "fun": unknownword!'
    assert hf_tok.encode(text, add_special_tokens=False) == vocab.encode(text)
    assert (hf_tok.unk_token_id, hf_tok.pad_token_id, hf_tok.eos_token_id) == (0, 1, 2)
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    assert hf.config.pad_token_id == 1 and hf.config.eos_token_id == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"norm_first": False}, r"post-norm \(norm_first=False\) has no GPT-2 equivalent"),
        ({"head": "adaptive", "tie_weights": False, "adaptive_cutoffs": (20,)}, "adaptive head"),
        ({"lm_head_bias": True}, "no bias"),
        ({"scale_embedding": True}, "sqrt"),
    ],
)
def test_non_gpt2_flavours_refuse_export(overrides, message):
    config = GPTConfig.gpt2(vocab_size=50, block_size=16, n_embd=32, n_layer=1, n_head=4, **overrides)
    with pytest.raises(ValueError, match=message):
        check_gpt2_exportable(config)
    with pytest.raises(ValueError, match="cannot export this model as GPT-2"):
        minigpt_to_gpt2(GPT(config))


def test_seed_checkpoint_exports_as_minigpts_architecture(tmp_path):
    """No GPT-2 equivalent (post-norm, head bias, scaled embeddings): the folder holds minigpt's own architecture."""
    vocab = Vocab.build(TEXTS)
    model = GPT(GPTConfig.seed(vocab_size=len(vocab), block_size=8, n_embd=16, n_head=2, d_ff=32))
    with pytest.raises(ValueError, match="post-norm.*no bias.*sqrt"):
        check_gpt2_exportable(model.config)
    save_checkpoint(new_checkpoint(model, vocab), tmp_path / "seed.ckpt")
    out = convert_to_hf(tmp_path / "seed.ckpt", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == "minigpt"
    assert (out / "modeling_minigpt.py").is_file()


# -- generation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_hf_generate(hf_pair, use_cache):
    hf_model, tok = hf_pair
    model = gpt2_to_minigpt(hf_model)
    prompt = tok.encode("The movie was")
    n_new = 64 - len(prompt)  # up to the full context (HF's generate cannot slide past it)
    expected = hf_model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        generation_config=GenerationConfig(do_sample=False, max_new_tokens=n_new, eos_token_id=None, pad_token_id=0),
    )[0, len(prompt) :].tolist()
    (result,) = generate(model, prompt, SamplingConfig.greedy(n_new), stop_ids=None, use_cache=use_cache)
    assert len(expected) == n_new and len(set(expected)) > 5  # a real sequence, not one repeated token
    assert result.tokens == expected


def test_hf_generate_text_uses_minigpt_sampling(hf_pair):
    hf_model, tok = hf_pair
    model = gpt2_to_minigpt(hf_model)
    # Greedy: the same text as minigpt's converted model, also past the context (the window slides).
    for n in (10, 80):
        greedy = SamplingConfig.greedy(n)
        assert hf_generate_text(hf_model, tok, "It's not", greedy) == generate_text(model, tok, "It's not", greedy)
    greedy = SamplingConfig.greedy(20)
    assert hf_generate_text(hf_model, tok, "It's not", greedy, use_cache=False) == (
        hf_generate_text(hf_model, tok, "It's not", greedy)
    )
    settings = SamplingConfig(max_new_tokens=20, temperature=0.7, top_k=50, top_p=0.95)
    a = hf_generate_text(hf_model, tok, "The movie", settings, generator=torch.Generator().manual_seed(1))
    b = hf_generate_text(hf_model, tok, "The movie", settings, generator=torch.Generator().manual_seed(1))
    c = generate_text(model, tok, "The movie", settings, generator=torch.Generator().manual_seed(1))
    assert a == b == c  # the same loop and sampler: the same draws


@pytest.mark.parametrize("use_cache", [True, False])
def test_hf_generate_batches_left_padded_prompts_like_minigpt(hf_pair, use_cache):
    hf_model, tok = hf_pair
    model = gpt2_to_minigpt(hf_model)
    prompts = [tok.encode("The movie was great"), tok.encode("It"), tok.encode("A terrible film. Don't")]
    greedy = SamplingConfig.greedy(70)  # the longest prompt slides past the 64-token context
    batched = [r.tokens for r in hf_generate(hf_model, prompts, greedy, stop_ids=None, use_cache=use_cache)]
    alone = [hf_generate(hf_model, p, greedy, stop_ids=None)[0].tokens for p in prompts]
    assert batched == alone == [r.tokens for r in generate(model, prompts, greedy, stop_ids=None)]
    assert len({tuple(t) for t in alone}) == 3


# -- special ids come from the tokenizer -----------------------------------------------------------


def _gpt2_like_bpe() -> BpeTokenizer:
    """A byte-level BPE whose end-of-text token is its last id, as in GPT-2 (50256): ids 0, 1, 2 are '!', '"', '#'."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1, show_progress=False)
    bpe.add_special_tokens([EOT])
    return BpeTokenizer(bpe._tokenizer)


def test_bpe_generation_and_evaluation_take_special_ids_from_the_tokenizer():
    tok = _gpt2_like_bpe()
    assert tok.encode('!"#') == [0, 1, 2] and tok.eot_index == len(tok) - 1 == tok.pad_index
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny(vocab_size=len(tok), block_size=16)).eval()
    with torch.no_grad():
        model.lm_head.bias[2] = 100.0  # '#' (minigpt's word-vocabulary <|endoftext|> id) wins every step
    assert generate_text(model, tok, "The movie", SamplingConfig.greedy(5)) == "#####"  # no stop at id 2
    with torch.no_grad():
        model.lm_head.bias[2] = 0.0
        model.lm_head.bias[tok.eot_index] = 100.0  # the tokenizer's own end of text stops at once
    assert generate_text(model, tok, "The movie", SamplingConfig.greedy(5)) == ""
    # Evaluation: every '"' (id 1, minigpt's word-vocabulary <pad>) is scored, and each document is
    # wrapped in the tokenizer's <|endoftext|>.
    texts = ['He said "great"!', '"""', "It's #1"]
    nll = 0.0
    for text in texts:
        s = torch.tensor([[tok.eot_index, *tok.encode(text), tok.eot_index]])
        assert s.size(1) <= 17  # one window of block_size 16
        with torch.no_grad():
            nll -= float(model(s[:, :-1]).log_softmax(-1)[0].gather(1, s[0, 1:, None]).sum())
    ids, offsets = flatten([tok.encode(t) for t in texts])
    assert int((torch.from_numpy(ids) == 1).sum()) >= 5
    chars = sum(map(len, texts))
    by_ids = evaluate_ids(
        model, ids, offsets, chars, unk_index=tok.unk_index, eot_index=tok.eot_index, pad_index=tok.pad_index
    )  # fmt: skip
    by_text = minigpt_bits_per_character(model, tok, texts)
    for r in (asdict(by_ids), by_text):
        assert r["tokens"] == len(ids) + len(texts)
        assert r["bits_per_character"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5)


# -- bits per character -----------------------------------------------------------------------------


def test_hf_bits_per_character_by_hand(hf_pair):
    hf_model, tok = hf_pair
    texts = ["The movie was great.", "It's not very good!"]
    nll = 0.0
    for text in texts:
        s = torch.tensor([[tok.eot_index, *tok.encode(text), tok.eot_index]])
        with torch.no_grad():
            log_probs = hf_model(s).logits.log_softmax(-1)[0, :-1]
        nll -= float(log_probs.gather(1, s[0, 1:, None]).sum())
    r = hf_bits_per_character(hf_model, tok, texts)
    chars = len(texts[0]) + len(texts[1])
    assert r["characters"] == chars and r["documents"] == 2
    assert r["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)
    assert r["bits_per_character"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5)
    assert r["loss"] == pytest.approx(nll / r["tokens"], rel=1e-5)
    assert r["unk_rate"] == 0.0


@pytest.mark.parametrize("block_size, stride", [(None, None), (16, None), (16, 5)])
def test_minigpt_and_hf_bits_per_character_agree(hf_pair, block_size, stride):
    hf_model, tok = hf_pair
    model = gpt2_to_minigpt(hf_model)
    texts = [" ".join(TEXTS[:4]), TEXTS[1], ""]
    a = hf_bits_per_character(hf_model, tok, texts, block_size, stride, batch_size=3)
    b = minigpt_bits_per_character(model, tok, texts, block_size, stride, batch_size=2)
    assert a["tokens"] == b["tokens"] == sum(len(tok.encode(t)) + 1 for t in texts)
    assert a["bits_per_character"] == pytest.approx(b["bits_per_character"], rel=1e-5)


@pytest.mark.parametrize("stride", [None, 3])
def test_minigpt_bits_per_character_equals_evaluate(stride):
    """The windows are those of `minigpt.evaluation` (checked with the word vocab, whose ids it hard-codes)."""
    torch.manual_seed(0)
    vocab = Vocab.from_counter(Counter(w for t in TEXTS[:2] for w in Vocab.build([t]).itos[3:]))  # unk-prone
    model = GPT(GPTConfig.tiny(vocab_size=len(vocab), block_size=8)).eval()
    texts = TEXTS[:4]
    ids, offsets = flatten([vocab.encode(t) for t in texts])
    expected = asdict(
        evaluate_ids(
            model, ids, offsets, sum(map(len, texts)), unk_index=vocab.unk_index, eot_index=vocab.eot_index,
            pad_index=vocab.pad_index, stride=stride,
        )
    )  # fmt: skip
    got = minigpt_bits_per_character(model, vocab, texts, stride=stride)
    for key in ("documents", "characters", "tokens", "unk_rate"):
        assert got[key] == expected[key]
    assert got["unk_rate"] > 0
    for key in ("loss", "bits_per_character"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6)

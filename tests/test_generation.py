"""Tests of minigpt.generation: prompts, one-step sampling, the decoding loop, KV cache and streaming; the
decode head it uses (minigpt.kernels.decode_head), the sampling options `minigpt generate` and `minigpt compare`
build from `SamplingConfig`, and scripts/bench_generate.py.

Models are tiny and randomly initialised (seeded); greedy continuations are checked to be non-constant
where a comparison would otherwise be trivial.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from jsonargparse import ArgumentParser
from script_loader import load_script

from minigpt import cli
from minigpt import tokenizer as tokenizer_module
from minigpt.commands import compare as compare_command
from minigpt.commands import generate as generate_command
from minigpt.config import GPTConfig
from minigpt.errors import UserError
from minigpt.generation import (
    GenerationResult,
    SamplingConfig,
    banned_special_ids,
    check_sampling,
    encode_prompt,
    generate,
    generate_text,
    sample_next,
    stream,
)
from minigpt.kernels import decode_head as heads
from minigpt.kernels.decode_head import PackedHead, decode_head, packed_head
from minigpt.kernels.decode_step import greedy_pick
from minigpt.model import GPT
from minigpt.tokenizer import Vocab

WORDS = ["the", "movie", "was", "great", ".", "it", "'", "s", "a", "film", "bad", "plot", "!", ","]


def make_model(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT (vocab 32, block 16) with seeded random weights.

    The matrices are redrawn from N(0, 0.5^2): with the model's small Xavier init, greedy decoding of an
    untrained model tends to repeat one token, which would make cache/batch comparisons trivial.
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig.tiny(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture
def vocab() -> Vocab:
    return Vocab(list(tokenizer_module.SPECIALS) + WORDS)


def cfg(**kwargs) -> SamplingConfig:
    """A `SamplingConfig` that changes nothing but what is given (plain softmax sampling otherwise)."""
    return SamplingConfig(**{"temperature": 1.0, "top_k": None, "top_p": None, **kwargs})


def greedy(model: GPT, prompts, n: int, **kwargs) -> list[list[int]]:
    kwargs.setdefault("stop_ids", None)
    return [r.tokens for r in generate(model, prompts, SamplingConfig.greedy(n), **kwargs)]


# -- prompts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [None, "", "   ", "\n\t "])
def test_empty_prompt_raises(vocab, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        encode_prompt(vocab, prompt, block_size=8)


def test_prompt_without_tokens_raises(vocab):
    # basic_english drops ';', ':' and '"': nothing is left to continue.
    with pytest.raises(ValueError, match="no tokens"):
        encode_prompt(vocab, ';; : "', block_size=8)


def test_prompt_encodes_without_warning(vocab):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = encode_prompt(vocab, "The movie was great.", block_size=8)
    assert ids == vocab.encode("the movie was great .")


def test_long_prompt_keeps_last_block_size_tokens_and_warns_once(vocab):
    text = "the movie was great . it was a bad film !"
    with pytest.warns(UserWarning, match=r"11 tokens.*block_size=4.*last 4") as record:
        ids = encode_prompt(vocab, text, block_size=4)
    assert len(record) == 1
    assert ids == vocab.encode(text)[-4:]


def test_unknown_words_reported_once_by_name(vocab):
    with pytest.warns(UserWarning, match=r"2 prompt word\(s\).*'zebra', 'quux'") as record:
        ids = encode_prompt(vocab, "the zebra was quux zebra", block_size=8)
    assert len(record) == 1
    assert ids == [vocab.stoi["the"], 0, vocab.stoi["was"], 0, 0]


def test_many_unknown_words_are_truncated_in_the_warning(vocab):
    words = [f"w{i}" for i in range(15)]
    with pytest.warns(UserWarning, match=r"15 prompt word\(s\).*'w9' and 5 more\.$"):
        encode_prompt(vocab, " ".join(words), block_size=32)


# -- one sampling step -------------------------------------------------------------------------------


def draw(logits: torch.Tensor, n: int = 4000, seed: int = 0, prev_ids=None, **kwargs) -> torch.Tensor:
    """n independent draws from one row of scores (the row repeated as a batch)."""
    g = torch.Generator().manual_seed(seed)
    return sample_next(logits.expand(n, -1), cfg(**kwargs), prev_ids=prev_ids, generator=g)


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    expected = logits.argmax(-1)
    assert torch.equal(sample_next(logits, cfg(temperature=0)), expected)
    assert torch.equal(sample_next(logits, cfg(temperature=0, top_k=3, top_p=0.5)), expected)
    assert torch.equal(sample_next(logits, SamplingConfig.greedy()), expected)


def test_top_k_one_is_argmax():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(2))
    assert set(draw(logits, 500, top_k=1).tolist()) == {int(logits.argmax())}


def test_top_k_ties_do_not_let_extra_tokens_through():
    # Every score ties: masking `logits < k-th value` (nanoGPT) would keep all 8 tokens.
    tied = torch.zeros(1, 8)
    assert len(set(draw(tied, top_k=3).tolist())) == 3
    # A tie across the k-th place: 1 winner + 3 tied for the 2 remaining places.
    logits = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])
    seen = set(draw(logits, top_k=3).tolist())
    assert len(seen) == 3 and 0 in seen and seen <= {0, 1, 2, 3}


def test_top_k_and_top_p_draw_vocabulary_ids_from_the_renormalised_survivors():
    # The best scores sit at high ids, so a draw that returned positions among the candidates (0, 1, ...)
    # instead of vocabulary ids would fail; temperature 2 flattens, top-k 3 keeps {7, 9, 8}, top-p 0.6 then
    # keeps the best two of those (their tempered probabilities 0.47 + 0.29 reach 0.6 only together).
    logits = torch.tensor([[0.0, -1.0, 0.5, 0.2, -0.3, 0.1, 0.0, 3.0, 1.6, 2.0]])
    ids = draw(logits, 20000, temperature=2.0, top_k=3, top_p=0.6)
    assert set(ids.tolist()) == {7, 9}
    kept = (logits[0, [7, 9]] / 2.0).softmax(-1)
    assert (ids == 7).float().mean().item() == pytest.approx(kept[0].item(), abs=0.02)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.0625, 0.25, 0.5, 0.125, 0.0625])  # best first: 2, 1, 3, then 0 and 4
    logits = probs.log()[None]
    assert set(draw(logits, top_p=0.4).tolist()) == {2}  # 0.5 alone reaches 0.4
    assert set(draw(logits, top_p=0.7).tolist()) == {2, 1}  # 0.5 < 0.7 <= 0.75
    assert set(draw(logits, top_p=0.8).tolist()) == {2, 1, 3}  # 0.75 < 0.8 <= 0.875
    assert set(draw(logits, top_p=1.0).tolist()) == {0, 1, 2, 3, 4}
    assert set(draw(logits, top_p=1e-9).tolist()) == {2}  # never empty


def test_top_p_renormalises_over_the_kept_tokens():
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    ids = draw(logits, 20000, top_p=0.7)  # keeps {0, 1} or {0, 2}: 2 of the 3 tokens
    counts = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert (counts > 0).sum() == 2
    assert counts[0].item() == pytest.approx(2 / 3, abs=0.02)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    freq = {t: (draw(logits, 20000, temperature=t) == 0).float().mean().item() for t in (0.25, 1.0, 4.0)}
    p1 = torch.softmax(logits, -1)[0, 0].item()
    assert freq[1.0] == pytest.approx(p1, abs=0.02)
    assert freq[0.25] > freq[1.0] + 0.2 > freq[4.0] + 0.2


def test_same_generator_seed_same_draws():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    a = sample_next(logits, cfg(), generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, cfg(), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_repetition_penalty_matches_the_hugging_face_rule():
    logits = torch.tensor([[2.0, 1.5, -1.0, -1.2, 0.0]])
    prev = torch.tensor([[0, 2, 0]])  # token 0 seen twice: penalised once, like HF
    # 2.0 / 2 = 1.0 < 1.5: the seen best token loses its place.
    assert sample_next(logits, cfg(temperature=0, repetition_penalty=2.0), prev_ids=prev).item() == 1
    assert sample_next(logits, cfg(temperature=0, repetition_penalty=1.0), prev_ids=prev).item() == 0
    # Negative scores are multiplied: -1.0 * 2 = -2.0 is now below -1.2.
    only_negative = torch.tensor([[-1.0, -1.2]])
    assert sample_next(only_negative, cfg(temperature=0, repetition_penalty=2.0), prev_ids=torch.tensor([[0]])) == 1
    # The exact distribution: penalised scores, then softmax.
    penalised = torch.tensor([1.0, 1.5, -2.0, -1.2, 0.0])
    ids = draw(logits, 40000, repetition_penalty=2.0, prev_ids=prev.expand(40000, -1))
    freq = torch.bincount(ids, minlength=5).float() / ids.numel()
    assert torch.allclose(freq, penalised.softmax(-1), atol=0.01)


def test_repetition_penalty_below_one_encourages_repeats():
    logits = torch.tensor([[2.0, 1.5]])
    assert sample_next(logits, cfg(temperature=0, repetition_penalty=0.5), prev_ids=torch.tensor([[1]])) == 1


BAD_SAMPLING = [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_k", 0), ("top_k", -3), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", -0.1), ("top_p", 1.01), ("top_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value"), BAD_SAMPLING)
def test_invalid_sampling_values_raise(name, value):
    match = rf"{name} must be .*got {repr(value)[:4]}"
    with pytest.raises(UserError, match=match):
        check_sampling(**{name: value})
    with pytest.raises(UserError, match=match):
        SamplingConfig(**{name: value})  # the one check every entry point goes through


@pytest.mark.parametrize("value", [0, -1, 2.0, True, None])
def test_max_new_tokens_is_checked_by_the_config(value):
    with pytest.raises(UserError, match=rf"max_new_tokens must be an integer >= 1, got {value!r}"):
        SamplingConfig(max_new_tokens=value)


# -- the commands' sampling options come from SamplingConfig -------------------------------------------
BUILT: list[SamplingConfig] = []  # every sampling config the commands built while a test watches


@dataclass(frozen=True)
class SamplingWithMinP(SamplingConfig):
    """`SamplingConfig` with one more field, as a new sampling option would add it."""

    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the best token's."""

    def __post_init__(self) -> None:
        super().__post_init__()
        BUILT.append(self)


def run_command(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and standard output of `minigpt ARGS` (a missing checkpoint ends it after the options)."""
    with pytest.raises(SystemExit) as end:
        cli.main(args)
    return end.value.code, " ".join(capsys.readouterr().out.split())


COMMAND_ARGS = {"generate": ["--prompt", "hi"], "compare": ["--hf_model", "gpt2-folder"]}
COMMANDS = {"generate": (generate_command.generate, {"prompt": ["hi"]}),
            "compare": (compare_command.compare, {"hf_model": "gpt2-folder"})}  # fmt: skip


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_a_new_sampling_field_becomes_an_option_of_both_commands(command, capsys, monkeypatch, tmp_path):
    for module in (generate_command, compare_command):
        monkeypatch.setattr(module, "SamplingConfig", SamplingWithMinP)
    _, help_text = run_command([command, "--help"], capsys)
    doc = "Drop tokens whose probability is below min_p times the best token's. (type: float, default: 0.0)"
    assert f"--min_p MIN_P {doc}" in help_text
    BUILT.clear()
    args = [command, "--ckpt_path", str(tmp_path / "missing.ckpt"), *COMMAND_ARGS[command]]
    code, _ = run_command([*args, "--min_p", "0.05", "--repetition_penalty", "1.3", "--top_k", "null"], capsys)
    assert code == 2 and len(BUILT) == 1  # the options were read, then the missing checkpoint ended the run
    assert (BUILT[0].min_p, BUILT[0].repetition_penalty, BUILT[0].top_k) == (0.05, 1.3, None)


# compare keeps shorter samples at the tutorial's temperature; generate takes SamplingConfig's defaults.
@pytest.mark.parametrize(
    ("command", "defaults"), [("generate", {}), ("compare", dict(max_new_tokens=40, temperature=0.7))]
)
def test_each_command_has_one_option_per_sampling_field_with_its_help(command, defaults, capsys, monkeypatch, tmp_path):
    expected = SamplingConfig(**defaults)
    monkeypatch.setattr(SamplingConfig, "__post_init__", lambda self: BUILT.append(self))
    _, help_text = run_command([command, "--help"], capsys)
    options = {f.name for f in dataclasses.fields(SamplingConfig)}
    shown = {name for name in options if f"--{name} {name.upper()} " in help_text}
    assert shown == options
    for name, doc in (("temperature", "0 picks the argmax (greedy)"), ("repetition_penalty", "Divide positive")):
        assert f"--{name} {name.upper()} {doc}" in help_text
    BUILT.clear()
    run_command([command, "--ckpt_path", str(tmp_path / "missing.ckpt"), *COMMAND_ARGS[command]], capsys)
    assert BUILT == [expected]
    BUILT.clear()
    function, kwargs = COMMANDS[command]
    with pytest.raises(UserError, match="does not exist"):  # called from Python: the same defaults
        function(str(tmp_path / "missing.ckpt"), **kwargs)
    assert BUILT == [expected]
    with pytest.raises(TypeError, match="SamplingConfig has no field"):
        generate_command.add_sampling_arguments(ArgumentParser(), temprature=0.5)


def test_valid_edge_values_are_accepted():
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(4))
    for settings in (
        dict(max_new_tokens=1, temperature=0, top_k=1, top_p=1.0, repetition_penalty=1e-3),
        dict(max_new_tokens=10**6, temperature=100.0, top_k=10**9, top_p=1e-6, repetition_penalty=50),
    ):
        config = SamplingConfig(**settings)
        ids = sample_next(logits, config, prev_ids=torch.tensor([[0], [1]]), generator=torch.Generator())
        assert ids.shape == (2,) and ids.dtype == torch.long and bool(((ids >= 0) & (ids < 40)).all())
    # top_k=1 and the tiny top_p both keep only the best token; the penalty flips nothing here.
    assert torch.equal(sample_next(logits, SamplingConfig(top_k=1)), logits.argmax(-1))
    assert torch.equal(sample_next(logits, cfg(top_p=1e-6)), logits.argmax(-1))


@pytest.mark.parametrize(
    ("prompt_ids", "kwargs", "match"),
    [
        ([], {}, "non-empty list"),
        ([[3, 4], []], {}, "prompt 1 of the batch is empty"),
        ([3, 32], {}, r"32, not a token id .*\[0, 32\)"),
        ([3, -1], {}, "-1, not a token id"),
        ("the movie", {}, "list of token ids"),
        ([3], {"banned_ids": [32]}, r"banned_ids must be some \(not all\) ids in \[0, 32\)"),
        ([3], {"banned_ids": range(32)}, r"banned_ids must be some \(not all\)"),
    ],
)
def test_invalid_loop_arguments_raise(prompt_ids, kwargs, match):
    model = make_model()
    with pytest.raises(UserError, match=match):
        generate(model, prompt_ids, stop_ids=None, **kwargs)
    with pytest.raises(UserError, match=match):
        stream(model, prompt_ids, stop_ids=None, **kwargs)  # at the call, not at the first step


def test_stop_ids_must_be_given():
    # No default stop id: minigpt's word vocabulary and GPT-2's BPE end texts with different ids.
    with pytest.raises(TypeError, match="stop_ids"):
        generate(make_model(), [3, 4], SamplingConfig.greedy(2))


# -- the loop, the KV cache, batches -----------------------------------------------------------------

ARCHITECTURES = {
    "sinusoidal-postnorm": dict(positional="sinusoidal", norm_first=False),
    "learned-postnorm": dict(positional="learned", norm_first=False),
    "sinusoidal-prenorm": dict(positional="sinusoidal", norm_first=True),
    "learned-prenorm-tied-gpt2": dict(
        positional="learned", norm_first=True, tie_weights=True, lm_head_bias=False, activation="gelu_tanh",
        scale_embedding=False,
    ),
    "adaptive-head": dict(head="adaptive", adaptive_cutoffs=(8, 16)),
    "adaptive-input": dict(head="adaptive", adaptive_cutoffs=(8, 16), tie_weights=True),
    "adaptive-input-own-shortlist": dict(
        head="adaptive", adaptive_cutoffs=(8, 16), tie_weights=True, tie_shortlist=False
    ),
    "rotary-bigram": dict(positional="rotary", norm="rmsnorm", norm_first=True, bigram_buckets=40, bigram_dim=8),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_kv_cache_is_identical_to_recompute_past_block_size(arch):
    model = make_model(**ARCHITECTURES[arch])  # block_size 16
    prompt = [5, 9, 3, 12, 7]
    n = 40  # 45 tokens: the window slides for 29 steps
    cached = greedy(model, prompt, n, use_cache=True)[0]
    naive = greedy(model, prompt, n, use_cache=False)[0]
    assert len(cached) == n
    assert len(set(cached)) > 2, f"greedy output too trivial to compare: {cached}"
    assert torch.equal(torch.tensor(cached), torch.tensor(naive))  # atol=0 on ids


@pytest.mark.parametrize(
    "arch", ["sinusoidal-postnorm", "learned-prenorm-tied-gpt2", "adaptive-head", "adaptive-input", "rotary-bigram"]
)
def test_kv_cache_with_prompt_longer_than_block_size(arch):
    model = make_model(**ARCHITECTURES[arch])
    prompt = torch.randint(3, 32, (23,), generator=torch.Generator().manual_seed(5)).tolist()
    cached = greedy(model, prompt, 10, use_cache=True)[0]
    assert cached == greedy(model, prompt, 10, use_cache=False)[0]
    # Only the last block_size prompt tokens matter, as in the tutorial.
    assert cached == greedy(model, prompt[-16:], 10)[0]


@pytest.mark.parametrize("arch", ["sinusoidal-postnorm", "learned-prenorm-tied-gpt2", "adaptive-head", "rotary-bigram"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_prompts_equal_one_at_a_time(arch, use_cache):
    model = make_model(**ARCHITECTURES[arch])
    prompts = [[4], [5, 9, 3, 12, 7, 20, 6], [30, 2, 11], [8, 8, 17, 3, 25, 19, 14, 10, 22, 6, 1, 13]]
    n = 12  # the 12-token prompt passes block_size 16 after 5 steps, the 1-token one never does
    batched = greedy(model, prompts, n, use_cache=use_cache)
    alone = [greedy(model, p, n, use_cache=use_cache)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(t) for t in alone}) == len(prompts)


def test_batched_sampling_is_reproducible_and_rows_differ():
    model = make_model()
    prompts = [[5, 6, 7]] * 4

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [r.tokens for r in generate(model, prompts, cfg(max_new_tokens=15), generator=g, stop_ids=None)]

    a = run(0)
    assert a == run(0)
    assert len({tuple(t) for t in a}) > 1  # the same prompt, independent draws


def test_same_seed_same_text_different_seed_different_text():
    model = make_model()

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, [5, 6, 7], cfg(max_new_tokens=20, **kw), generator=g, stop_ids=None)[0].tokens

    assert run(0) == run(0)
    assert run(0, top_k=5, top_p=0.9, temperature=0.8) == run(0, top_k=5, top_p=0.9, temperature=0.8)
    assert len({tuple(run(seed)) for seed in range(5)}) > 1


def test_stop_id_ends_generation():
    model = make_model(vocab_size=32)
    stop = 2
    with torch.no_grad():
        model.lm_head.bias[stop] = 100.0  # the stop token wins every step
    (result,) = generate(model, [5, 6, 7], SamplingConfig.greedy(10), stop_ids=[stop])
    assert result == GenerationResult(tokens=[], stop_reason="eos")
    (result,) = generate(model, [5, 6, 7], cfg(max_new_tokens=10, temperature=0.7, top_k=5), stop_ids=[stop])
    assert result.stop_reason == "eos" and result.tokens == []
    (result,) = generate(model, [5, 6, 7], SamplingConfig.greedy(10), stop_ids=iter([stop]))  # any iterable
    assert result == GenerationResult(tokens=[], stop_reason="eos")
    (result,) = generate(model, [5, 6, 7], SamplingConfig.greedy(4), stop_ids=None)
    assert result == GenerationResult(tokens=[stop] * 4, stop_reason="length")


@pytest.mark.parametrize("sampling", [SamplingConfig.greedy(12), SamplingConfig(max_new_tokens=12, temperature=2.0)])
def test_banned_ids_are_never_chosen(sampling):
    model = make_model(vocab_size=32)
    with torch.no_grad():
        model.lm_head.bias[[0, 1]] = 100.0  # ids 0 and 1 would win every step
    (free,) = generate(model, [5, 6, 7], sampling, stop_ids=None, generator=torch.Generator().manual_seed(0))
    assert set(free.tokens) <= {0, 1}
    results = generate(
        model, [[5, 6, 7], [8]], sampling, stop_ids=None, banned_ids=[0, 1], generator=torch.Generator()
    )  # fmt: skip
    for result in results:
        assert len(result.tokens) == 12 and not {0, 1} & set(result.tokens)


def test_configurable_stop_ids_end_each_row_at_its_own_step():
    model = make_model()
    prompts = [[5, 9, 3], [30, 2, 11]]
    full = greedy(model, prompts, 20)
    stop = full[0][3]  # a token row 0 produces at step 3
    results = generate(model, prompts, SamplingConfig.greedy(20), stop_ids=[stop])
    for result, tokens in zip(results, full):
        cut = tokens.index(stop) if stop in tokens else len(tokens)
        assert result.tokens == tokens[:cut]
        assert result.stop_reason == ("eos" if stop in tokens else "length")
    assert results[0].stop_reason == "eos" and len(results[0].tokens) <= 3


def test_stream_yields_the_tokens_of_generate_step_by_step():
    model = make_model()
    prompts = [[5, 9, 3], [30, 2, 11, 4]]
    stop = greedy(model, prompts, 20)[1][5]
    steps = list(stream(model, prompts, SamplingConfig.greedy(20), stop_ids=[stop]))
    results = generate(model, prompts, SamplingConfig.greedy(20), stop_ids=[stop])
    for row, result in enumerate(results):
        column = [step[row] for step in steps]
        chosen = [t for t in column if t is not None]
        if result.stop_reason == "eos":
            assert chosen == result.tokens + [stop]  # the stop token is yielded, then only None
        else:
            assert chosen == result.tokens
        assert column[: len(chosen)] == chosen and all(t is None for t in column[len(chosen) :])


def test_stream_is_lazy_and_restores_the_model():
    model = make_model()
    model.train()
    calls = []
    model.transformer.h[0].register_forward_hook(lambda *args: calls.append(1))
    steps = stream(model, [5, 9, 3], SamplingConfig.greedy(5), stop_ids=None)
    assert calls == []
    first = next(steps)
    assert len(calls) == 1 and len(first) == 1 and isinstance(first[0], int)
    assert not model.training  # eval mode while generating
    assert not torch.is_inference_mode_enabled()  # the caller's code between steps is not affected
    assert len(list(steps)) == 4 and len(calls) == 5
    assert model.training  # restored when the stream ends


def test_generate_restores_mode_and_leaves_weights_alone():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    generate(model, [5, 9], SamplingConfig(max_new_tokens=5), stop_ids=[2])
    assert model.training
    model.eval()
    generate(model, [5, 9], SamplingConfig(max_new_tokens=5), stop_ids=[2])
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("vocab_size", "bias"), [(32, True), (33, True), (33, False)])
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_packed_head_equals_the_plain_head(vocab_size, bias, splits):
    model = make_model(vocab_size=vocab_size, lm_head_bias=bias)
    h = torch.randn(3, model.config.n_embd)
    packed = PackedHead(model.lm_head.weight, model.lm_head.bias, splits)
    with torch.inference_mode():
        torch.testing.assert_close(packed(h), model.head_logits(h))
        torch.testing.assert_close(packed(h[:1]), model.head_logits(h[:1]))


def test_packed_head_copy_is_kept_until_the_weights_change():
    model = make_model(vocab_size=33)
    weight, bias = model.lm_head.weight, model.lm_head.bias
    h = torch.randn(1, model.config.n_embd)
    head = decode_head(weight, bias, 1, "packed")
    assert isinstance(head, PackedHead) and packed_head(weight, bias) is head  # kept between generations...
    with torch.no_grad():
        weight.mul_(-2.0)  # ...until the weights change (e.g. an optimizer step)
        bias.add_(1.0)
    head = decode_head(weight, bias, 1, "packed")
    with torch.inference_mode():
        torch.testing.assert_close(head(h), model.head_logits(h))
        assert torch.equal(decode_head(weight, bias, 1, "plain")(h), model.head_logits(h))
    with pytest.raises(UserError, match="head must be 'auto', 'plain' or 'packed', got 'fast'"):
        decode_head(weight, bias, 1, "fast")


@pytest.mark.parametrize("packed_faster", [True, False])
def test_auto_head_takes_the_faster_one_and_keeps_no_unused_copy(monkeypatch, packed_faster):
    # A timer with known durations: the packed head takes 1 s or 3 s a call, the plain one 2 s.
    timings = []

    def fake_seconds(fn, x):
        timings.append(fn)
        return (1.0 if packed_faster else 3.0) if isinstance(fn, PackedHead) else 2.0

    monkeypatch.setattr(heads, "_seconds", fake_seconds)
    heads.reset_decode_heads()
    model = make_model(vocab_size=33)
    weight, bias = model.lm_head.weight, model.lm_head.bias
    head = decode_head(weight, bias, 4, "auto")
    assert isinstance(head, PackedHead) == packed_faster
    assert heads.decode_head_cache_size() == (2 if packed_faster else 1)  # the packed copy only if it is used
    assert len(timings) == 2 * (heads._ROUNDS + 1)
    again = decode_head(weight, bias, 4, "auto")  # measured once per shape and batch size
    assert len(timings) == 2 * (heads._ROUNDS + 1) and isinstance(again, PackedHead) == packed_faster
    h = torch.randn(4, model.config.n_embd)
    with torch.inference_mode():
        torch.testing.assert_close(head(h), model.head_logits(h))
    heads.reset_decode_heads()
    assert heads.decode_head_cache_size() == 0


def test_a_head_that_is_not_linear_runs_as_it_is():
    adaptive = make_model(head="adaptive", adaptive_cutoffs=(8, 16))
    assert heads.plain_only(adaptive.head_logits, "auto") == adaptive.head_logits
    assert heads.plain_only(adaptive.head_logits, "plain") == adaptive.head_logits
    with pytest.raises(UserError, match="packed head needs a linear head"):
        heads.plain_only(adaptive.head_logits, "packed")
    with pytest.raises(UserError, match="packed head needs a linear head"):
        generate(adaptive, [5, 9], SamplingConfig.greedy(3), stop_ids=None, head="packed")
    assert greedy(adaptive, [[5, 9]], 6, head="auto") == greedy(adaptive, [[5, 9]], 6, head="plain")


def test_packed_head_under_bf16_autocast_stays_within_bf16_rounding():
    model = make_model(vocab_size=33)
    h = torch.randn(2, model.config.n_embd)
    packed = PackedHead(model.lm_head.weight, model.lm_head.bias, 2)
    with torch.inference_mode():
        exact = model.head_logits(h)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain, fast = model.head_logits(h), packed(h)
    # bf16 keeps 8 bits of mantissa: each product is off by up to ~2^-8 of its size.
    tolerance = 2**-7 * float(exact.abs().max()) + 1e-3
    torch.testing.assert_close(fast.float(), exact, atol=tolerance, rtol=0)
    torch.testing.assert_close(plain.float(), exact, atol=tolerance, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the whole loop runs under autocast too
        tokens = greedy(model, [[5, 9, 3], [4]], 8, head="packed")
        assert tokens == greedy(model, [[5, 9, 3], [4]], 8, head="plain")
    assert all(len(t) == 8 for t in tokens)


@pytest.mark.parametrize("arch", ["sinusoidal-postnorm", "learned-prenorm-tied-gpt2"])
def test_generation_with_the_packed_head_equals_the_plain_head(arch):
    model = make_model(**ARCHITECTURES[arch])
    prompts = [[5, 9, 3, 12, 7], [4, 8]]
    for batch in (prompts[:1], prompts):
        plain = greedy(model, batch, 25, head="plain")
        assert greedy(model, batch, 25, head="packed") == plain
        assert greedy(model, batch, 25, head="auto") == plain


# -- the decode step: trunk and greedy pick (minigpt.kernels.decode_step) ----------------------------

TRUNKS = ("one_thread", "lean", "lean_one_thread", "auto")  # each held to "plain"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_trunk_generates_what_the_plain_trunk_does(arch):
    model = make_model(**ARCHITECTURES[arch])  # block_size 16
    # One row, past block_size (the window slides for 29 steps), and left-padded rows of three lengths.
    for prompts, n in (([5, 9, 3, 12, 7], 40), ([[4], [5, 9, 3, 12, 7, 20, 6], [30, 2, 11]], 12)):
        plain = greedy(model, prompts, n, trunk="plain")
        assert len({token for row in plain for token in row}) > 3, f"too trivial to compare: {plain}"
        for trunk in TRUNKS:
            assert greedy(model, prompts, n, trunk=trunk) == plain, trunk


def test_every_trunk_samples_what_the_plain_trunk_does():
    # The same scores and the same generator give the same draws.
    model = make_model()
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.2)

    def sample(trunk):
        g = torch.Generator().manual_seed(3)
        return [r.tokens for r in generate(model, [[5, 6, 7], [9]], sampling, generator=g, stop_ids=None,
                                           trunk=trunk)]  # fmt: skip

    plain = sample("plain")
    assert all(sample(trunk) == plain for trunk in TRUNKS)


@pytest.mark.parametrize("pick", ["plain", "chunked"])
def test_the_greedy_pick_gives_the_argmax_tokens(monkeypatch, pick):
    import minigpt.generation as generation

    picks = []

    def forced(logits):
        picks.append(pick)
        return greedy_pick(logits, pick)

    monkeypatch.setattr(generation, "greedy_pick", forced)
    # The best score first, inside, last, and tied (the first one wins), with and without the penalty.
    logits = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    for row, index in enumerate([0, 50, 95]):
        logits[row, index] = 10.0
    logits[3, [70, 20, 90]] = 10.0
    for sampling in (SamplingConfig.greedy(), SamplingConfig(temperature=0, repetition_penalty=1.5)):
        assert sample_next(logits, sampling, prev_ids=torch.tensor([[1]] * 4)).tolist() == [0, 50, 95, 20]
    # A whole generation against a hand-written greedy loop over the full model (96 scores: two chunks).
    model = make_model(vocab_size=96)
    seq = [5, 9, 3]
    with torch.inference_mode():
        for _ in range(30):
            seq.append(int(model(torch.tensor([seq[-16:]]))[0, -1].argmax()))
    picks.clear()
    assert greedy(model, [5, 9, 3], 30) == [seq[3:]] and len(set(seq[3:])) > 2
    assert picks == [pick] * 30


@pytest.mark.parametrize("use_cache", [True, False])
def test_unknown_trunk_is_refused(use_cache):
    with pytest.raises(UserError, match="trunk must be one of .*got 'fast'"):
        generate(make_model(), [5, 9], SamplingConfig.greedy(3), stop_ids=None, trunk="fast", use_cache=use_cache)


# -- text --------------------------------------------------------------------------------------------


def test_generate_text_decodes_tidy_or_raw(vocab):
    model = make_model(vocab_size=len(vocab))
    ids = encode_prompt(vocab, "the movie was", block_size=16)
    (result,) = generate(
        model, ids, SamplingConfig.greedy(12), stop_ids=[vocab.eot_index], banned_ids=banned_special_ids(vocab)
    )  # fmt: skip
    assert result.tokens, "the continuation should not be empty"
    raw = generate_text(model, vocab, "The movie was", SamplingConfig.greedy(12), raw=True)
    tidy = generate_text(model, vocab, "The movie was", SamplingConfig.greedy(12))
    assert raw == vocab.decode(result.tokens)
    assert tidy == vocab.decode(result.tokens, tidy=True)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_text(model, vocab, "  ")


@pytest.mark.parametrize("sampling", [SamplingConfig.greedy(10), SamplingConfig(max_new_tokens=10, temperature=1.5)])
def test_generated_text_has_no_pad_and_unk_only_when_asked(vocab, sampling):
    model = make_model(vocab_size=len(vocab))
    with torch.no_grad():  # a lightly trained model: <unk> and <pad> are the likeliest tokens
        model.lm_head.bias[vocab.unk_index] = 50.0
        model.lm_head.bias[vocab.pad_index] = 60.0
    pad, unk = vocab.itos[vocab.pad_index], vocab.itos[vocab.unk_index]
    text = generate_text(model, vocab, "the movie was", sampling, generator=torch.Generator().manual_seed(0), raw=True)
    assert pad not in text and unk not in text and len(text.split()) == 10
    text = generate_text(model, vocab, "the movie", sampling, generator=torch.Generator(), allow_unk=True, raw=True)
    assert text.split() == [unk] * 10
    assert banned_special_ids(vocab) == (vocab.pad_index, vocab.unk_index)


# -- the benchmark script ----------------------------------------------------------------------------


# Seconds each contender's run takes under the fake timer (the per-token rows take DEFAULT_SECONDS);
# minigpt's run costs what its trunk does.
BENCH_SECONDS = {"tutorial_loop": 2.0, "recompute_last": 1.0, "hf_generate": 0.75, "hf_loop": 0.375}
TRUNK_SECONDS = {"auto": 0.5, "plain": 1.2, "one_thread": 0.6, "lean": 0.75, "lean_one_thread": 0.48}
DEFAULT_SECONDS = 0.25


def test_bench_generate_compares_like_with_like(monkeypatch):
    """Every contender gets the same prompt and makes the same number of tokens of the same function;
    the cold row starts from no packed head and no measurement; the rates and ratios are those of
    the times measured (a fake timer gives each contender a known duration)."""
    bench = load_script("bench_generate")
    for name, value in bench.QUICK.items():
        monkeypatch.setattr(bench, name, value)
    greedy(make_model(), [5, 9], 3)  # measurements made before the benchmark: its cold row must forget them
    spent = [0.0]

    def costing(fn, seconds):
        def run(*args, **kwargs):
            spent[0] += seconds
            return fn(*args, **kwargs)

        return run

    def fake_timed(fn, device):
        spent[0] = 0.0
        fn()
        return spent[0] or DEFAULT_SECONDS

    def minigpt_costing(fn):
        def run(*args, trunk="auto"):
            spent[0] += TRUNK_SECONDS[trunk]
            return fn(*args, trunk=trunk)

        return run

    for name, seconds in BENCH_SECONDS.items():
        monkeypatch.setattr(bench, name, costing(getattr(bench, name), seconds))
    monkeypatch.setattr(bench, "minigpt_generate", minigpt_costing(bench.minigpt_generate))
    monkeypatch.setattr(bench, "timed", fake_timed)
    n = 6
    r = bench.bench(n, repeats=3, device=torch.device("cpu"), batches=(3,))
    mine = n / TRUNK_SECONDS["auto"]
    assert r["minigpt_tok_s"] == mine == r["minigpt_cold_tok_s"]
    for trunk in ("plain", "one_thread", "lean", "lean_one_thread"):  # a row per trunk, each its own run
        assert r[f"trunk_{trunk}_tok_s"] == n / TRUNK_SECONDS[trunk]
    assert r["plain_of_bound"] == 0.208  # (6 / 1.2) / (6 / 0.25): the plain trunk's row over the bound's
    assert r["tutorial_loop_tok_s"] == n / BENCH_SECONDS["tutorial_loop"]
    assert r["hf_generate_tok_s"] == n / BENCH_SECONDS["hf_generate"]
    assert r["hf_loop_tok_s"] == n / BENCH_SECONDS["hf_loop"]
    assert r["bandwidth_bound_tok_s"] == n / DEFAULT_SECONDS  # n reads of W in one timed call
    assert r["vs_tutorial"] == 4.0 and r["vs_hf"] == 1.5 and r["of_bound"] == 0.5
    assert r["minigpt_batch3_tok_s"] == 3 * n / TRUNK_SECONDS["auto"] == 36.0
    assert r["hf_batch3_tok_s"] == 3 * n / BENCH_SECONDS["hf_generate"] == 24.0
    singles = {name: run for name, run in r["runs"].items() if len(run["prompts"]) == 1}
    assert len(singles) == 10  # nine contenders (minigpt's "auto" and four trunks) and the cold call
    assert len({tuple(run["prompts"][0]) for run in singles.values()}) == 1
    assert all(run["new_tokens"] == [n] for run in singles.values())
    assert bench.agreement(r["runs"]) == dict.fromkeys(singles, 1.0)  # one function: the same greedy text
    batch = [run for name, run in r["runs"].items() if name.endswith("batch 3")]
    assert len(batch) == 2 and batch[0]["prompts"] == batch[1]["prompts"] and len(batch[0]["prompts"]) == 3
    assert all(run["new_tokens"] == [n] * 3 for run in batch)
    # The packed copy and the head, trunk and greedy-pick measurements were made in the timed call.
    (heads_before, steps_before), (heads_after, steps_after) = r["cold_cache"]
    assert heads_before == steps_before == 0 < heads_after and steps_after == 2
    assert r["trunk"] in ("plain", "one_thread", "lean", "lean_one_thread") and r["pick"] in ("plain", "chunked")

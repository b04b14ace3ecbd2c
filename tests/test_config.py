import dataclasses

import pytest

from minigpt.config import GPTConfig


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            dict(vocab_size=0),
            r"vocab_size must be an integer >= 1, got 0\. It comes from the data's vocabulary",
        ),
        (dict(vocab_size=-3), r"vocab_size must be an integer >= 1, got -3"),
        (dict(block_size=0), r"block_size must be an integer >= 1, got 0"),
        (dict(n_embd=0), r"n_embd must be an integer >= 1, got 0"),
        (dict(n_layer=0), r"n_layer must be an integer >= 1, got 0"),
        (dict(n_head=0), r"n_head must be an integer >= 1, got 0"),
        (dict(d_ff=0), r"d_ff must be an integer >= 1, got 0"),
        (dict(n_layer=2.5), r"n_layer must be an integer >= 1, got 2\.5"),
        (dict(n_layer=True), r"n_layer must be an integer >= 1, got True"),
        (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be divisible by n_head \(4\)"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1\.0"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\), got -0\.1"),
        (dict(bigram_dropout=1.0), r"bigram_dropout must be in \[0, 1\), got 1\.0"),
        (dict(layer_norm_eps=0.0), r"layer_norm_eps must be > 0, got 0\.0"),
        (dict(bigram_buckets=-1), r"bigram_buckets must be an integer >= 0 \(0: none\), got -1"),
        (dict(bigram_buckets=2.5), r"bigram_buckets must be an integer >= 0 \(0: none\), got 2\.5"),
        (dict(bigram_buckets=64, bigram_dim=0), r"bigram_dim must be an integer >= 1, got 0"),
        (dict(positional="alibi"), r"positional must be one of \('sinusoidal', 'learned', 'rotary'\), got 'alibi'"),
        (dict(activation="swish"), r"activation must be one of \('relu', 'gelu', 'gelu_tanh', 'relu2', 'swiglu'\)"),
        (dict(norm="batchnorm"), r"norm must be one of \('layernorm', 'rmsnorm'\), got 'batchnorm'"),
        (dict(positional="rotary", n_embd=30, n_head=2), r"n_embd // n_head must be even, got 15"),
        (dict(positional="rotary", rope_base=1.0), r"rope_base must be > 1, got 1.0"),
        (dict(head="softmax"), r"head must be one of \('linear', 'adaptive'\), got 'softmax'"),
        (dict(adaptive_cutoffs=(8, 4)), r"adaptive_cutoffs must be strictly increasing, got \(8, 4\)"),
        (dict(adaptive_cutoffs=(4, 4)), r"adaptive_cutoffs must be strictly increasing"),
        (dict(adaptive_cutoffs=(0, 4)), r"adaptive_cutoffs must be a non-empty sequence of integers >= 1"),
        (dict(adaptive_cutoffs=()), r"adaptive_cutoffs must be a non-empty sequence of integers >= 1"),
        (dict(adaptive_cutoffs="8,16"), r"adaptive_cutoffs must be a sequence of integers, got '8,16'"),
        (dict(adaptive_div_value=0.0), r"adaptive_div_value must be > 0, got 0\.0"),
        (
            dict(tie_shortlist=False, tie_weights=True),
            r"tie_shortlist=False .* needs head='adaptive' and tie_weights=True, got head='linear', tie_weights=True",
        ),
        (
            dict(tie_shortlist=False, head="adaptive", adaptive_cutoffs=(8,)),
            r"needs head='adaptive' and tie_weights=True, got head='adaptive', tie_weights=False",
        ),
        (
            dict(head="adaptive", adaptive_cutoffs=(2000, 10000)),
            r"head='adaptive' needs at least one adaptive cutoff below vocab_size=32, "
            r"got adaptive_cutoffs=\(2000, 10000\)",
        ),
        (
            dict(head="adaptive", adaptive_cutoffs=(8, 16), adaptive_div_value=8.0),
            r"adaptive tail cluster 2 would have width n_embd // div_value\*\*2 = 0",
        ),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig.tiny(**overrides)


def test_default_config_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig()
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig.seed()


def test_seed_preset_is_the_tutorial_model():
    config = GPTConfig.seed(vocab_size=1000)
    assert (config.vocab_size, config.block_size) == (1000, 30)
    assert (config.n_embd, config.n_layer, config.n_head, config.d_ff, config.dropout) == (
        200,
        2,
        2,
        2048,
        0.2,
    )
    assert config.positional == "sinusoidal" and config.activation == "relu" and config.head == "linear"
    assert not config.norm_first and config.scale_embedding and not config.tie_weights
    assert config.bias and config.lm_head_bias
    assert config.head_size == 100
    # The dataclass defaults are the seed model too, so a config file only states what differs.
    assert GPTConfig(vocab_size=1000) == config
    assert GPTConfig.seed(vocab_size=10, block_size=64, dropout=0.0).dropout == 0.0


def test_tiny_preset():
    config = GPTConfig.tiny()
    assert (config.vocab_size, config.block_size, config.n_embd, config.n_layer, config.n_head) == (
        32,
        16,
        32,
        2,
        4,
    )
    assert (config.d_ff, config.dropout, config.head_size) == (64, 0.0, 8)
    assert GPTConfig.tiny(n_layer=1).n_layer == 1


def test_gpt2_preset_matches_transformers_gpt2_config():
    from transformers import GPT2Config, GPT2LMHeadModel

    hf, config = GPT2Config(), GPTConfig.gpt2()
    # Field by field against Hugging Face's defaults (GPT-2 small).
    assert config.vocab_size == hf.vocab_size
    assert config.block_size == hf.n_positions
    assert config.n_embd == hf.n_embd and config.n_layer == hf.n_layer and config.n_head == hf.n_head
    assert config.d_ff == (hf.n_inner or 4 * hf.n_embd)
    assert config.activation == {"gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu"}[hf.activation_function]
    assert config.dropout == hf.resid_pdrop == hf.embd_pdrop == hf.attn_pdrop
    assert config.layer_norm_eps == hf.layer_norm_epsilon
    assert config.tie_weights == hf.tie_word_embeddings
    # What GPT2LMHeadModel builds rather than configures: learned positions, pre-norm with a final ln_f,
    # biases in every Linear/LayerNorm but none on the head, unscaled embeddings.
    tiny_hf = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=8))
    names = dict(tiny_hf.named_parameters())
    assert config.positional == "learned" and "transformer.wpe.weight" in names
    assert config.norm_first and "transformer.ln_f.weight" in names
    assert config.bias and "transformer.h.0.attn.c_attn.bias" in names and "transformer.h.0.ln_1.bias" in names
    assert not config.lm_head_bias and tiny_hf.lm_head.bias is None
    assert not config.scale_embedding and config.head == "linear"
    small = GPTConfig.gpt2(vocab_size=100, block_size=8, n_embd=16, n_layer=1, n_head=2)
    assert small.d_ff == 64
    assert GPTConfig.gpt2(n_embd=16, n_head=2, d_ff=20).d_ff == 20


def test_asdict_round_trip_accepts_lists():
    config = GPTConfig.tiny(head="adaptive", adaptive_cutoffs=(8, 16), positional="learned")
    data = dataclasses.asdict(config)
    assert GPTConfig(**data) == config
    # YAML/JSON give lists back.
    data["adaptive_cutoffs"] = [8, 16]
    restored = GPTConfig(**data)
    assert restored == config and restored.adaptive_cutoffs == (8, 16)


def test_adaptive_cutoffs_are_clipped_to_the_vocabulary():
    config = GPTConfig.tiny(vocab_size=5000, head="adaptive", adaptive_cutoffs=(2000, 10000))
    assert config.adaptive_cutoffs == (2000, 10000)  # stored as given
    assert config.adaptive_cutoffs_used == (2000,)
    assert GPTConfig.tiny(vocab_size=20000, head="adaptive").adaptive_cutoffs_used == (2000, 10000)

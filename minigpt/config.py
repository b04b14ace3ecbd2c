"""Architecture hyper-parameters of minigpt's GPT, in one validated dataclass.

`GPTConfig` is the only place where the model's sizes and switches are written. The defaults are the
"seed" model of the PyTorch word-language-model tutorial that minigpt started from (a causal
`nn.TransformerEncoder`); `GPTConfig.gpt2()` gives the flavour of Hugging Face's `GPT2LMHeadModel`.

References: nanoGPT `model.py` (`GPTConfig`) and litgpt `litgpt/config.py` (`Config.__post_init__`).
"""

from dataclasses import dataclass
from typing import Any, Literal, get_args

Positional = Literal["sinusoidal", "learned", "rotary"]
Activation = Literal["relu", "gelu", "gelu_tanh", "relu2", "swiglu"]
Norm = Literal["layernorm", "rmsnorm"]
Head = Literal["linear", "adaptive"]


@dataclass
class GPTConfig:
    """Hyper-parameters of a GPT-style causal language model.

    The defaults reproduce the tutorial's model except `vocab_size`, which has to come from the
    vocabulary of the data (the CLI links it from the data module when it builds the model).
    """

    # Sizes
    vocab_size: int = 0
    """Number of token ids. 0 means "not set yet"; it must be set (from the data's vocabulary) before use."""
    block_size: int = 30
    """Longest context the model reads, in tokens (size of the position table and of the KV cache)."""
    n_embd: int = 200
    n_layer: int = 2
    n_head: int = 2
    d_ff: int = 2048
    """Hidden width of the feed-forward block; 2048 is `nn.TransformerEncoderLayer`'s default."""

    # Regularisation
    dropout: float = 0.2
    """Drop rate after the embeddings, on attention probabilities, in the MLP and on residual branches."""

    # Transformer block
    positional: Positional = "sinusoidal"
    """"sinusoidal": the tutorial's fixed encoding added to the embeddings (no parameters); "learned": a GPT-2
    style `wpe` table; "rotary": no position is added, queries and keys are rotated by their position
    (RoFormer, Su et al. 2021; the half-split layout of GPT-NeoX and LLaMA in transformers)."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies (only with positional="rotary")."""
    norm_first: bool = False
    """False: post-norm like `nn.TransformerEncoderLayer` (the tutorial). True: pre-norm like GPT-2,
    which also adds a final LayerNorm `ln_f` before the head."""
    activation: Activation = "relu"
    """"gelu_tanh" is GPT-2's tanh approximation of GELU ("gelu_new" in transformers); "relu2" is ReLU
    squared (So et al. 2021, modded-nanogpt); "swiglu" gates SiLU with a second projection (Shazeer 2020),
    so `c_fc` is twice `d_ff` wide."""
    norm: Norm = "layernorm"
    """"layernorm": `nn.LayerNorm` (the tutorial, GPT-2); "rmsnorm": `nn.RMSNorm` (no centring, no bias)."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys (with a learned gain) before attention (Henry et al. 2020),
    which bounds the attention logits."""
    zero_init_proj: bool = False
    """Start the attention and MLP output projections at zero, so every block begins as the identity on
    the residual stream (modded-nanogpt); False keeps the tutorial's Xavier-uniform init."""
    scale_embedding: bool = True
    """Multiply token embeddings by sqrt(n_embd), as the tutorial (and "Attention Is All You Need") does."""
    bias: bool = True
    """Biases in the attention/MLP linear layers and the LayerNorms."""
    layer_norm_eps: float = 1e-5

    # Input
    bigram_buckets: int = 0
    """Rows of a hashed bigram embedding; 0: none (the tutorial). Each token also reads row `bigram_bucket(previous
    token, token)` of a (bigram_buckets, bigram_dim) table, projected to `n_embd` by a matrix that starts at zero
    and added to its embedding: a word pair gets a vector of its own for the cost of a lookup (the hashed n-gram
    input embeddings of Huang et al. 2025, "Over-Tokenized Transformer"). A window's first token has no previous
    token (nor has a token after a pad): it reads the row of (none, token)."""
    bigram_dim: int = 64
    """Width of the bigram table's rows (only with bigram_buckets > 0)."""
    bigram_dropout: float = 0.0
    """Dropout on the bigram rows read in training (only with bigram_buckets > 0): each row sees only the pairs
    that hash to it, so over several passes it learns the training text's continuations by heart."""

    # Output head
    head: Head = "linear"
    """"linear": a full `lm_head` over the vocabulary. "adaptive": `nn.AdaptiveLogSoftmaxWithLoss`
    (Grave et al. 2017), exact normalised probabilities at a fraction of the cost for large vocabularies."""
    tie_weights: bool = False
    """Share the input embedding with the output head. With the linear head, `wte` is `lm_head`'s matrix.
    With the adaptive head, the input embedding becomes adaptive (Baevski & Auli 2019) and owns no weights:
    a shortlist token's vector is its row of the head, a tail token's is its row of its cluster's output
    matrix projected back to `n_embd` through the cluster's projection, so rare words get narrow vectors
    that learn from both ends of the model."""
    tie_shortlist: bool = True
    """With the tied adaptive input (`tie_weights` and the adaptive head): whether the shortlist's words (the
    head's first `adaptive_cutoffs[0]` classes, the most frequent) read their input vectors from the head's rows.
    False gives them an input table of their own (`transformer.shortlist`, starting as a copy of those rows),
    so a frequent word's vector as an input and as an output can differ; the tail clusters stay tied."""
    lm_head_bias: bool = True
    """Bias on the output layer: the tutorial's `nn.Linear` head has one, GPT-2's head does not."""
    adaptive_cutoffs: tuple[int, ...] = (2000, 10000)
    """Cluster boundaries of the adaptive head (ids are frequency-ordered, frequent first). Cutoffs at or
    above `vocab_size` are dropped (see `adaptive_cutoffs_used`), so one recipe works for any vocabulary."""
    adaptive_div_value: float = 4.0
    """Each tail cluster projects to a width `div_value` times smaller than the previous one."""

    def __post_init__(self) -> None:
        if not _is_int(self.vocab_size) or self.vocab_size < 1:
            raise ValueError(
                f"vocab_size must be an integer >= 1, got {self.vocab_size!r}. It comes from the data's "
                "vocabulary: the CLI links it from the data module; when building a config by hand, pass "
                "vocab_size=len(vocab)."
            )
        for name in ("block_size", "n_embd", "n_layer", "n_head", "d_ff"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): each head gets "
                f"n_embd // n_head features. Pick n_head among the divisors of {self.n_embd}."
            )
        if not _is_int(self.bigram_buckets) or self.bigram_buckets < 0:
            raise ValueError(f"bigram_buckets must be an integer >= 0 (0: none), got {self.bigram_buckets!r}.")
        if not _is_int(self.bigram_dim) or self.bigram_dim < 1:
            raise ValueError(f"bigram_dim must be an integer >= 1, got {self.bigram_dim!r}.")
        for name in ("dropout", "bigram_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}.")
        _check_literal("positional", self.positional, Positional)
        _check_literal("activation", self.activation, Activation)
        _check_literal("head", self.head, Head)
        _check_literal("norm", self.norm, Norm)
        if not self.tie_shortlist and not (self.tie_weights and self.head == "adaptive"):
            raise ValueError(
                f"tie_shortlist=False gives the tied adaptive input's shortlist a table of its own, so it needs "
                f"head='adaptive' and tie_weights=True, got head={self.head!r}, tie_weights={self.tie_weights!r}."
            )
        if self.positional == "rotary" and self.head_size % 2:
            raise ValueError(
                f"positional='rotary' rotates pairs of features, so n_embd // n_head must be even, got "
                f"{self.head_size} (n_embd={self.n_embd}, n_head={self.n_head})."
            )
        if not self.rope_base > 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base!r}.")
        self._check_adaptive()

    def _check_adaptive(self) -> None:
        # YAML/JSON and dataclasses.asdict round trips may hand us a list; store a tuple either way.
        cutoffs = self.adaptive_cutoffs
        if isinstance(cutoffs, (str, bytes)) or not hasattr(cutoffs, "__iter__"):
            raise ValueError(f"adaptive_cutoffs must be a sequence of integers, got {cutoffs!r}.")
        self.adaptive_cutoffs = tuple(cutoffs)
        if not self.adaptive_cutoffs or not all(_is_int(c) and c >= 1 for c in self.adaptive_cutoffs):
            raise ValueError(f"adaptive_cutoffs must be a non-empty sequence of integers >= 1, got {cutoffs!r}.")
        if any(a >= b for a, b in zip(self.adaptive_cutoffs, self.adaptive_cutoffs[1:])):
            raise ValueError(f"adaptive_cutoffs must be strictly increasing, got {cutoffs!r}.")
        if not self.adaptive_div_value > 0:
            raise ValueError(f"adaptive_div_value must be > 0, got {self.adaptive_div_value!r}.")
        if self.head != "adaptive":
            return
        used = self.adaptive_cutoffs_used
        if not used:
            raise ValueError(
                f"head='adaptive' needs at least one adaptive cutoff below vocab_size={self.vocab_size}, "
                f"got adaptive_cutoffs={self.adaptive_cutoffs}. Use smaller cutoffs for this small "
                "vocabulary, or head='linear'."
            )
        for i in range(len(used)):
            # Same width rule as nn.AdaptiveLogSoftmaxWithLoss; a width of 0 would be an empty projection.
            width = int(self.n_embd // (self.adaptive_div_value ** (i + 1)))
            if width < 1:
                raise ValueError(
                    f"adaptive tail cluster {i + 1} would have width n_embd // div_value**{i + 1} = {width} "
                    f"(n_embd={self.n_embd}, adaptive_div_value={self.adaptive_div_value}). Use a smaller "
                    "adaptive_div_value or fewer cutoffs."
                )

    # Derived values

    @property
    def head_size(self) -> int:
        """Features per attention head."""
        return self.n_embd // self.n_head

    @property
    def adaptive_cutoffs_used(self) -> tuple[int, ...]:
        """The adaptive cutoffs that fit the vocabulary (those below `vocab_size`)."""
        return tuple(c for c in self.adaptive_cutoffs if c < self.vocab_size)

    # Presets

    @classmethod
    def seed(cls, vocab_size: int = 0, block_size: int = 30, **overrides: Any) -> "GPTConfig":
        """The tutorial's model: width 200, 2 post-norm layers of 2 heads, ReLU MLP of 2048, dropout 0.2,
        sinusoidal positions, embeddings scaled by sqrt(200), untied linear head.

        Args:
            vocab_size: Size of the vocabulary (required in practice; 0 is rejected).
            block_size: Context length.
            **overrides: Any other `GPTConfig` field.
        """
        values: dict[str, Any] = dict(
            n_embd=200, n_layer=2, n_head=2, d_ff=2048, dropout=0.2, positional="sinusoidal",
            norm_first=False, activation="relu", scale_embedding=True, tie_weights=False, bias=True,
            lm_head_bias=True, head="linear",
        )  # fmt: skip
        values.update(overrides)
        return cls(vocab_size=vocab_size, block_size=block_size, **values)

    @classmethod
    def tiny(cls, **overrides: Any) -> "GPTConfig":
        """A model small enough for unit tests on CPU (vocab 32, block 16, width 32, 2 layers of 4 heads)."""
        values: dict[str, Any] = dict(
            vocab_size=32, block_size=16, n_embd=32, n_layer=2, n_head=4, d_ff=64, dropout=0.0
        )  # fmt: skip
        values.update(overrides)
        return cls(**values)

    @classmethod
    def gpt2(
        cls,
        vocab_size: int = 50257,
        block_size: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        **overrides: Any,
    ) -> "GPTConfig":
        """The architecture of Hugging Face's `GPT2LMHeadModel` (the defaults are GPT-2 small): pre-norm
        with a final `ln_f`, tanh-GELU, learned positions, d_ff = 4 x n_embd, head tied to the token
        embedding and without bias, no embedding scaling, dropout 0.1.

        Args:
            vocab_size: Size of the vocabulary.
            block_size: Context length (GPT-2's `n_positions`).
            n_embd: Width.
            n_layer: Number of blocks.
            n_head: Number of attention heads.
            **overrides: Any other `GPTConfig` field.
        """
        values: dict[str, Any] = dict(
            d_ff=4 * n_embd, dropout=0.1, positional="learned", norm_first=True, activation="gelu_tanh",
            scale_embedding=False, tie_weights=True, bias=True, lm_head_bias=False, layer_norm_eps=1e-5,
            head="linear",
        )  # fmt: skip
        values.update(overrides)
        return cls(
            vocab_size=vocab_size, block_size=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            **values,
        )  # fmt: skip


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `n_layer=True` is a mistake, not a size.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_literal(name: str, value: object, choices: object) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")

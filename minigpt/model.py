"""A GPT-style causal language model in pure PyTorch (no Lightning), with a KV cache for generation.

One module covers the flavours `GPTConfig` chooses between:

- the PyTorch tutorial's "causal encoder" (`GPTConfig.seed`): scaled token embedding + sinusoidal
  positions, post-norm blocks computing exactly what `nn.TransformerEncoderLayer(norm_first=False)`
  computes, and a linear head reading the encoder output (the tutorial's head read the embeddings);
- GPT-2 (`GPTConfig.gpt2`): learned positions, pre-norm blocks, a final `ln_f` and a tied head;
- the modern block's options: RMSNorm, rotary positions, ReLU² or SwiGLU, QK-norm, zero-initialised
  output projections, no biases, and an adaptive softmax whose clusters also embed the input;
- hashed bigram embeddings beside the token embedding (`bigram_buckets`).

Module names follow nanoGPT/GPT-2 (`transformer.wte`, `transformer.h[i].attn.c_attn`, `lm_head`) so
GPT-2 weights map across; `c_attn` rows are [q; k; v], the layout of `nn.MultiheadAttention.in_proj_weight`.
The linear head's training loss is plain `F.cross_entropy` over chunks of the head; an optional fused kernel
lives in `minigpt.kernels.loss` (`GPT.loss_kernel`). The adaptive head's is `adaptive_nll` (`RowNLL` where
the model is compiled). Caches live in `minigpt.cache`.

References: karpathy/nanoGPT `model.py`, Lightning-AI/litgpt `litgpt/model.py` (`chunked_cross_entropy`),
the PyTorch tutorial "Language Modeling with nn.Transformer", and Grave et al. 2017 (adaptive softmax).
"""

import functools
import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minigpt.cache import Cache, KVCache, attention_mask
from minigpt.config import GPTConfig
from minigpt.kernels.loss import Workspace, fused_linear_nll_sum

LossKernel = Literal["auto", "plain", "fused"]

# The plain loss evaluates the head on chunks of rows holding at most this many logits, so the full
# (B*T, vocab_size) logits and their log-softmax never exist as one temporary: 64 MiB of float32 on a CPU;
# 1 GiB on an accelerator, where every chunk costs kernel launches that smaller chunks leave it waiting on
# (scripts/bench_train.py on a GPU).
PLAIN_CHUNK_ELEMENTS = 2**24
ACCELERATOR_PLAIN_CHUNK_ELEMENTS = 2**28


def plain_chunk_rows(device: torch.device | str, classes: int) -> int:
    """The plain loss's default number of rows per chunk of a head with `classes` outputs on `device`."""
    elements = PLAIN_CHUNK_ELEMENTS if torch.device(device).type == "cpu" else ACCELERATOR_PLAIN_CHUNK_ELEMENTS
    return max(1, elements // classes)


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of (B, T, V) scores against (B, T) targets, the plain reference (NaN when no
    target counts, like `F.cross_entropy`)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


def chunked_nll_sum(
    hidden: Tensor, head: nn.Linear, targets: Tensor, ignore_index: int = -100, chunk_size: int | None = None
) -> Tensor:
    """Summed cross-entropy (float32 scalar) of `head(hidden)` (N, C) against `targets` (N,), a chunk of at
    most `chunk_size` rows at a time, with plain autograd (as litgpt's `chunked_cross_entropy`)."""
    if chunk_size is None:
        chunk_size = plain_chunk_rows(hidden.device, head.out_features)
    nll_sum = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        nll_sum = nll_sum + F.cross_entropy(head(h).float(), t, ignore_index=ignore_index, reduction="sum")
    return nll_sum


def previous_tokens(idx: Tensor, previous: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
    """(B, T) the token before each token of `idx` (B, T), -1 where there is none.

    The first column's is `previous` (B,) when given (the last token a cache holds; -1 for none), else none;
    a token after a pad has none either, so a left-padded prompt reads what it reads alone.
    """
    first = idx.new_full((idx.size(0), 1), -1) if previous is None else previous.view(-1, 1).to(idx.dtype)
    before = torch.cat([first, idx[:, :-1]], dim=1)
    if key_padding_mask is not None:
        before = before.masked_fill(F.pad(key_padding_mask[:, :-1], (1, 0), value=False), -1)
    return before


def bigram_bucket(previous: Tensor, idx: Tensor, buckets: int) -> Tensor:
    """The row of the hashed bigram table of each (previous token, token) pair (-1: no previous token).

    A fixed hash (two primes, exact in int64 for any vocabulary below 10^12), so the rows mean the same
    wherever the model runs; distinct pairs may share a row, as in any hashed embedding.
    """
    return ((previous + 1) * 1_000_003 + idx * 999_983) % buckets


def _continues(slots: Tensor) -> bool:
    """Whether any row's first new slot ((T,) slots for every row, or (B, 1)) comes after cached tokens."""
    return bool((slots.reshape(-1, slots.size(-1))[:, 0] > 0).any())


def _float32(x: Tensor) -> torch.autocast:
    """Autocast off on `x`'s device: `nn.AdaptiveLogSoftmaxWithLoss` writes each cluster's result into a
    tensor of its input's dtype, which fails when autocast computes the clusters in bfloat16, and its
    log-softmax over the clusters is better in float32 anyway."""
    return torch.autocast(x.device.type, enabled=False)


def adaptive_input_embedding(
    idx: Tensor, adaptive: nn.AdaptiveLogSoftmaxWithLoss, shortlist: Tensor | None = None
) -> Tensor:
    """Adaptive input embeddings (Baevski & Auli 2019) tied with the adaptive softmax: (...) ids -> (..., C).

    A shortlist token's vector is its row of the head's weight, or of `shortlist` (shortlist_size, C) when
    given (`GPTConfig.tie_shortlist` False). A token of tail cluster i is its row of the cluster's output
    matrix (width C / div_value**(i+1)), mapped back to width C by the transpose of the cluster's projection.
    Every cluster is computed at every position and masked, which costs little at these widths and needs no
    host synchronisation (unlike selecting each cluster's rows).
    """
    short = adaptive.shortlist_size
    inside = (idx < short).unsqueeze(-1)
    table = adaptive.head.weight[:short] if shortlist is None else shortlist
    x = F.embedding(idx.clamp(max=short - 1), table) * inside
    for lo, hi, (projection, output) in zip(adaptive.cutoffs, adaptive.cutoffs[1:], adaptive.tail):
        inside = ((idx >= lo) & (idx < hi)).unsqueeze(-1)
        rows = F.embedding((idx - lo).clamp(0, hi - lo - 1), output.weight) * inside  # (..., width)
        x = x + rows @ projection.weight  # projection.weight: (width, C)
    return x


def _nll_forward(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) float32 negative log-likelihood of each row's target under log_softmax(logits (N, K)), and each
    row's log-sum-exp (what the backward pass needs instead of the (N, K) log-probabilities)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=1)
    return lse - x.gather(1, target.unsqueeze(1)).squeeze(1), lse


def _nll_backward(logits: Tensor, target: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    """The gradient of the rows' NLL with respect to `logits`, times `grad` (N,): (softmax - one-hot) * grad,
    in float32 and returned in the logits' dtype. One pass over the logits where torch.compile fuses it."""
    onehot = torch.arange(logits.size(1), device=logits.device) == target.unsqueeze(1)
    return ((torch.exp(logits.float() - lse.unsqueeze(1)) - onehot.float()) * grad.unsqueeze(1)).to(logits.dtype)


@functools.cache
def _compiled_nll_kernels() -> tuple:
    """RowNLL's (forward, backward), compiled once per process, on first use."""
    return tuple(torch.compile(f, dynamic=True) for f in (_nll_forward, _nll_backward))


class RowNLL(torch.autograd.Function):
    """Each row's cross-entropy of its target, -log_softmax(logits)[target]: (N, K), (N,) -> (N,) float32,
    computed by torch.compile's fused kernels (one graph for every number of rows and classes: the adaptive
    softmax's clusters differ in both).

    Equal to `F.cross_entropy(logits.float(), target, reduction="none")` in value and gradient, with less
    memory traffic: the forward pass keeps each row's log-sum-exp, not the (N, K) float32 log-probabilities,
    and the backward pass writes the gradient straight in the logits' dtype in one pass, without the
    zero-filled (N, K) gradient of a gather, the log-softmax's backward and a cast. Without torch.compile
    the same steps are slower than the plain ones (`row_nll` chooses).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        nll, lse = _compiled_nll_kernels()[0](logits, target)
        ctx.save_for_backward(logits, target, lse)
        return nll

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, target, lse = ctx.saved_tensors
        return _compiled_nll_kernels()[1](logits, target, lse, grad.contiguous()), None


def row_nll(logits: Tensor, target: Tensor, compiled: bool = False) -> Tensor:
    """Each row's cross-entropy of its target (N, K), (N,) -> (N,) float32: `RowNLL` when `compiled`, else
    log-softmax in float32 and a gather."""
    if compiled:
        return RowNLL.apply(logits, target)
    return -F.log_softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1)).squeeze(1)


def adaptive_nll(
    adaptive: nn.AdaptiveLogSoftmaxWithLoss, hidden: Tensor, targets: Tensor, compiled: bool = False
) -> Tensor:
    """Each row's negative log-likelihood of its target under the adaptive softmax: (N, C), (N,) -> (N,) float32.

    The loss of `nn.AdaptiveLogSoftmaxWithLoss`, with its matrix products in the dtype autocast gives them
    (bfloat16 under `bf16-mixed`, as the linear head's) and every log-softmax in float32 (`row_nll`, with
    torch.compile's kernels when `compiled`); the module itself writes each cluster's result into a tensor of
    its input's dtype, which fails under autocast. A target of tail cluster i costs the head's
    log-probability of the cluster plus the cluster's of the word, computed on the rows whose targets fall
    in it only (a host synchronisation per cluster), padded to one of a few sizes (`rows_bucket`).
    """
    if targets.numel():
        low, high = (int(t) for t in targets.aminmax())  # one host synchronisation for both ends
        if low < 0 or high >= adaptive.n_classes:
            raise ValueError(f"targets must be in [0, {adaptive.n_classes - 1}], got [{low}, {high}]")
    short = adaptive.shortlist_size
    column = targets.clamp(max=short - 1)  # the head's column of each target: its word, or its cluster
    tails = []
    for i, (lo, hi) in enumerate(zip(adaptive.cutoffs, adaptive.cutoffs[1:])):
        inside = (targets >= lo) & (targets < hi)
        column = torch.where(inside, short + i, column)
        tails.append((i, lo, inside.nonzero().squeeze(1)))
    nll = row_nll(adaptive.head(hidden), column, compiled)
    for i, lo, rows in tails:
        if n := rows.numel():
            # A cluster's rows are padded to one of a few sizes (the extra rows compute row 0's hidden state
            # against word 0 and are dropped): see `rows_bucket`.
            extra = rows_bucket(n) - n
            word = F.pad(targets.index_select(0, rows) - lo, (0, extra))
            padded = F.pad(rows, (0, extra))
            cluster_nll = row_nll(adaptive.tail[i](hidden.index_select(0, padded)), word, compiled)
            nll = nll.index_add(0, rows, cluster_nll[:n])
    return nll


def rows_bucket(n: int) -> int:
    """`n` rounded up to a multiple of an eighth of the largest power of two <= n (at least 8): 500 -> 512, 600 -> 640.

    oneDNN, which runs bfloat16 matrix products on a CPU, builds (JIT-compiles) a kernel for each new shape
    and keeps a bounded cache of them. The number of rows whose targets fall in an adaptive softmax cluster
    changes with every batch, so without rounding each step would build its cluster products' kernels
    anew, page faults included. Rounded, a cluster sees a handful of sizes, for at most an eighth more rows.
    """
    step = max(8, 1 << max(n.bit_length() - 4, 0))
    return -(-n // step) * step


def sinusoidal_positions(block_size: int, n_embd: int) -> Tensor:
    """(block_size, n_embd) table of "Attention Is All You Need", as the tutorial's `PositionalEncoding`
    builds it: sin on even features, cos on odd ones."""
    position = torch.arange(block_size, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, n_embd, 2).float() * (-math.log(10000.0) / n_embd))
    pe = torch.zeros(block_size, n_embd)
    pe[:, 0::2] = torch.sin(position * div_term)
    # An odd width has one sine column more than cosine columns.
    pe[:, 1::2] = torch.cos(position * div_term)[:, : n_embd // 2]
    return pe


def rotary_tables(block_size: int, head_size: int, base: float) -> tuple[Tensor, Tensor]:
    """(block_size, head_size // 2) cosines and sines of the rotary angles position * base**(-2i / head_size)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float) / head_size)
    angles = torch.arange(block_size, dtype=torch.float)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs (i, i + hs/2) of x (B, nh, T, hs) by the angles of (..., T, hs/2) `cos`/`sin`
    (transformers' `rotate_half` layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` computed in float32 and returned in the input's dtype.

    Under bf16 autocast the q/k projections arrive in bfloat16 while the weight stays float32, a pair
    torch's fused kernel refuses (it falls back, with a warning); float32 statistics are the more accurate.
    The parameters and the state dict are `nn.RMSNorm`'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    """The block's normalisation over `dim` features: LayerNorm (with a bias when `config.bias`) or RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps, bias=config.bias)


# Up to this many keys, bfloat16 attention on a CPU does not run torch's attention kernel in bfloat16, which
# for short sequences is slower than in float32 (its backward pass most): a whole block's causal attention
# (training and its validation) runs as bfloat16 matrix products around a float32 softmax
# (`causal_matrix_attention`), faster still, and other attention (padded prompts, generation's cache) runs
# the kernel in float32, the more exact of the two. For long sequences the bfloat16 kernel's halved memory
# traffic wins, and the matrix products, which hold every (T, T) score, lose (scripts/bench_attention.py
# times all three).
CPU_SHORT_ATTENTION_MAX_KEYS = 128


def attention_way(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> str:
    """How `attention` computes attention over these queries and keys (B, nh, T|S, hs): "matrix"
    (`causal_matrix_attention`: a whole block's causal attention, no mask of its own, as many queries as keys)
    or "float32" (the kernel on float32 copies) for bfloat16 CPU attention over at most
    `CPU_SHORT_ATTENTION_MAX_KEYS` keys, else "kernel" (`F.scaled_dot_product_attention` as it is given)."""
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.size(-2) <= CPU_SHORT_ATTENTION_MAX_KEYS):
        return "kernel"
    return "matrix" if is_causal and attn_mask is None and q.size(-2) == k.size(-2) else "float32"


def causal_matrix_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Causal `scaled_dot_product_attention` of (B, nh, T, hs) bfloat16 q, k, v written out: the scores q kᵀ
    and the output p v as bfloat16 matrix products (float32 sums), the scaling, the mask and the softmax in
    float32, as autocast computes attention written this way on a GPU."""
    T = q.size(-2)
    with torch.autocast("cpu", enabled=False):  # the dtypes are chosen here, not by autocast's op lists
        scores = torch.matmul(q, k.transpose(-2, -1)).float() * q.size(-1) ** -0.5
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        p = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        if dropout_p > 0.0:
            p = F.dropout(p, dropout_p)
        return torch.matmul(p.to(v.dtype), v)


def attention(q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor:
    """`F.scaled_dot_product_attention(q, k, v, **options)`, computed the way `attention_way` says, returned in
    q's dtype."""
    way = attention_way(q, k, options.get("attn_mask"), options.get("is_causal", False))
    if way == "kernel":
        return F.scaled_dot_product_attention(q, k, v, **options)
    if way == "matrix":
        return causal_matrix_attention(q, k, v, options.get("dropout_p", 0.0))
    with torch.autocast("cpu", enabled=False):  # CPU autocast would cast the float32 copies back to bfloat16
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options).to(q.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection, through `scaled_dot_product_attention`."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_size, eps=config.layer_norm_eps)
            self.k_norm = RMSNorm(config.head_size, eps=config.layer_norm_eps)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.qk_norm, self.layer = config.qk_norm, layer

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, attn_mask: Tensor | None, is_causal: bool,
        cache: Cache | None,
    ) -> Tensor:  # fmt: skip
        """Attend from x (B, T, C) to the keys allowed by the mask.

        `rope` is the rotary (cos, sin) of the new tokens' positions, (T or B x T, hs/2), or None. `attn_mask` is
        bool (B, 1, T, S), True where a query may attend to a key; None with `is_causal` for causal attention,
        or None alone when every key may be seen. With a `cache` the new keys/values are stored and attention
        reads every key the cache holds for this layer.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)  # (B, nh, S, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward block: c_proj(dropout(activation(c_fc(x)))); SwiGLU splits c_fc in two."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        width = 2 * config.d_ff if config.activation == "swiglu" else config.d_ff
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x: Tensor) -> Tensor:
        x = self.c_fc(x)
        if self.activation == "swiglu":
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        elif self.activation in ("relu", "relu2"):
            x = F.relu(x)
            x = x * x if self.activation == "relu2" else x
        else:
            x = F.gelu(x, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.c_proj(self.dropout(x))


class Block(nn.Module):
    """One Transformer layer, post-norm (the tutorial, `nn.TransformerEncoderLayer`) or pre-norm (GPT-2).

    ::

        post-norm (norm_first=False)          pre-norm (norm_first=True)
        x = ln_1(x + drop(attn(x)))           x = x + drop(attn(ln_1(x)))
        x = ln_2(x + drop(mlp(x)))            x = x + drop(mlp(ln_2(x)))
    """

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)
        self.norm_first = config.norm_first

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, attn_mask: Tensor | None, is_causal: bool,
        cache: Cache | None,
    ) -> Tensor:  # fmt: skip
        """See `CausalSelfAttention.forward` for the arguments; returns (B, T, C)."""
        if self.norm_first:
            x = x + self.dropout(self.attn(self.ln_1(x), rope, attn_mask, is_causal, cache))
            x = x + self.dropout(self.mlp(self.ln_2(x)))
        else:
            x = self.ln_1(x + self.dropout(self.attn(x, rope, attn_mask, is_causal, cache)))
            x = self.ln_2(x + self.dropout(self.mlp(x)))
        return x


class GPT(nn.Module):
    """A decoder-only Transformer language model.

    `forward` always returns scores for every position. With `head="adaptive"` these scores are
    log-probabilities from `nn.AdaptiveLogSoftmaxWithLoss`: they are valid logits (softmax, argmax and
    cross-entropy of them are exact), already normalised.
    """

    def __init__(self, config: GPTConfig, loss_kernel: LossKernel = "auto") -> None:
        super().__init__()
        self.config = config
        if loss_kernel not in ("auto", "plain", "fused"):
            raise ValueError(f"loss_kernel must be one of ('auto', 'plain', 'fused'), got {loss_kernel!r}.")
        self.loss_kernel = loss_kernel
        """How the linear head's training loss is computed: "plain" (`chunked_nll_sum`), "fused"
        (`fused_linear_nll_sum`) or "auto" (fused for float32 on CPU without autocast, plain elsewhere)."""
        self.compiled_loss = False
        """Whether the adaptive head's loss uses `RowNLL`'s compiled kernels (`compile_parts` sets it)."""
        # With the tied adaptive head the input embedding is computed from the head's weights (no wte).
        wte = {} if self.adaptive_input else dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        blocks = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.transformer = nn.ModuleDict(dict(**wte, drop=nn.Dropout(config.dropout), h=blocks))
        # Fixed functions of the position (sinusoidal, rotary) are rebuilt at init, so they stay out of checkpoints.
        if config.positional == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        elif config.positional == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_positions(config.block_size, config.n_embd), persistent=False)
        else:
            cos, sin = rotary_tables(config.block_size, config.head_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.bigram_buckets:
            self.transformer["bigram"] = nn.Embedding(config.bigram_buckets, config.bigram_dim)
            self.transformer["bigram_proj"] = nn.Linear(config.bigram_dim, config.n_embd, bias=False)
        if config.norm_first:
            # Pre-norm leaves the residual stream unnormalised; post-norm blocks already end in a norm.
            self.transformer["ln_f"] = make_norm(config, config.n_embd)
        if config.head == "linear":
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        else:
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(
                config.n_embd, config.vocab_size, list(config.adaptive_cutoffs_used),
                div_value=config.adaptive_div_value, head_bias=config.lm_head_bias,
            )  # fmt: skip
            if self.adaptive_input and not config.tie_shortlist:
                self.transformer["shortlist"] = nn.Embedding(self.adaptive.shortlist_size, config.n_embd)
        self.apply(self._init_weights)
        if config.zero_init_proj:
            for block in blocks:
                nn.init.zeros_(block.attn.c_proj.weight)
                nn.init.zeros_(block.mlp.c_proj.weight)
        if config.bigram_buckets:
            # Rows of unit norm, read through a projection that starts at zero: the model begins as it would
            # without the table, and the projection learns first.
            nn.init.normal_(self.transformer.bigram.weight, std=config.bigram_dim**-0.5)
            nn.init.zeros_(self.transformer.bigram_proj.weight)
        if config.tie_weights and config.head == "linear":
            self.lm_head.weight = self.transformer.wte.weight
        if "shortlist" in self.transformer:
            # A copy of the head's rows: the model starts as the tied one, and the two part as they learn.
            with torch.no_grad():
                self.shortlist_weight.copy_(self.adaptive.head.weight[: self.adaptive.shortlist_size])

    @property
    def adaptive_input(self) -> bool:
        """Whether the input embedding is `adaptive_input_embedding` of the adaptive head (no `wte`)."""
        return self.config.head == "adaptive" and self.config.tie_weights

    @property
    def shortlist_weight(self) -> Tensor | None:
        """The adaptive input's own table of the shortlist's vectors (`GPTConfig.tie_shortlist` False), or None."""
        return self.transformer.shortlist.weight if "shortlist" in self.transformer else None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # The tutorial's init: Xavier-uniform for every matrix, zero biases, identity LayerNorms.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.xavier_uniform_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def compile_parts(self, **options) -> None:
        """`torch.compile(**options)` each Transformer block in place (the state dict keeps its keys), and have
        the adaptive softmax's loss use `RowNLL`'s compiled kernels. The blocks, not the whole model: training
        calls `loss`, not `forward`, and the heads' data-dependent shapes (the adaptive softmax's clusters)
        would recompile at every step."""
        for block in self.transformer.h:
            block.compile(**options)
        self.compiled_loss = True

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, shared tensors counted once; `exclude_embeddings` leaves out the input
        embeddings (token table, the adaptive input's own shortlist table, bigram table and learned positions),
        but a token table tied to the head counts, as the head."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if not self.config.tie_weights:  # a tied input embedding counts as the head it is
                n -= self.transformer.wte.weight.numel()
            if self.config.positional == "learned":
                n -= self.transformer.wpe.weight.numel()
            if self.shortlist_weight is not None:
                n -= self.shortlist_weight.numel()
            if self.config.bigram_buckets:
                n -= self.transformer.bigram.weight.numel()
        return n

    def new_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `block_size` tokens (on the model's device
        and in its parameter dtype unless given)."""
        weight = self.transformer.h[0].attn.c_attn.weight
        return KVCache(self.config, batch_size, device or weight.device, dtype or weight.dtype)

    def forward(
        self, idx: Tensor, key_padding_mask: Tensor | None = None, *, positions: Tensor | None = None,
        cache: Cache | None = None, previous: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Scores of the next token at every position.

        Args:
            idx: (B, T) token ids. With `cache`, only the new tokens.
            key_padding_mask: bool (B, T), True at pad tokens (the convention of `nn.TransformerEncoder`'s
                `src_key_padding_mask`). No token attends to a pad token; outputs at pad positions are
                meaningless. With `cache`, it covers the new tokens and the cache remembers it.
            positions: (B, T) or (T,) absolute position ids; defaults to the slots the tokens occupy (from the
                cache, or 0 onwards). Left-padded prompts pass the positions they would have without padding.
            cache: A `KVCache` from `new_cache` (or another `minigpt.cache.Cache`): the new tokens' keys and
                values are stored and attention also reads the cached ones.
            previous: (B,) the token before each row's first new token, -1 for none (the default): what a model
                with bigram embeddings needs to continue a cache that holds tokens (see `previous_tokens`).

        Returns:
            (B, T, vocab_size) logits, or log-probabilities with the adaptive head.
        """
        hidden = self.hidden_states(idx, key_padding_mask, positions=positions, cache=cache, previous=previous)
        return self.head_logits(hidden)

    def hidden_states(
        self, idx: Tensor, key_padding_mask: Tensor | None = None, *, positions: Tensor | None = None,
        cache: Cache | None = None, previous: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """The Transformer trunk (everything but the head, `ln_f` included): (B, T, n_embd). Takes the same
        arguments as `forward`."""
        self._check_inputs(idx, key_padding_mask, positions, cache, previous)
        T = idx.size(1)
        if cache is None:
            slots = torch.arange(T, device=idx.device)
            attn_mask, is_causal = attention_mask(0, T, key_padding_mask, idx.device)
        else:
            slots, attn_mask, is_causal = cache.prepare(T, key_padding_mask)
            # Checked only where it matters (a host sync): a first new slot after 0 continues cached tokens.
            if self.config.bigram_buckets and previous is None and _continues(slots):
                raise ValueError(
                    "This model has bigram embeddings (bigram_buckets > 0): continuing a cache that holds tokens "
                    "needs the token before each row's first new token (`previous`; `previous_token_ids` in "
                    "transformers)."
                )
        positions = slots if positions is None else positions  # (T,) or (B, T)
        x = self.embed(idx, positions, previous, key_padding_mask)
        rope = None
        if self.config.positional == "rotary":
            rope = self.rope_cos[positions], self.rope_sin[positions]  # (T or B x T, hs/2)
            rope = tuple(t.unsqueeze(-3) for t in rope) if positions.dim() == 2 else rope  # broadcast over heads
        for block in self.transformer.h:
            x = block(x, rope, attn_mask, is_causal, cache)
        if self.config.norm_first:
            x = self.transformer.ln_f(x)
        return x

    def embed(
        self, idx: Tensor, positions: Tensor, previous: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """Token embeddings (scaled when `scale_embedding`) plus additive positions and the bigram embedding,
        after dropout: (B, T, C). `previous` and `key_padding_mask`: see `previous_tokens`."""
        if self.adaptive_input:
            # In the blocks' dtype: a half-precision export keeps the adaptive head in float32 (see head_logits).
            x = adaptive_input_embedding(idx, self.adaptive, self.shortlist_weight)
            x = x.to(self.transformer.h[0].attn.c_attn.weight.dtype)
        else:
            x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.scale_embedding:
            x = x * math.sqrt(self.config.n_embd)
        if self.config.positional == "learned":
            x = x + self.transformer.wpe(positions)
        elif self.config.positional == "sinusoidal":
            x = x + self.sinusoidal[positions].to(x.dtype)
        if self.config.bigram_buckets:
            x = x + self.bigram_embedding(previous_tokens(idx, previous, key_padding_mask), idx)
        return self.transformer.drop(x)

    def bigram_embedding(self, before: Tensor, idx: Tensor) -> Tensor:
        """The bigram table's contribution to the embeddings of tokens `idx` after tokens `before` (-1: none),
        both (...,): (..., n_embd). Only with `bigram_buckets` > 0."""
        rows = self.transformer.bigram(bigram_bucket(before, idx, self.config.bigram_buckets))
        rows = F.dropout(rows, self.config.bigram_dropout, self.training)
        return self.transformer.bigram_proj(rows)

    def head_logits(self, hidden: Tensor) -> Tensor:
        """Apply the output head to hidden states (..., n_embd) -> (..., vocab_size).

        Returns logits for the linear head, log-probabilities for the adaptive head.
        """
        if self.config.head == "linear":
            return self.lm_head(hidden)
        with _float32(hidden):
            log_probs = self.adaptive.log_prob(hidden.reshape(-1, hidden.size(-1)).float())
        return log_probs.view(*hidden.shape[:-1], self.config.vocab_size)

    def loss(self, idx: Tensor, targets: Tensor, key_padding_mask: Tensor | None = None, **kw) -> Tensor:
        """Mean next-token cross-entropy over targets != `ignore_index` (0 when no target counts).

        Equal (loss and gradients) to `lm_loss(model(idx, key_padding_mask), targets, ignore_index)`;
        takes the arguments of `loss_sum_and_count`.
        """
        nll_sum, count = self.loss_sum_and_count(idx, targets, key_padding_mask, **kw)
        return nll_sum / count.clamp(min=1)

    def loss_sum_and_count(
        self, idx: Tensor, targets: Tensor, key_padding_mask: Tensor | None = None, *, ignore_index: int = -100,
        chunk_size: int | None = None,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(float32 summed next-token NLL, int64 number of targets it sums over) of `targets` (B, T), idx
        shifted by one, given `idx` (B, T). Sums give exact perplexities over many batches: exp(sum / count).
        Targets equal to `ignore_index` (F.cross_entropy's default) do not count; `chunk_size`: see
        `head_nll_sum`."""
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}.")
        hidden = self.hidden_states(idx, key_padding_mask)
        return self.head_nll_sum(hidden, targets, ignore_index=ignore_index, chunk_size=chunk_size)

    def head_nll_sum(
        self, hidden: Tensor, targets: Tensor, *, ignore_index: int = -100, chunk_size: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(float32 summed NLL, int64 count) of `targets` (...) under the head applied to `hidden` (..., C).

        The linear head's loss is `chunked_nll_sum` (plain autograd) or, when `loss_kernel` chooses it,
        `fused_linear_nll_sum`; the adaptive head uses its own cluster-wise loss. `chunk_size`:
        most rows per chunk of the linear head (default: the chosen path's own).
        """
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}.")
        hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)  # (N, C), (N,)
        keep = targets != ignore_index
        count = keep.sum()
        fused = self.loss_kernel == "fused" or (
            # "auto": the fused kernel where scripts/bench_train.py shows its gain, float32 on CPU
            self.loss_kernel == "auto" and hidden.device.type == "cpu" and hidden.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        )  # fmt: skip
        if self.config.head == "linear" and not fused:
            return chunked_nll_sum(hidden, self.lm_head, targets, ignore_index, chunk_size), count
        # The adaptive head and the fused kernel take only the rows that count (a host synchronisation).
        hidden, targets = hidden[keep], targets[keep]
        if targets.numel() == 0:
            # Run the head on the empty batch anyway so every parameter still gets a (zero) gradient.
            return self.head_logits(hidden).float().sum(), count
        if self.config.head == "adaptive":
            return adaptive_nll(self.adaptive, hidden.float(), targets, self.compiled_loss).sum(), count
        workspace = self.__dict__.setdefault("_loss_workspace", Workspace())
        nll_sum = fused_linear_nll_sum(
            hidden, self.lm_head.weight, self.lm_head.bias, targets, chunk_size=chunk_size, workspace=workspace
        )
        return nll_sum, count

    def _check_inputs(
        self, idx: Tensor, key_padding_mask: Tensor | None, positions: Tensor | None, cache: Cache | None,
        previous: Tensor | None,
    ) -> None:  # fmt: skip
        if idx.dim() != 2:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, got shape {tuple(idx.shape)}.")
        (B, T), block_size = idx.size(), self.config.block_size
        if cache is None and T > block_size:
            raise ValueError(f"Cannot forward sequence of length {T}, block_size is only {block_size}. "
                             "Crop the context to its last block_size tokens.")  # fmt: skip
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"The cache holds {cache.batch_size} sequences but idx has {B}.")
        if key_padding_mask is not None and key_padding_mask.shape != idx.shape:
            raise ValueError(f"key_padding_mask must have the shape of idx {tuple(idx.shape)}, "
                             f"got {tuple(key_padding_mask.shape)}.")  # fmt: skip
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = pad), got {key_padding_mask.dtype}.")
        if previous is not None and previous.shape != idx.shape[:1]:
            raise ValueError(f"previous must have shape ({B},), one token per row, got {tuple(previous.shape)}.")
        if positions is not None and positions.shape not in (idx.shape, idx.shape[1:]):
            raise ValueError(f"positions must have shape {tuple(idx.shape)} or ({T},), got {tuple(positions.shape)}.")
        if positions is not None and positions.numel():
            low, high = int(positions.min()), int(positions.max())  # host syncs, only when positions are given
            if low < 0 or high >= block_size:
                raise ValueError(f"Cannot forward position {high}, block_size is only {block_size} "
                                 f"(positions must lie in [0, {block_size}), got minimum {low}).")  # fmt: skip

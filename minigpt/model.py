"""A GPT-style causal language model in pure PyTorch (no Lightning), with a KV cache for generation.

One module covers two flavours chosen by `GPTConfig`:

- the PyTorch tutorial's "causal encoder" (`GPTConfig.seed`): scaled token embedding + sinusoidal
  positions, post-norm blocks computing exactly what `nn.TransformerEncoderLayer(norm_first=False)`
  computes, and a linear head reading the encoder output (the tutorial's head read the embeddings);
- GPT-2 (`GPTConfig.gpt2`): learned positions, pre-norm blocks, a final `ln_f` and a tied head.

Module names follow nanoGPT/GPT-2 (`transformer.wte`, `transformer.h[i].attn.c_attn`, `lm_head`, ...)
so GPT-2 weights map across. `c_attn` fuses the q, k and v projections with rows [q; k; v], the layout of
`nn.MultiheadAttention.in_proj_weight`.

References: karpathy/nanoGPT `model.py`, Lightning-AI/litgpt `litgpt/model.py`, the PyTorch tutorial
"Language Modeling with nn.Transformer" (`PositionalEncoding`), and Grave et al. 2017, "Efficient
softmax approximation for GPUs" (`nn.AdaptiveLogSoftmaxWithLoss`).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minigpt.config import GPTConfig

PAD_ID = 1
"""Id of `<pad>` in minigpt's vocabularies; targets equal to it do not count in the loss."""

# The chunked loss holds at most this many float32 logits at once (512 MiB, one buffer): the whole batch
# at block 30 (960 rows at a 100,000-word vocabulary), four equal chunks of 1,024 rows at block 128. On a
# 2-core CPU the head's matrix products run 20-25% slower on 335-row chunks than on ~1,000-row ones.
_LOSS_CHUNK_ELEMENTS = 2**27

# A target probability below this (about 7.5e-37) is too close to float32's smallest normal number for
# -log(p) to be exact; such rows (loss above 83 nats) get their loss recomputed through log_softmax.
_MIN_EXACT_PROB = 2.0**-120


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = PAD_ID) -> Tensor:
    """Mean cross-entropy of next-token predictions, the plain reference path.

    Args:
        logits: (B, T, V) scores (logits or log-probabilities).
        targets: (B, T) target ids; positions equal to `ignore_index` do not count.
        ignore_index: Target id to leave out (the padding id).

    Returns:
        Scalar mean loss over the counted positions (NaN when none counts, like `F.cross_entropy`).
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index)


def sinusoidal_positions(block_size: int, n_embd: int) -> Tensor:
    """The fixed position encoding of "Attention Is All You Need", exactly as the PyTorch tutorial's
    `PositionalEncoding` builds it.

    Returns:
        (block_size, n_embd) float32 table: sin on even features, cos on odd ones.
    """
    position = torch.arange(block_size, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, n_embd, 2).float() * (-math.log(10000.0) / n_embd))
    pe = torch.zeros(block_size, n_embd)
    pe[:, 0::2] = torch.sin(position * div_term)
    # An odd width has one sine column more than cosine columns.
    pe[:, 1::2] = torch.cos(position * div_term)[:, : n_embd // 2]
    return pe


class KVCache:
    """Keys and values of every layer for the positions generated so far.

    Slots are filled left to right: `pos` tokens have been written. Padding is remembered per slot so
    later tokens never attend to pad keys.

    Attributes:
        k: Per layer, (B, n_head, block_size, head_size) keys.
        v: Per layer, (B, n_head, block_size, head_size) values.
        key_padding_mask: (B, block_size) bool, True where the slot holds a pad token.
        pos: Number of slots filled so far.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, device: torch.device | None, dtype: torch.dtype | None
    ) -> None:
        shape = (batch_size, config.n_head, config.block_size, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.key_padding_mask = torch.zeros(batch_size, config.block_size, dtype=torch.bool, device=device)
        self.pos = 0
        # Whether any padding mask was ever given: without one, decoding needs no explicit attention mask.
        self.has_padding = False

    @property
    def batch_size(self) -> int:
        return self.key_padding_mask.size(0)

    @property
    def capacity(self) -> int:
        """Number of slots (the model's block_size)."""
        return self.key_padding_mask.size(1)

    def reset(self) -> None:
        """Forget the cached positions (the tensors are reused)."""
        self.pos = 0
        self.has_padding = False
        self.key_padding_mask.zero_()


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection, through `scaled_dot_product_attention`."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
    ) -> Tensor:
        """Attend from the T rows of `x` (slots start .. start+T-1) to the keys allowed by the mask.

        Args:
            x: (B, T, C) input.
            attn_mask: bool (B, 1, T, S), True where a query may attend to a key; None with `is_causal`
                for plain causal attention, or None alone when every key may be seen.
            is_causal: Use SDPA's built-in causal mask (only valid when T == S).
            kv: This layer's (k, v) cache tensors; the new keys/values are written at slots
                start .. start+T-1 and attention reads slots 0 .. start+T-1.
            start: First slot of `x` in the cache.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            # The cache may be kept in another dtype than autocast's compute dtype.
            k = k_cache[:, :, : start + T].to(q.dtype)  # (B, nh, S, hs)
            v = v_cache[:, :, : start + T].to(q.dtype)  # (B, nh, S, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward block: c_proj(dropout(activation(c_fc(x))))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x: Tensor) -> Tensor:
        x = self.c_fc(x)
        if self.activation == "relu":
            x = F.relu(x)
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

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)
        self.norm_first = config.norm_first

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
    ) -> Tensor:
        """See `CausalSelfAttention.forward` for the arguments; returns (B, T, C)."""
        if self.norm_first:
            x = x + self.dropout(self.attn(self.ln_1(x), attn_mask, is_causal, kv, start))
            x = x + self.dropout(self.mlp(self.ln_2(x)))
        else:
            x = self.ln_1(x + self.dropout(self.attn(x, attn_mask, is_causal, kv, start)))
            x = self.ln_2(x + self.dropout(self.mlp(x)))
        return x


class GPT(nn.Module):
    """A decoder-only Transformer language model.

    `forward` always returns scores for every position. With `head="adaptive"` these scores are
    log-probabilities from `nn.AdaptiveLogSoftmaxWithLoss`: they are valid logits (softmax, argmax and
    cross-entropy of them are exact), already normalised.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            )
        )
        if config.positional == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:
            # A fixed function of the position: rebuilt at init, so it stays out of checkpoints.
            self.register_buffer("sinusoidal", sinusoidal_positions(config.block_size, config.n_embd), persistent=False)
        if config.norm_first:
            # Pre-norm leaves the residual stream unnormalised; post-norm blocks already end in a LayerNorm.
            self.transformer["ln_f"] = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        if config.head == "linear":
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        else:
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(
                config.n_embd,
                config.vocab_size,
                list(config.adaptive_cutoffs_used),
                div_value=config.adaptive_div_value,
                head_bias=config.lm_head_bias,
            )
        self.apply(self._init_weights)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # The tutorial's init: Xavier-uniform for every matrix, zero biases, identity LayerNorms.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.xavier_uniform_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, shared tensors counted once.

        Args:
            exclude_embeddings: Leave out the input embeddings (token table and learned positions). A token
                table tied to the head still counts, as the head.
        """
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
            if self.config.positional == "learned":
                n -= self.transformer.wpe.weight.numel()
        return n

    def new_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `block_size` tokens.

        Args:
            batch_size: Number of sequences decoded together.
            device: Defaults to the model's device.
            dtype: Defaults to the model's parameter dtype.
        """
        weight = self.transformer.wte.weight
        return KVCache(self.config, batch_size, device or weight.device, dtype or weight.dtype)

    def forward(
        self,
        idx: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Scores of the next token at every position.

        Args:
            idx: (B, T) token ids. With `cache`, only the new tokens.
            key_padding_mask: bool (B, T), True at pad tokens (the convention of `nn.TransformerEncoder`'s
                `src_key_padding_mask`). No token attends to a pad token; outputs at pad positions are
                meaningless. With `cache`, it covers the new tokens and is remembered for later steps.
            positions: (B, T) or (T,) absolute position ids; defaults to the slots the tokens occupy
                (`cache.pos` onwards, or 0 onwards). Left-padded prompts pass the positions they would have
                without padding.
            cache: A `KVCache` from `new_cache`; the new tokens' keys/values are stored and `cache.pos`
                advances by T.

        Returns:
            (B, T, vocab_size) logits, or log-probabilities with the adaptive head.
        """
        return self.head_logits(self.hidden_states(idx, key_padding_mask, positions=positions, cache=cache))

    def hidden_states(
        self,
        idx: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """The Transformer trunk (everything but the head, `ln_f` included): (B, T, n_embd).

        Takes the same arguments as `forward`.
        """
        start = 0 if cache is None else cache.pos
        self._check_inputs(idx, key_padding_mask, positions, cache)
        B, T = idx.size()
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.scale_embedding:
            x = x * math.sqrt(self.config.n_embd)
        if self.config.positional == "learned":
            x = x + self.transformer.wpe(positions)
        else:
            x = x + self.sinusoidal[positions].to(x.dtype)
        x = self.transformer.drop(x)
        attn_mask, is_causal = self._attention_mask(T, start, key_padding_mask, cache, idx.device)
        for i, block in enumerate(self.transformer.h):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x = block(x, attn_mask, is_causal, kv, start)
        if cache is not None:
            cache.pos += T
        if self.config.norm_first:
            x = self.transformer.ln_f(x)
        return x

    def head_logits(self, hidden: Tensor) -> Tensor:
        """Apply the output head to hidden states (..., n_embd) -> (..., vocab_size).

        Returns logits for the linear head, log-probabilities for the adaptive head.
        """
        if self.config.head == "linear":
            return self.lm_head(hidden)
        log_probs = self.adaptive.log_prob(hidden.reshape(-1, hidden.size(-1)))
        return log_probs.view(*hidden.shape[:-1], self.config.vocab_size)

    def loss(
        self,
        idx: Tensor,
        targets: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        ignore_index: int = PAD_ID,
        chunk_size: int | None = None,
    ) -> Tensor:
        """Mean next-token cross-entropy over targets != `ignore_index`, without materialising all logits.

        Equal (loss and gradients) to `lm_loss(model(idx, key_padding_mask), targets, ignore_index)`.

        Args:
            idx: (B, T) input ids.
            targets: (B, T) target ids (idx shifted by one).
            key_padding_mask: bool (B, T), True at pad tokens.
            ignore_index: Target id that does not count.
            chunk_size: Rows per chunk of the linear head's loss (see `head_nll_sum`).

        Returns:
            Scalar float32 loss (0 when no target counts).
        """
        nll_sum, count = self.loss_sum_and_count(
            idx, targets, key_padding_mask, ignore_index=ignore_index, chunk_size=chunk_size
        )
        return nll_sum / count.clamp(min=1)

    def loss_sum_and_count(
        self,
        idx: Tensor,
        targets: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        ignore_index: int = PAD_ID,
        chunk_size: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Summed next-token negative log-likelihood and the number of targets it sums over.

        Sums let callers compute exact perplexities over many batches: exp(total sum / total count).

        Args:
            idx: (B, T) input ids.
            targets: (B, T) target ids.
            key_padding_mask: bool (B, T), True at pad tokens.
            ignore_index: Target id that does not count.
            chunk_size: Rows per chunk of the linear head's loss (see `head_nll_sum`).

        Returns:
            (float32 scalar NLL sum, int64 scalar count).
        """
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}.")
        hidden = self.hidden_states(idx, key_padding_mask)
        return self.head_nll_sum(hidden, targets, ignore_index=ignore_index, chunk_size=chunk_size)

    def head_nll_sum(
        self, hidden: Tensor, targets: Tensor, *, ignore_index: int = PAD_ID, chunk_size: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Summed NLL of `targets` under the head applied to `hidden`, and the number of counted targets.

        The linear head is evaluated in chunks of rows (see `_ChunkedLinearCrossEntropy`) so that memory
        stays at most chunk_size x vocab_size floats, in a buffer kept between calls on CPU (`_Workspace`);
        the adaptive head uses its own cluster-wise loss.

        Args:
            hidden: (..., n_embd) hidden states, e.g. from `hidden_states`.
            targets: (...) target ids.
            ignore_index: Target id that does not count.
            chunk_size: Most rows per chunk for the linear head (the rows are split into equal chunks); the
                default holds at most 2**27 logits at once.

        Returns:
            (float32 scalar NLL sum, int64 scalar count).
        """
        keep = targets.reshape(-1) != ignore_index
        hidden = hidden.reshape(-1, hidden.size(-1))[keep]  # (N, C), only the rows that count
        targets = targets.reshape(-1)[keep]  # (N,)
        count = keep.sum()
        if targets.numel() == 0:
            # Run the head on the empty batch anyway so every parameter still gets a (zero) gradient.
            return self.head_logits(hidden).float().sum(), count
        if self.config.head == "adaptive":
            # `.output` holds each row's target log-probability.
            return -self.adaptive(hidden, targets).output.float().sum(), count
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if chunk_size is None:
            chunk_size = max(1, _LOSS_CHUNK_ELEMENTS // self.config.vocab_size)
        elif chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}.")
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        workspace = self.__dict__.setdefault("_loss_workspace", _Workspace())
        nll_sum = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, needs_grad, workspace)
        return nll_sum, count

    def _check_inputs(
        self, idx: Tensor, key_padding_mask: Tensor | None, positions: Tensor | None, cache: KVCache | None
    ) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, got shape {tuple(idx.shape)}.")
        B, T = idx.size()
        block_size = self.config.block_size
        if cache is None and T > block_size:
            raise ValueError(
                f"Cannot forward sequence of length {T}, block_size is only {block_size}. "
                "Crop the context to its last block_size tokens."
            )
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"The cache holds {cache.batch_size} sequences but idx has {B}.")
            if cache.pos + T > cache.capacity:
                raise ValueError(
                    f"Cannot forward sequence of length {T} at cache position {cache.pos}, block_size is "
                    f"only {block_size}. Crop the context and prefill a reset cache (sliding window)."
                )
        if key_padding_mask is not None:
            if key_padding_mask.shape != idx.shape:
                raise ValueError(
                    f"key_padding_mask must have the shape of idx {tuple(idx.shape)}, "
                    f"got {tuple(key_padding_mask.shape)}."
                )
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (True = pad), got {key_padding_mask.dtype}.")
        if positions is not None:
            if positions.shape not in (idx.shape, idx.shape[1:]):
                raise ValueError(
                    f"positions must have shape {tuple(idx.shape)} or ({T},), got {tuple(positions.shape)}."
                )
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= block_size):
                raise ValueError(
                    f"Cannot forward position {int(positions.max())}, block_size is only {block_size} "
                    f"(positions must lie in [0, {block_size}), got minimum {int(positions.min())})."
                )

    def _attention_mask(
        self,
        T: int,
        start: int,
        key_padding_mask: Tensor | None,
        cache: KVCache | None,
        device: torch.device,
    ) -> tuple[Tensor | None, bool]:
        """The attention mask for T queries at slots start .. start+T-1 over keys at slots 0 .. start+T-1.

        Returns:
            (bool (B or 1, 1, T, S) mask with True = may attend, or None; whether SDPA's causal flag applies).
        """
        if cache is not None:
            new_slots = cache.key_padding_mask[:, start : start + T]
            if key_padding_mask is None:
                new_slots.fill_(False)
            else:
                new_slots.copy_(key_padding_mask)
                cache.has_padding = True
            key_padding_mask = cache.key_padding_mask[:, : start + T] if cache.has_padding else None
        if key_padding_mask is None:
            if start == 0:
                return None, True  # square causal attention: SDPA's fast path
            if T == 1:
                return None, False  # one new token may see every cached key
        q_slot = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(start + T, device=device)[None, :]  # (1, S)
        mask = k_slot <= q_slot  # (T, S)
        if key_padding_mask is not None:
            # A pad query may have no visible key at all (left padding), and an all-masked softmax row is
            # NaN; letting every query see itself avoids that. Outputs at pad positions are ignored anyway.
            mask = mask & (~key_padding_mask[:, None, :] | (k_slot == q_slot))  # (B, T, S)
        return mask.unsqueeze(-3), False  # (B or 1, 1, T, S), broadcast over heads


class _Workspace:
    """The float32 scratch buffer of the chunked loss, reused from call to call on CPU.

    A fresh CPU tensor of hundreds of MiB is mapped page by page when first written: on a 2-core CPU
    that costs about 0.2 s per 384 MiB, more than the softmax over it. The buffer is checked out while a
    loss waits for its backward pass, so two pending losses never share it. It is neither saved nor
    copied with the model, and CUDA never keeps one (its caching allocator already reuses memory).
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def take(self, numel: int, device: torch.device) -> Tensor:
        """A float32 buffer of at least `numel` elements on `device` (the kept one if it fits)."""
        buffer, self._buffer = self._buffer, None
        if buffer is None or buffer.numel() < numel or buffer.device != device:
            del buffer  # free a kept buffer that does not fit before allocating its replacement
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer

    def give_back(self, buffer: Tensor) -> None:
        if buffer.device.type == "cpu":
            self._buffer = buffer

    def __deepcopy__(self, memo: dict) -> "_Workspace":
        return _Workspace()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._buffer = None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a linear layer's outputs, computed a chunk of rows at a time.

    The (N, V) logits are never all held at once. Each chunk's logits are turned in place into
    probabilities (one softmax), the loss is read off the target probabilities, and the same buffer then
    holds d nll / d logits = softmax - one_hot(target). The gradients of all chunks but the last are
    accumulated in the forward pass; the last chunk's buffer waits for the backward pass, whose matrix
    products apply the upstream scale. So the head costs the plain path's three matrix products and one
    buffer of at most chunk_size x V floats, with no full-size temporaries (the plain path allocates four:
    logits, log-probabilities, and two gradients) and no extra pass over V x C to scale the weight gradient.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk_size: int,
        needs_grad: bool,
        workspace: _Workspace,
    ) -> Tensor:
        # x: (N, C) with every target counted; weight: (V, C); bias: (V,); targets: (N,).
        needs_x, needs_w, needs_b = (needs_grad and flag for flag in ctx.needs_input_grad[:3])
        needs_b = needs_b and bias is not None
        N, V = x.size(0), weight.size(0)
        rows = -(-N // -(-N // chunk_size))  # equal chunks of at most chunk_size rows: no small, slow last one
        # float32 without autocast: the products write straight into the reused buffer. Otherwise (bf16
        # autocast on a GPU) the logits come from F.linear in the autocast dtype, upcast to float32.
        direct = not torch.is_autocast_enabled(x.device.type) and all(
            t is None or t.dtype == torch.float32 for t in (x, weight, bias)
        )
        buffer = workspace.take(rows * V, x.device) if direct else None
        grad_x = torch.empty_like(x) if needs_x else None
        grad_w = grad_b = None  # unscaled sums over the chunks done in this pass
        last = None  # (d nll / d logits of the last chunk, its first row), finished by backward
        nll_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, N, rows):
            xc, tc = x[s : s + rows], targets[s : s + rows, None]  # (n, C), (n, 1)
            n = xc.size(0)
            if direct:
                probs = buffer[: n * V].view(n, V)
                if bias is None:
                    torch.mm(xc, weight.t(), out=probs)
                else:
                    torch.addmm(bias, xc, weight.t(), out=probs)
            else:
                probs = F.linear(xc, weight, bias).float()
            if probs.device.type == "cpu":
                torch.softmax(probs, dim=-1, out=probs)  # in place, row by row: (n, V) probabilities
            else:
                probs = torch.softmax(probs, dim=-1)
            p_target = probs.gather(1, tc)  # (n, 1)
            nll = -p_target.log()
            inexact = p_target[:, 0] < _MIN_EXACT_PROB
            if inexact.any():
                logits = F.linear(xc[inexact], weight, bias).float()
                nll[inexact] = -torch.log_softmax(logits, dim=-1).gather(1, tc[inexact])
            nll_sum += nll.sum()
            if not (needs_x or needs_w or needs_b):
                continue
            probs.scatter_add_(1, tc, probs.new_full((n, 1), -1.0))  # now softmax - one_hot(target)
            if direct and s + n == N:
                last = (probs, s)
                continue
            g = probs.to(weight.dtype)
            if needs_x:
                grad_x[s : s + n] = g @ weight
            if needs_w:
                if grad_w is None:
                    grad_w = torch.zeros_like(weight, dtype=torch.float32)
                grad_w.addmm_(probs.t(), xc.float())  # in place: no V x C temporary per chunk
            if needs_b:
                grad_b = _column_sums(probs) if grad_b is None else grad_b.add_(_column_sums(probs))
        if last is None and buffer is not None:
            workspace.give_back(buffer)
        ctx.save_for_backward(x, weight)
        ctx.state = dict(
            partial=(grad_x, grad_w, grad_b),
            last=last,
            buffer=None if last is None else buffer,
            workspace=workspace,
            needs=(needs_w, needs_b),
            bias_dtype=None if bias is None else bias.dtype,
        )
        return nll_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        if ctx.state is None:
            raise RuntimeError(
                "minigpt's chunked loss frees its buffers in the backward pass, so it can be differentiated "
                "only once: compute the loss again instead of using retain_graph=True."
            )
        state, ctx.state = ctx.state, None  # drop every reference: autograd may then adopt the gradients
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = state["partial"]
        needs_w, needs_b = state["needs"]
        scale = grad_out.float()
        if state["last"] is not None:
            probs, s = state["last"]
            xc = x[s:]
            if grad_x is not None:
                torch.mm(probs, weight, out=grad_x[s:])
            if needs_w and grad_w is None:
                grad_w = torch.mm(probs.t(), xc * scale)  # the scale goes on the small (n, C) factor
            elif needs_w:
                grad_w.addmm_(probs.t(), xc, beta=float(scale), alpha=float(scale))
            if needs_b:
                last_b = _column_sums(probs, scale)
                grad_b = last_b if grad_b is None else grad_b.mul_(scale).add_(last_b)
            state["workspace"].give_back(state["buffer"])
        else:
            grad_w = None if grad_w is None else grad_w.mul_(scale)
            grad_b = None if grad_b is None else grad_b.mul_(scale)
        if grad_x is not None:
            grad_x.mul_(scale.to(grad_x.dtype))
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(state["bias_dtype"])
        return grad_x, grad_w, grad_b, None, None, None, None


def _column_sums(m: Tensor, scale: Tensor | None = None) -> Tensor:
    """(n, V) -> (V,) sums over the rows, times `scale`: a (1, n) @ (n, V) product, twice as fast on CPU as
    `m.sum(0)`."""
    ones = m.new_ones(1, m.size(0)) if scale is None else scale.expand(1, m.size(0))
    return (ones @ m)[0]

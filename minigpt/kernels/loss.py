"""The training loss over a linear head, fused: cross-entropy without the full (N, V) logits.

Plain reference: `linear_nll_sum_reference` below (and `minigpt.model.chunked_nll_sum`, the chunked
plain-autograd loss the model uses by default). Fast path: `fused_linear_nll_sum`, a hand-written autograd
function that never holds more than one chunk of logits and reuses one buffer (`Workspace`) on CPU.
`GPT.loss_kernel = "auto"` picks it only for float32 on CPU without autocast, where its benchmark shows a
gain; on a GPU, or under autocast, "auto" takes the plain path.

Test: tests/test_kernels.py (loss and gradients against the reference in float32 and under bf16 autocast).
Benchmark: scripts/bench_train.py (the `loss_plain` and `loss_fused` rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# At most this many float32 logits are held at once by the fused kernel (512 MiB, one buffer).
LOSS_CHUNK_ELEMENTS = 2**27

# A target probability below this (about 7.5e-37) is too close to float32's smallest normal number for
# -log(p) to be exact; such rows (loss above 83 nats) get their loss recomputed through log_softmax.
_MIN_EXACT_PROB = 2.0**-120


def linear_nll_sum_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int = -100
) -> Tensor:
    """The plain definition every head loss here must equal: summed cross-entropy of `x @ weight.T + bias`.

    Args:
        x: (N, C) hidden states.
        weight: (V, C) head weight.
        bias: (V,) head bias or None.
        targets: (N,) target ids; `ignore_index` does not count.
    """
    return F.cross_entropy(F.linear(x, weight, bias).float(), targets, ignore_index=ignore_index, reduction="sum")


def chunk_rows(n: int, chunk_size: int) -> int:
    """Rows per chunk when `n` rows are split into equal chunks of at most `chunk_size` rows (no small,
    slow last chunk)."""
    return -(-n // -(-n // chunk_size)) if n else chunk_size


def fused_linear_nll_sum(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    chunk_size: int | None = None,
    workspace: Workspace | None = None,
) -> Tensor:
    """Summed cross-entropy of `F.linear(x, weight, bias)` against `targets`, with the fused kernel.

    Equal (loss and gradients) to `linear_nll_sum_reference`. Every target must count: drop ignored rows
    before calling (the kernel gathers each row's target probability).

    Args:
        x: (N, C) hidden states.
        weight: (V, C) head weight.
        bias: (V,) head bias or None.
        targets: (N,) target ids in [0, V).
        chunk_size: Most rows per chunk; default: at most `LOSS_CHUNK_ELEMENTS` logits per chunk.
        workspace: Buffer kept between calls (e.g. one per model); None allocates one per call.

    Returns:
        float32 scalar.
    """
    V = weight.size(0)
    if chunk_size is None:
        chunk_size = max(1, LOSS_CHUNK_ELEMENTS // V)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}.")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    workspace = Workspace() if workspace is None else workspace
    return _ChunkedLinearCrossEntropy.apply(x, weight, bias, targets, chunk_size, needs_grad, workspace)


class Workspace:
    """The float32 scratch buffer of the fused loss, reused from call to call on CPU.

    A fresh CPU tensor of hundreds of MiB is mapped page by page when first written, which can cost
    more than the softmax over it. The buffer is checked out while a loss waits for its backward pass, so
    two pending losses never share it. It is neither saved nor copied with the model, and CUDA never keeps
    one (its caching allocator already reuses memory).
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

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()

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

    Two branches: float32 without autocast writes the products straight into the reused buffer (the
    "direct" branch, the one `GPT.loss_kernel="auto"` uses, on CPU). Under autocast or with 16-bit inputs,
    each chunk's logits come from `F.linear` in the compute dtype and are upcast to float32, and every
    chunk's gradients are finished in the forward pass. That branch (and CUDA, where the softmax is not
    done in place and `inexact.any()` costs a host synchronisation per chunk) is tested on CPU only and
    never chosen automatically.
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
        workspace: Workspace,
    ) -> Tensor:
        # x: (N, C) with every target counted; weight: (V, C); bias: (V,); targets: (N,).
        needs_x, needs_w, needs_b = (needs_grad and flag for flag in ctx.needs_input_grad[:3])
        needs_b = needs_b and bias is not None
        N, V = x.size(0), weight.size(0)
        rows = chunk_rows(N, chunk_size)
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
                "minigpt's fused loss frees its buffers in the backward pass, so it can be differentiated "
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
    """(n, V) -> (V,) sums over the rows, times `scale`, as a (1, n) @ (n, V) product (a matrix product
    reads `m` once with every core; `m.sum(0)` reduces along the slow axis)."""
    ones = m.new_ones(1, m.size(0)) if scale is None else scale.expand(1, m.size(0))
    return (ones @ m)[0]

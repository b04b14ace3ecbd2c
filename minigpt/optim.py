"""Muon for the Transformer's weight matrices with AdamW beside it, as one optimizer.

Muon (Jordan et al., 2024; ``torch.optim.Muon``) replaces each 2-D weight matrix's momentum by its
nearest orthogonal matrix (Newton-Schulz), so every direction of the matrix learns at the same
rate. It is meant for the hidden matrices only: embeddings, the output head, norms and biases keep
AdamW (modded-nanogpt, Moonlight). ``match_rms_adamw`` scales Muon's update to the size of an AdamW
update (Moonlight), so both halves share one learning rate and one schedule.

Lightning's automatic optimisation steps one optimizer, so ``MuonWithAdamW`` holds the two and shares
their parameter groups and state: a scheduler that writes ``group["lr"]`` drives both, and the usual
``state_dict`` / ``load_state_dict`` save and resume both. Muon's half keeps ``torch.optim.Muon``'s groups,
defaults and state, and steps through minigpt's own copy of its step: one that a non-finite gradient can
skip on the device, that orthogonalises a fused q/k/v matrix's three maps apart, and that runs the matrices
of one shape through the iteration as one batch.

``torch.optim.Muon`` runs its Newton-Schulz iteration in bfloat16, which a CPU without bfloat16
instructions emulates many times slower than float32 (`minigpt.hardware.native_bf16`). There the iteration
runs in float32 (``ns_dtype``), through the same operations in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from minigpt.hardware import native_bf16


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        muon_params: Iterable[Tensor],
        adamw_groups: list[dict],
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        momentum: float = 0.95,
        ns_steps: int = 5,
        fused: bool | None = None,
        ns_dtype: torch.dtype | None = None,
        qkv: Iterable[Tensor] = (),
    ):
        """
        Args:
            muon_params: 2-D weight matrices (Muon).
            adamw_groups: AdamW parameter groups (each may set its own ``weight_decay``).
            lr: learning rate of both (Muon's update is scaled to AdamW's size).
            weight_decay: Muon's decoupled weight decay (AdamW's comes with its groups).
            betas: AdamW's betas.
            momentum: Muon's (Nesterov) momentum.
            ns_steps: Newton-Schulz steps per update.
            fused: AdamW's ``fused``.
            ns_dtype: the dtype of the Newton-Schulz iteration: ``torch.bfloat16`` (``torch.optim.Muon``'s own) or
                ``torch.float32``; None picks bfloat16 where the matrices' device computes it natively, else float32.
            qkv: those of ``muon_params`` that stack an attention's query, key and value maps by rows (GPT's fused
                ``c_attn``); each of the three is orthogonalised on its own (`fused_qkv`).
        """
        self.muon = torch.optim.Muon(
            muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
            adjust_lr_fn="match_rms_adamw",
        )  # fmt: skip
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, fused=fused)
        if ns_dtype is None:
            devices = {p.device for g in self.muon.param_groups for p in g["params"]}
            ns_dtype = torch.bfloat16 if all(native_bf16(d) for d in devices) else torch.float32
        if ns_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"ns_dtype must be torch.bfloat16 or torch.float32, got {ns_dtype}.")
        self.ns_dtype = ns_dtype
        muon_ids = {id(p) for g in self.muon.param_groups for p in g["params"]}
        self._qkv = {id(p) for p in qkv}
        if not self._qkv <= muon_ids:
            raise ValueError("every qkv matrix must be one of muon_params.")
        self._n_muon_groups = len(self.muon.param_groups)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        # Set after the groups exist, so Muon's groups do not get the key: callers read defaults["fused"]
        # to know that a non-finite step can be skipped on the device through found_inf (see `step`).
        self.defaults["fused"] = self.adamw.defaults["fused"]
        self._share()

    def _share(self) -> None:
        # The same group dicts and one state dict (the parameters are disjoint), here and in both halves.
        n = self._n_muon_groups
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.state and self.param_groups
        self._share()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        self._muon_step_unless(None if found_inf is None else found_inf.bool())
        self.adamw.found_inf = found_inf
        self.adamw.step()
        return loss

    def _muon_step_unless(self, skip: Tensor | None) -> None:
        """`torch.optim.Muon`'s step (its iteration in `ns_dtype`), kept only where `skip` (a tensor on the
        device, or None: always) is False.

        Fused AdamW skips its update while `found_inf` is non-zero without a host read; Muon has no
        `found_inf` and updates each matrix and its momentum in place, so putting a skipped step back would
        need a copy of every matrix and momentum on every step. Instead each matrix's new momentum and
        weights are computed beside the old ones, with Muon's operations in Muon's order, and `torch.where`
        writes the new or the old values back on the device. The matrices of one shape are orthogonalised as
        one batch (`_orthogonalize_all`); a finite step is `torch.optim.Muon`'s, bit for bit, where the CPU's
        batched matrix products compute each matrix as its single product does (tests/test_optim.py holds
        them equal).
        """
        for group in self.muon.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], 1 - group["lr"] * group["weight_decay"]
            stepped, maps = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                new_buf = state["momentum_buffer"].lerp(grad, 1 - momentum)
                update = grad.lerp(new_buf, momentum) if group["nesterov"] else new_buf
                # A fused q/k/v matrix is three maps: each is orthogonalised, and its step sized, as a matrix
                # of its own, as if the model held three (what torch.optim.Muon does with each matrix it has).
                parts = update.chunk(3) if id(p) in self._qkv else (update,)
                stepped.append((p, state["momentum_buffer"], new_buf, len(parts)))
                maps += parts
            ns = group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
            orthogonal = iter(_orthogonalize_all(maps, *ns))
            for p, buf, new_buf, n in stepped:
                parts = [next(orthogonal) for _ in range(n)]
                update = parts[0] if n == 1 else torch.cat(parts)
                ratio = _lr_ratio(group["adjust_lr_fn"], parts[0].shape)
                new_p = p.mul(decay).add_(update, alpha=-lr * ratio)
                if skip is None:
                    buf.copy_(new_buf)
                    p.copy_(new_p)
                else:
                    torch.where(skip, buf, new_buf, out=buf)
                    torch.where(skip, p, new_p, out=p)


def _orthogonalize_all(
    matrices: list[Tensor], coefficients: tuple[float, float, float], steps: int, eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> list[Tensor]:
    """`_orthogonalize` of each of `matrices` (2-D), in their order: the matrices of one shape go through the
    iteration together, as one batch of matrix products. A Transformer holds several matrices of each shape,
    and a batched product of small matrices costs much less than as many single products (one call, one
    pass over the CPU's threads), while computing each matrix's product as a single product does."""
    out: list[Tensor | None] = [None] * len(matrices)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(tuple(sorted(m.shape)), []).append(i)
    for indices in by_shape.values():
        if len(indices) == 1:
            out[indices[0]] = _orthogonalize(matrices[indices[0]], coefficients, steps, eps, dtype)
            continue
        # Each matrix is normalised on its own, as `_orthogonalize` does: a batched norm may sum in another order.
        x = torch.stack([_normalized(matrices[i], eps, dtype) for i in indices])
        x = _newton_schulz(x, coefficients, steps)
        for i, y in zip(indices, x.unbind()):
            out[i] = y.mT if matrices[i].size(0) > matrices[i].size(1) else y
    return out


def _orthogonalize(
    m: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Muon's quintic Newton-Schulz iteration towards the nearest orthogonal matrix of `m` (2-D), in `dtype`:
    the iteration of `torch.optim.Muon` (Jordan et al., 2024), written out here because
    `MuonWithAdamW._muon_step_unless` needs Muon's update without Muon's in-place writes, in float32 where
    bfloat16 is emulated, and in batches (`_orthogonalize_all`)."""
    x = _newton_schulz(_normalized(m, eps, dtype), coefficients, steps)
    return x.T if m.size(0) > m.size(1) else x


def _normalized(m: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """`m` in `dtype`, wide (transposed where it has more rows than columns), scaled to a spectral norm of at
    most 1 by its Frobenius norm: where Muon's iteration starts."""
    x = m.to(dtype)
    if m.size(0) > m.size(1):
        x = x.T
    return x.div_(x.norm().clamp(min=eps))


def _newton_schulz(x: Tensor, coefficients: tuple[float, float, float], steps: int) -> Tensor:
    """Muon's quintic iteration on a wide matrix `x`, or on a batch of them (3-D)."""
    a, b, c = coefficients
    mm = torch.baddbmm if x.dim() == 3 else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's learning-rate scale for a matrix of `shape` (`torch.optim.Muon`'s ``adjust_lr_fn``)."""
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, A / B))
    return 0.2 * math.sqrt(max(A, B)) if adjust_lr_fn == "match_rms_adamw" else 1.0


def hidden_matrices(model: nn.Module) -> list[Tensor]:
    """Muon's share of a `GPT`: the 2-D weights that map hidden features, the Transformer blocks' attention
    and MLP matrices, the bigram table's projection and the adaptive softmax's cluster projections (which the
    tied adaptive input reads too); no table of rows (embeddings, the head's and the clusters' word vectors)."""
    matrices = list(model.transformer.h.parameters())
    if "bigram_proj" in model.transformer:
        matrices.append(model.transformer.bigram_proj.weight)
    if getattr(model, "adaptive", None) is not None:
        matrices += [projection.weight for projection, _ in model.adaptive.tail]
    return [p for p in matrices if p.requires_grad and p.dim() == 2]


def fused_qkv(model: nn.Module) -> list[Tensor]:
    """The attention layers' fused query/key/value matrices of a `GPT` (``c_attn``, rows [q; k; v]).

    They are three maps that share one matrix for speed; Muon orthogonalises each on its own
    (`MuonWithAdamW`'s ``qkv``), as Muon's authors advise for q, k and v, rather than the three as one map."""
    return [block.attn.c_attn.weight for block in model.transformer.h if block.attn.c_attn.weight.requires_grad]

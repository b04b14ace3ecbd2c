"""Muon for the Transformer's weight matrices with AdamW beside it, as one optimizer.

Muon (Jordan et al., 2024; ``torch.optim.Muon``) replaces each 2-D weight matrix's momentum by its
nearest orthogonal matrix (Newton-Schulz), so every direction of the matrix learns at the same
rate. It is meant for the hidden matrices only: embeddings, the output head, norms and biases keep
AdamW (modded-nanogpt, Moonlight). ``match_rms_adamw`` scales Muon's update to the size of an AdamW
update (Moonlight), so both halves share one learning rate and one schedule.

Lightning's automatic optimisation steps one optimizer, so ``MuonWithAdamW`` holds the two and shares
their parameter groups and state: a scheduler that writes ``group["lr"]`` drives both, and the usual
``state_dict`` / ``load_state_dict`` save and resume both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


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
        fused: bool | None = None,
    ):
        """
        Args:
            muon_params: 2-D weight matrices (Muon).
            adamw_groups: AdamW parameter groups (each may set its own ``weight_decay``).
            lr: learning rate of both (Muon's update is scaled to AdamW's size).
            weight_decay: Muon's decoupled weight decay (AdamW's comes with its groups).
            betas: AdamW's betas.
            momentum: Muon's (Nesterov) momentum.
            fused: AdamW's ``fused``.
        """
        self.muon = torch.optim.Muon(
            muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, fused=fused)
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
        if found_inf is None:
            self.muon.step()
        else:
            # Like fused AdamW, skip the update while found_inf is non-zero, without a host read: Muon has
            # no found_inf, so its matrices and momenta are put back where the step must not count.
            before = []
            for p in (p for g in self.muon.param_groups for p in g["params"] if p.grad is not None):
                buf = self.state[p].get("momentum_buffer")
                before.append((p, p.clone(), 0.0 if buf is None else buf.clone()))
            self.muon.step()
            skip = found_inf.bool()
            for p, old, old_buf in before:
                p.copy_(torch.where(skip, old, p))
                buf = self.state[p]["momentum_buffer"]
                buf.copy_(torch.where(skip, old_buf, buf))
        self.adamw.found_inf = found_inf
        self.adamw.step()
        return loss


def hidden_matrices(blocks: nn.Module) -> list[Tensor]:
    """The 2-D weights inside the Transformer ``blocks`` (attention and MLP matrices): Muon's share."""
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]

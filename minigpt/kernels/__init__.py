"""Optional fast paths, each beside the plain reference it must equal.

Nothing here is needed for correctness: the model (`minigpt/model.py`) and generation
(`minigpt/generation.py`) work with plain PyTorch alone. Each module names its plain reference, its test
and its benchmark, and is used only where that benchmark (or a one-time measurement) shows a gain:

- `minigpt.kernels.loss`: the training loss over a linear head (`fused_linear_nll_sum`), from tensors;
- `minigpt.kernels.decode_head`: the output head of one decoding step (`decode_head`, `PackedHead`), from
  tensors;
- `minigpt.kernels.decode_step`: the rest of a decoding step, the trunk for one new token (`decode_trunk`,
  `one_token_hidden`, which runs a `GPT`'s blocks from its modules) and the greedy pick (`greedy_pick`).
"""

"""Optional fast paths, each beside the plain reference it must equal.

Nothing here is needed for correctness: the model (`minigpt/model.py`) and generation
(`minigpt/generation.py`) work with plain PyTorch alone. Each module takes tensors, never a model,
names its plain reference, its test and its benchmark, and is used only where that benchmark shows a gain:

- `minigpt.kernels.loss`: the training loss over a linear head (`fused_linear_nll_sum`);
- `minigpt.kernels.decode_head`: the output head of one decoding step (`decode_head`, `PackedHead`).
"""

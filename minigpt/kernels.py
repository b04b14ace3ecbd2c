"""Optional fast paths, each beside the plain reference it must equal.

Nothing here is needed for correctness: the model (`minigpt/model.py`) and generation
(`minigpt/generation.py`) work with plain PyTorch alone. Each kernel below names its plain
counterpart, has a test holding it to that reference (forward, gradients, bf16 where it applies),
and a benchmark row showing where it wins; it is used only where that measurement says so.
"""

# -- training: the loss over a large linear head ------------------------------------------------------


# -- generation: the output head for one decoding step ------------------------------------------------

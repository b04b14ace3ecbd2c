"""minigpt: GPT-style causal language models trained on IMDB reviews with PyTorch Lightning.

The pure-torch pieces are importable without Lightning::

    from minigpt import GPT, GPTConfig, Vocab, generate
"""

from minigpt.config import GPTConfig
from minigpt.generation import generate, generate_text, stream
from minigpt.model import GPT, lm_loss
from minigpt.tokenizer import Vocab, basic_english

__all__ = ["GPT", "GPTConfig", "Vocab", "basic_english", "generate", "generate_text", "lm_loss", "stream"]
__version__ = "0.1.0"

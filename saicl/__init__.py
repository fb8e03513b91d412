"""saicl: Structured Attention for In-Context Learning on Hugging Face T5."""

from .version import __version__

__all__ = ["__version__"]

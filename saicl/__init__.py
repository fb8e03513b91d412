"""saicl: Structured Attention for In-Context Learning on Hugging Face T5.

Importing the package registers ``SAICLConfig`` / ``SAICLForConditionalGeneration`` with the
Hugging Face Auto classes (model_type ``"saicl"``).
"""

from transformers import AutoConfig, AutoModelForSeq2SeqLM

from .configuration_saicl import SAICLConfig
from .modeling_saicl import SAICLEncoderOutput, SAICLForConditionalGeneration
from .processing import ICLProcessor, TruncationReport
from .structures import STRUCTURES, get_structure
from .version import __version__

AutoConfig.register("saicl", SAICLConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(SAICLConfig, SAICLForConditionalGeneration, exist_ok=True)

__all__ = [
    "ICLProcessor",
    "SAICLConfig",
    "SAICLEncoderOutput",
    "SAICLForConditionalGeneration",
    "STRUCTURES",
    "TruncationReport",
    "__version__",
    "get_structure",
]

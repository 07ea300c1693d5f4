"""Conversion of softmax checkpoints into power models, and recovery of their quality.

* ``power-convert SOURCE OUTPUT`` (``python -m power_transformers.convert_scripts``): see ``convert.py``.
* ``power-recover``: attention transfer + fine-tuning with held-out perplexity (``recover.py``).
* ``power-demo``: converts the embedded SmolLM2-135M-Instruct and generates (``demo.py``).
"""

from .convert import (
    ARCHITECTURES,
    ConversionError,
    convert_checkpoint,
    convert_model,
    power_config_for,
)

__all__ = ["ARCHITECTURES", "ConversionError", "convert_checkpoint", "convert_model", "power_config_for"]

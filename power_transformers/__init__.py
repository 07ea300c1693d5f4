"""power-transformers: power attention (arXiv 2507.04239) as a Hugging Face Transformers model family.

Importing the package registers PowerConfig ("power"), PowerModel and PowerForCausalLM with
AutoConfig, AutoModel and AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_power import PowerCache, PowerStateLayer
from .configuration_power import PowerConfig
from .modeling_power import PowerForCausalLM, PowerModel, PowerPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(PowerConfig.model_type, PowerConfig, exist_ok=True)
AutoModel.register(PowerConfig, PowerModel, exist_ok=True)
AutoModelForCausalLM.register(PowerConfig, PowerForCausalLM, exist_ok=True)

__all__ = ["PowerCache", "PowerConfig", "PowerForCausalLM", "PowerModel", "PowerPreTrainedModel", "PowerStateLayer"]

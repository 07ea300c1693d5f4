"""Small models shared by the tests."""

import torch

from power_transformers import PowerConfig, PowerForCausalLM


def tiny_config(**overrides) -> PowerConfig:
    settings = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, chunk_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    settings.update(overrides)
    return PowerConfig(**settings)


HYBRID = ["linear_attention", "full_attention", "linear_attention"]


def tiny_model(seed: int = 0, **overrides) -> PowerForCausalLM:
    torch.manual_seed(seed)
    model = PowerForCausalLM(tiny_config(**overrides)).eval()
    # Random gate biases so that gating matters in every test (the init makes all gates ~0.98).
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "g_proj"):
                layer.self_attn.g_proj.bias.uniform_(-1.0, 3.0)
    return model

import pytest

from power_transformers import PowerConfig
from transformers import AutoConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(degree=3), "degree"),
        (dict(degree=0), "degree"),
        (dict(degree=-2), "degree"),
        (dict(num_attention_heads=12, num_key_value_heads=5), "num_key_value_heads"),
        (dict(num_hidden_layers=2, layer_types=["linear_attention"]), "layer_types"),
        (dict(num_hidden_layers=2, layer_types=["linear_attention", "power"]), "layer_types"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(norm_type="batch_norm"), "norm_type"),
        (dict(attention_backend="cuda"), "attention_backend"),
        (dict(keep_chunk_states="yes"), "keep_chunk_states"),
    ],
)
def test_invalid_values_raise_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PowerConfig(**kwargs)


def test_defaults_and_round_trip(tmp_path):
    config = PowerConfig(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2, rope_theta=5e5, degree=4)
    assert config.head_dim == 64 and config.num_key_value_heads == 12
    assert PowerConfig().layer_types == ["linear_attention"] * 12
    assert PowerConfig().chunk_size is None  # the kernels' own choice (triton_chunk.default_chunk)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is PowerConfig
    assert loaded.layer_types == config.layer_types and loaded.degree == 4
    assert loaded.rope_parameters["rope_theta"] == 5e5

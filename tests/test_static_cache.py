"""The static PowerCache: fixed buffers updated in place, same tokens as the dynamic path, compilable."""

import pytest
import torch

from power_transformers import PowerCache
from power_transformers.compat import CACHE_NAME

from helpers import HYBRID, tiny_model


def left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("layer_types", [None, HYBRID])
@pytest.mark.parametrize("padded", [False, True])
def test_static_and_dynamic_greedy_give_identical_tokens(layer_types, padded):
    model = tiny_model(layer_types=layer_types)
    prompts = [torch.randint(3, 97, (n,)) for n in ((5, 12) if padded else (9, 9))]
    ids, mask = left_padded(prompts)
    options = dict(attention_mask=mask, max_new_tokens=25, min_new_tokens=25, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **options)
    static = model.generate(ids, cache_implementation="static", **options)
    assert torch.equal(static, dynamic)


def storage(layer):
    """The addresses of a layer's buffers: state and tail (power) or keys and values (softmax)."""
    if hasattr(layer, "decode_state"):
        return [x.data_ptr() for x in layer.decode_state]
    return [layer.keys.data_ptr(), layer.values.data_ptr()]


def test_static_buffers_keep_their_storage_across_steps():
    """20 decode steps cross several folds of the tail (4 tokens in the tests) into the state."""
    model = tiny_model(layer_types=HYBRID)
    cache = PowerCache(model.config, max_cache_len=40)
    ids = torch.randint(3, 97, (2, 30))
    with torch.no_grad():
        model(ids[:, :10], **{CACHE_NAME: cache}, use_cache=True)
        pointers = [storage(layer) for layer in cache.layers]
        position = cache.position.data_ptr()
        stepped = [model(ids[:, t : t + 1], **{CACHE_NAME: cache}, use_cache=True).logits for t in range(10, 30)]
        after = [storage(layer) for layer in cache.layers]
        assert after == pointers and cache.position.data_ptr() == position
        assert cache.get_seq_length() == 30
        full = model(ids, use_cache=False).logits[:, 10:]
    torch.testing.assert_close(torch.cat(stepped, 1), full, rtol=1e-4, atol=1e-4)


def test_static_beam_search_and_sampling():
    model = tiny_model(layer_types=HYBRID)
    ids = torch.randint(3, 97, (2, 7))
    beams = dict(max_new_tokens=10, num_beams=3, pad_token_id=0)
    assert torch.equal(model.generate(ids, cache_implementation="static", **beams), model.generate(ids, **beams))
    # Sampling on the static path reproduces the dynamic path's draws from the same seed.
    sampled = []
    for implementation in ("static", None):
        torch.manual_seed(0)
        sampled.append(model.generate(ids, cache_implementation=implementation, do_sample=True, max_new_tokens=10, pad_token_id=0))
    assert torch.equal(sampled[0], sampled[1])


def test_a_static_cache_too_small_raises_before_the_first_step():
    model = tiny_model(layer_types=HYBRID)
    cache = PowerCache(model.config, max_cache_len=12)
    ids = torch.randint(3, 97, (1, 8))
    with pytest.raises(ValueError, match="max_cache_len"):
        model.generate(ids, max_new_tokens=10, pad_token_id=0, **{CACHE_NAME: cache})
    assert cache.position is None  # nothing was written
    with pytest.raises(ValueError, match="holds 12 tokens"):
        model(torch.randint(3, 97, (1, 13)), **{CACHE_NAME: cache}, use_cache=True)


def test_power_only_static_cache_has_no_length_limit():
    model = tiny_model()
    cache = PowerCache(model.config, max_cache_len=4)
    out = model.generate(torch.randint(3, 97, (1, 8)), max_new_tokens=10, min_new_tokens=10, pad_token_id=0, **{CACHE_NAME: cache})
    assert out.shape[1] == 18


def test_decode_step_compiles_fullgraph_with_inductor():
    torch._dynamo.reset()
    model = tiny_model(layer_types=HYBRID, num_hidden_layers=3)
    cache = PowerCache(model.config, max_cache_len=32)
    ids = torch.randint(3, 97, (2, 12))
    with torch.no_grad():
        model(ids[:, :8], **{CACHE_NAME: cache}, use_cache=True)

        def step(token, position_ids):
            return model(token, position_ids=position_ids, **{CACHE_NAME: cache}, use_cache=True).logits

        compiled = torch.compile(step, fullgraph=True, backend="inductor")
        logits = [compiled(ids[:, t : t + 1], torch.full((2, 1), t)) for t in range(8, 12)]
        full = model(ids, use_cache=False).logits[:, 8:]
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)

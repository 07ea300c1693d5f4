"""PowerModel / PowerForCausalLM: registration, save/load, cache equivalence, padding, generation."""

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, pipeline

from power_transformers import PowerCache, PowerForCausalLM, PowerModel
from power_transformers.compat import CACHE_NAME

from helpers import HYBRID, tiny_model


def test_auto_classes_are_registered():
    model = tiny_model()
    assert type(AutoModelForCausalLM.from_config(model.config)) is PowerForCausalLM
    assert type(AutoModel.from_config(model.config)) is PowerModel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_in_a_fresh_process(tmp_path, dtype):
    model = tiny_model(layer_types=HYBRID)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ids = torch.randint(3, 97, (2, 19))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        if dtype == torch.float32:
            expected = model(ids).logits
        else:  # the same weights in bf16 (RoPE tables stay fp32, as from_pretrained keeps them)
            expected = PowerForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()(ids).logits
            assert expected.dtype == dtype
            torch.testing.assert_close(expected.float(), model(ids).logits, rtol=0.1, atol=0.1)
        torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, power_transformers
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, dtype={dtype}).eval()
        assert type(model).__name__ == "PowerForCausalLM", type(model)
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / 'ids.pt')!r})).logits
        assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r})), (logits - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max()
        print("same")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "same" in result.stdout, result.stderr[-3000:]


def run_token_by_token(model, ids, prefill):
    cache = PowerCache(model.config)
    logits = [model(ids[:, :prefill], **{CACHE_NAME: cache}, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], **{CACHE_NAME: cache}, use_cache=True).logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("layer_types", [None, HYBRID])
@pytest.mark.parametrize("prefill", [1, 5, 19])  # shorter and longer than chunk_size = 8
def test_decoding_token_by_token_equals_full_forward(layer_types, prefill):
    model = tiny_model(layer_types=layer_types)
    ids = torch.randint(3, 97, (2, 27))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        stepped, cache = run_token_by_token(model, ids, prefill)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 27


@pytest.mark.parametrize("layer_types", [None, HYBRID])
def test_a_block_of_tokens_after_decoding_continues_the_sequence(layer_types):
    """Prefill, one token at a time (the tail folds every 4 tokens in the tests, and 2 stay in
    it), a block of 8 (which folds the pending tail first), then one at a time again."""
    model = tiny_model(layer_types=layer_types)
    ids = torch.randint(3, 97, (2, 27))
    cache = PowerCache(model.config)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        logits = [model(ids[:, :5], **{CACHE_NAME: cache}, use_cache=True).logits]
        logits += [model(ids[:, t : t + 1], **{CACHE_NAME: cache}, use_cache=True).logits for t in range(5, 11)]
        logits.append(model(ids[:, 11:19], **{CACHE_NAME: cache}, use_cache=True).logits)
        logits += [model(ids[:, t : t + 1], **{CACHE_NAME: cache}, use_cache=True).logits for t in range(19, 27)]
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer_types", [None, HYBRID])
def test_left_padded_rows_match_their_unpadded_selves(layer_types):
    model = tiny_model(layer_types=layer_types)
    lengths = [13, 7, 10]
    rows = [torch.randint(3, 97, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batched[i, width - len(row) :], alone, rtol=1e-4, atol=1e-4)


def test_padding_adds_nothing_to_the_state():
    model = tiny_model()
    row = torch.randint(3, 97, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        _, plain = run_token_by_token(model, row, 9)
        cache = PowerCache(model.config)
        model(padded, attention_mask=mask, **{CACHE_NAME: cache}, use_cache=True)
    for a, b in zip(plain.layers, cache.layers):
        torch.testing.assert_close(b.state_s, a.state_s, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.state_z, a.state_z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_types", [None, HYBRID])
def test_generate_greedy_matches_batched_left_padding(layer_types):
    model = tiny_model(layer_types=layer_types)
    prompts = [torch.randint(3, 97, (n,)) for n in (6, 11)]
    alone = [model.generate(p[None], max_new_tokens=20, do_sample=False, pad_token_id=0)[0, len(p) :] for p in prompts]
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 11 - len(p) :], mask[i, 11 - len(p) :] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)[:, 11:]
    for i in range(2):
        n = len(alone[i])
        assert torch.equal(batched[i, :n], alone[i])


def test_generate_past_chunk_size_equals_full_forward_argmax():
    """Greedy tokens from the cache equal the argmax of a cache-free forward over the same text."""
    model = tiny_model()
    prompt = torch.randint(3, 97, (1, 10))
    out = model.generate(prompt, max_new_tokens=30, do_sample=False, min_new_tokens=30, pad_token_id=0)
    with torch.no_grad():
        logits = model(out[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, 9:].argmax(-1), out[0, 10:])


def test_sampling_and_beam_search():
    model = tiny_model(layer_types=HYBRID)
    prompt = torch.randint(3, 97, (2, 5))
    # Sampling runs through the cache like greedy: with top_k=1 it must pick the greedy tokens.
    greedy = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=1, pad_token_id=0), greedy)
    beams = model.generate(prompt, max_new_tokens=12, num_beams=4, num_return_sequences=2, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert beams.sequences.shape[0] == 4
    # The beam's score equals the log-probability a cache-free forward gives its tokens.
    seq = beams.sequences[0:1]
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[:, :-1], use_cache=False).logits.float(), -1)
    generated = seq[0, 5:]
    n = int((generated != 0).sum())  # stop at padding after EOS
    total = logp[0, 4 : 4 + n].gather(-1, generated[:n, None]).sum()
    torch.testing.assert_close(beams.sequences_scores[0] * n, total, rtol=1e-3, atol=1e-3)


def test_reorder_cache_moves_states():
    model = tiny_model()
    ids = torch.randint(3, 97, (3, 9))
    cache = PowerCache(model.config)
    with torch.no_grad():
        model(ids, **{CACHE_NAME: cache}, use_cache=True)
        model(ids[:, :2], **{CACHE_NAME: cache}, use_cache=True)  # a few tokens
        for t in range(2, 5):
            model(ids[:, t : t + 1], **{CACHE_NAME: cache}, use_cache=True)  # three left in the tail
    before = [x.clone() for x in cache.layers[0].decode_state]
    pointers = [x.data_ptr() for x in cache.layers[0].decode_state]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    after = cache.layers[0].decode_state
    assert [x.data_ptr() for x in after] == pointers
    for x, old in zip(after, before):  # the state and every part of the tail
        assert torch.equal(x[0], old[2]) and torch.equal(x[1], old[0]) and torch.equal(x[2], old[0])


def test_a_state_is_not_replaced_under_a_pending_tail():
    """Decode steps leave tokens in a power layer's tail; set_state before `state` folded them would
    drop them, so it raises. Reading `state` folds the tail, and then set_state works."""
    model = tiny_model()
    ids = torch.randint(3, 97, (2, 6))
    cache = PowerCache(model.config)
    with torch.no_grad():
        model(ids[:, :4], **{CACHE_NAME: cache}, use_cache=True)
        model(ids[:, 4:5], **{CACHE_NAME: cache}, use_cache=True)  # one token into the tail
    layer = cache.layers[0]
    assert layer.tail_pending and layer.get_seq_length() == 5
    with pytest.raises(RuntimeError, match="decode tail"):
        layer.set_state((layer.state_s.clone(), layer.state_z.clone()), 1)
    s, z = layer.state  # folds the tail
    assert not layer.tail_pending and int(layer.tail_len.max()) == 0
    layer.set_state((s.clone(), z.clone()), 1)
    assert layer.get_seq_length() == 6


def test_pipeline_text_generation(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    model = tiny_model(vocab_size=len(vocab))
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("abc", max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert text.startswith("abc") and len(text) > 3


def test_cache_memory_does_not_grow_with_context():
    model = tiny_model()
    sizes = {}
    for n in (100, 5000):
        cache = PowerCache(model.config)
        with torch.no_grad():
            model(torch.randint(3, 97, (1, n)), **{CACHE_NAME: cache}, use_cache=True)
            model(torch.randint(3, 97, (1, 1)), **{CACHE_NAME: cache}, use_cache=True)
        sizes[n] = cache.nbytes()
    assert sizes[100] == sizes[5000] == cache.power_state_bytes_per_row() > 0


def test_operations_a_state_cannot_honour_raise():
    model = tiny_model()
    cache = PowerCache(model.config)
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 6)), **{CACHE_NAME: cache}, use_cache=True)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(3)
    draft = tiny_model(seed=1)
    with pytest.raises(ValueError, match="stateful|assisted"):
        model.generate(torch.randint(3, 97, (1, 6)), assistant_model=draft, max_new_tokens=4)
    with pytest.raises(TypeError, match="PowerCache"):
        from transformers import DynamicCache

        model(torch.randint(3, 97, (1, 6)), **{CACHE_NAME: DynamicCache()}, use_cache=True)


def test_loss_hidden_states_tuple_and_num_items_in_batch():
    model = tiny_model()
    ids = torch.randint(3, 97, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    logits = out.logits[:, :-1].reshape(-1, 97)
    target = labels[:, 1:].reshape(-1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, target, ignore_index=-100))
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(5)).loss
    torch.testing.assert_close(summed, torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum") / 5)
    as_tuple = model(ids, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(layer_types=HYBRID).train()
        if checkpointing:
            # renamed in 5.2x; the old name stays until v6
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(1))
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_gpt2_style_options_run():
    model = tiny_model(norm_type="layer_norm", mlp_type="plain", position_embedding_type="learned", hidden_act="gelu_new",
                       attention_bias=True, mlp_bias=True, qk_norm=True, max_position_embeddings=64)
    ids = torch.randint(3, 97, (2, 20))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        stepped, _ = run_token_by_token(model, ids, 9)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


def test_autocast_hands_the_kernels_one_dtype(monkeypatch):
    """Under bf16 autocast (Trainer(bf16=True)) q, k and v must reach the kernels in one dtype."""
    import power_transformers.modeling_power as modeling

    seen = []
    original = modeling.power_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(modeling, "power_attention", recording)
    model = tiny_model().train()
    ids = torch.randint(3, 97, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen)

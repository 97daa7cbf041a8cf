"""Batched per-example LoRA gradients against the batch-size-1 loss.backward() reference."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gist_core.data import IGNORE_INDEX, Encoded
from gist_core.gradients import (
    full_gradients,
    length_batches,
    projected_gradients,
    reference_gradients,
    repeated_layers,
    trainable_linears,
)
from gist_core.modeling import attach_lora


def _examples(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 24, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(2, length - 2, (1,), generator=g))
        out.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:], False))
    return out


def _llama(kv_heads):
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return attach_lora(
        LlamaForCausalLM(cfg),
        r=4,
        alpha=16,
        dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        seed=0,
    )


def _gpt2():
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return attach_lora(GPT2LMHeadModel(cfg), r=4, alpha=16, dropout=0.1, target_modules=["c_attn", "c_proj"], seed=0)


def _perturb_lora(model):
    # LoRA B starts at zero (so dL/dA = 0): give every LoRA weight a value, as after warmup.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize(
    "make", [lambda: _llama(4), lambda: _llama(2), _gpt2], ids=["llama", "llama-gqa", "gpt2-c_attn"]
)
def test_batched_equals_batch_size_one(make):
    model = make()
    _perturb_lora(model)
    examples = _examples(13, 97)
    ref = reference_gradients(model, examples)
    layout, _ = trainable_linears(model)
    assert ref.shape == (13, layout.dim)
    # A small token budget forces several length-sorted batches with padding.
    ours, losses = full_gradients(model, examples, max_tokens=80)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(losses))

    basis = torch.randn(layout.dim, 5, generator=torch.Generator().manual_seed(3))
    z, norms, _, stats = projected_gradients(model, examples, basis, max_tokens=80)
    np.testing.assert_allclose(z, ref @ basis.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norms, np.linalg.norm(ref, axis=1), rtol=1e-5)
    assert stats.examples == 13 and stats.completion_only_logits

    # Gradient checkpointing: each decoder layer runs again in the backward pass
    # (seen from a module inside it), the gradients do not change.
    layers = repeated_layers(model)
    inner = next(iter(layers[0].children()))
    calls = []
    handle = inner.register_forward_hook(lambda *a: calls.append(1))
    full_gradients(model, examples, max_tokens=80)
    plain_calls = len(calls)
    calls.clear()
    ours_ckpt, _ = full_gradients(model, examples, max_tokens=80, gradient_checkpointing=True)
    handle.remove()
    assert len(calls) == plain_calls + len(list(length_batches(examples, 80)))
    np.testing.assert_allclose(ours_ckpt, ref, rtol=1e-4, atol=1e-6)
    assert not hasattr(layers[0], "__dict__") or "forward" not in layers[0].__dict__  # unwrapped again


class _ScaledLogitsLlama(LlamaForCausalLM):
    """Post-processes its logits, as soft-capping models do: the output layer alone is not the model."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_model_that_post_processes_logits_gets_full_logits():
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = attach_lora(
        _ScaledLogitsLlama(cfg), r=4, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0
    )
    _perturb_lora(model)
    examples = _examples(5, 97)
    ref = reference_gradients(model, examples)
    basis = torch.randn(ref.shape[1], 3, generator=torch.Generator().manual_seed(3))
    z, _, losses, stats = projected_gradients(model, examples, basis, max_tokens=80)
    assert not stats.completion_only_logits
    np.testing.assert_allclose(z, ref @ basis.numpy(), rtol=1e-4, atol=1e-5)


def test_projection_rejects_basis_of_wrong_size():
    model = _llama(4)
    with pytest.raises(ValueError, match="built for another adapter"):
        projected_gradients(model, _examples(2, 97), torch.zeros(7, 2))


def test_example_without_completion_tokens_is_refused():
    model = _llama(4)
    bad = [Encoded([5, 6, 7], [IGNORE_INDEX] * 3, True)]
    with pytest.raises(ValueError, match="no completion tokens"):
        full_gradients(model, bad)


def test_checkpointing_finds_decoder_layers_and_restores_an_existing_forward():
    model = _llama(4)
    _perturb_lora(model)
    layers = repeated_layers(model)
    assert layers is model.get_base_model().model.layers
    # A wrapper already on the instance (as accelerate's hooks install) is put back afterwards.
    original = layers[1].forward
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layers[1].forward = wrapped
    examples = _examples(4, 97)
    ours, _ = full_gradients(model, examples, max_tokens=80, gradient_checkpointing=True)
    assert layers[1].__dict__["forward"] is wrapped and calls
    np.testing.assert_allclose(ours, reference_gradients(model, examples), rtol=1e-4, atol=1e-6)

"""Length batching: the DP split keeps the budget, is optimal, and pads little on real pools."""

import itertools
import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gist_core.data import IGNORE_INDEX, Encoded, encode_messages, tulu_segments
from gist_core.gradients import (
    batch_bounds,
    greedy_length_batches,
    length_batches,
    padding_share,
    projected_gradients,
    reference_gradients,
)
from gist_core.modeling import attach_lora
from gist_demo import synthetic, tiny_model


def _lognormal_pool(n, seed=0, median=80, sigma=0.9, cap=2048):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), sigma, n).astype(int), 4, cap)
    return [
        Encoded(list(range(3, n + 3)), [IGNORE_INDEX] * (n // 2) + list(range(3, n - n // 2 + 3)), False)
        for n in lengths
    ]


def _padding(batches):
    batches = list(batches)
    real = sum(b.n_tokens for b in batches)
    return 1 - real / sum(b.input_ids.numel() for b in batches)


def _check_split(lengths, ends, max_tokens, max_batch_size):
    assert ends[-1] == len(lengths) and all(a < b for a, b in zip([0, *ends], ends, strict=False))
    for b, e in zip([0, *ends[:-1]], ends, strict=True):
        size = e - b
        assert size <= max_batch_size
        assert size * lengths[e - 1] <= max_tokens or size == 1, (size, lengths[e - 1])


@pytest.mark.parametrize("seed", range(20))
def test_split_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    max_tokens, max_batch_size = rng.choice([64, 300, 4096]), rng.choice([1, 4, 64])
    lengths = sorted(rng.choice([rng.randint(1, 40), rng.randint(1, 600)]) for _ in range(rng.randint(1, 300)))
    for overhead, cap in [(0, None), (128, None), (128, 0.05), (10_000, None)]:
        ends = batch_bounds(lengths, max_tokens, max_batch_size, overhead, cap)
        _check_split(lengths, ends, max_tokens, max_batch_size)
        if cap is not None:
            assert padding_share(lengths, ends) <= cap


def test_split_is_the_cheapest_contiguous_split():
    rng = random.Random(3)
    for _ in range(30):
        lengths = sorted(rng.randint(1, 30) for _ in range(rng.randint(1, 9)))
        max_tokens, max_batch_size, overhead = rng.choice([20, 60]), rng.choice([2, 5]), rng.choice([0, 7, 40])

        def cost(ends, lengths=lengths, overhead=overhead):
            return sum((e - b) * lengths[e - 1] + overhead for b, e in zip([0, *ends[:-1]], ends, strict=True))

        n, best = len(lengths), None
        for cuts in itertools.product([False, True], repeat=n - 1):
            ends = [i + 1 for i, c in enumerate(cuts) if c] + [n]
            ok = all(
                e - b <= max_batch_size and ((e - b) * lengths[e - 1] <= max_tokens or e - b == 1)
                for b, e in zip([0, *ends[:-1]], ends, strict=True)
            )
            if ok and (best is None or cost(ends) < best):
                best = cost(ends)
        assert cost(batch_bounds(lengths, max_tokens, max_batch_size, overhead, None)) == best


def test_padding_under_5_percent_on_the_embedded_and_a_long_tailed_pool():
    texts = ["".join(s for s, _ in tulu_segments(c, tiny_model.EOS)) for c in synthetic.pretraining_corpus()]
    tokenizer = tiny_model.train_bpe_tokenizer(texts, vocab_size=2048)
    embedded = [encode_messages(tokenizer, r["messages"], 256) for r in synthetic.generate_pool(1000, seed=0)]
    long_tailed = _lognormal_pool(1000)
    for pool in (embedded, long_tailed):
        greedy, ours = _padding(greedy_length_batches(pool, 4096, 64)), _padding(length_batches(pool, 4096, 64))
        assert ours < 0.05 and ours < greedy
        for b in length_batches(pool, 4096, 64):
            assert b.input_ids.numel() <= 4096 or len(b.indices) == 1


def test_exact_against_batch_size_one_on_long_tailed_lengths():
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = attach_lora(LlamaForCausalLM(cfg), r=4, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(5)
    examples = []
    for e in _lognormal_pool(24, seed=1, median=12, sigma=0.8, cap=120):
        n = len(e.input_ids)
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        examples.append(Encoded(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2 :], False))
    ref = reference_gradients(model, examples)
    basis = torch.randn(ref.shape[1], 4, generator=torch.Generator().manual_seed(3))
    z, norms, _, stats = projected_gradients(model, examples, basis, max_tokens=200, max_batch_size=8)
    assert stats.batches > 1 and 0 <= stats.padding_share < 0.05
    np.testing.assert_allclose(z, ref @ basis.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norms, np.linalg.norm(ref, axis=1), rtol=1e-5)

"""Held-out loss and multiple-choice accuracy (gist_core.evaluate) on a tiny model."""

import random

import numpy as np
import pytest
import torch

from gist_core.data import IGNORE_INDEX, encode_prompt_completion
from gist_core.evaluate import (
    FinetuneSpec,
    evaluate_heldout,
    finetune_and_evaluate_many,
    multiple_choice_options,
    option_completion,
    option_log_probs,
    prepare_heldout,
)
from gist_core.warmup import LoraTrainConfig, mean_completion_loss
from gist_demo import tiny_model

CPU = torch.device("cpu")
SUBJECTS = ["algebra", "biology", "history", "physics", "chemistry", "geography"]


def _mc_examples(n, seed, letters="ABCD"):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        subject = rng.choice(SUBJECTS)
        choices = " ".join(f"{c}. {rng.choice(SUBJECTS)}{rng.randint(0, 99)}" for c in letters)
        prompt = (
            f"<|user|>\nThe following is a question about {subject}.\nQuestion {i}: which one? "
            f"{choices}\n<|assistant|>\nThe answer is:"
        )
        out.append((prompt, " " + rng.choice(letters)))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from threads, and lose much when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(one_thread):
    texts = [p + c for p, c in _mc_examples(200, 0, "ABCDEF")] + ["plain text answer 12 + 30 = 42"] * 20
    tok = tiny_model.train_bpe_tokenizer(texts, vocab_size=300)
    spec = tiny_model.TinyLlamaSpec(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64)
    model = tiny_model.tiny_llama(len(tok), spec, tok, seed=0)
    with torch.no_grad():  # tied embeddings of std 0.02 keep a random model's logits near uniform
        model.get_input_embeddings().weight.mul_(25)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def load_base():
        m = tiny_model.tiny_llama(len(tok), spec, tok, seed=0)
        m.load_state_dict(state)
        return m.eval()

    return tok, load_base


def test_multiple_choice_detection():
    assert multiple_choice_options([" A", " C", "B\n"]) == list("ABCD")
    assert multiple_choice_options([" A", " F"]) == list("ABCDEF")
    assert multiple_choice_options([" J"]) == list("ABCDEFGHIJ")
    for not_mc in ([" A", " AB"], [" a"], [" K"], [" 42"], [" A", ""], []):
        assert multiple_choice_options(not_mc) is None, not_mc
    assert option_completion(" A", "B") == " B"
    assert option_completion("C\n", "A") == "A\n"
    assert option_completion("  D ", "J") == "  J "


def _explicit_option_logp(model, tok, prompt, completion, letter, max_length):
    """Batch size 1, plain log_softmax and a per-token loop."""
    enc = encode_prompt_completion(tok, prompt, option_completion(completion, letter), max_length)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    total = 0.0
    for t in range(1, len(enc.input_ids)):
        if enc.labels[t] != IGNORE_INDEX:
            total += float(logp[t - 1, enc.labels[t]])
    return total


def test_accuracy_matches_explicit_per_option_loop(tiny):
    tok, load_base = tiny
    model = load_base()
    torch.manual_seed(3)
    with torch.no_grad():  # a random model would tie often; perturb so options differ clearly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    examples = _mc_examples(23, seed=1, letters="ABCDE")
    held = prepare_heldout(tok, [p for p, _ in examples], [c for _, c in examples], max_length=128)
    assert held.options == list("ABCDE") and len(held) == 23
    # A small token budget forces several padded, length-sorted batches.
    got = option_log_probs(model, held, CPU, pad_id=tok.pad_token_id, max_tokens=200)
    expected = np.array(
        [[_explicit_option_logp(model, tok, p, c, letter, 128) for letter in held.options] for p, c in examples]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    answers = ["ABCDE".index(c.strip()) for _, c in examples]
    explicit_accuracy = float(np.mean([int(np.argmax(row)) == a for row, a in zip(expected, answers, strict=False)]))
    result = evaluate_heldout(model, held, CPU, pad_id=tok.pad_token_id, max_tokens=200)
    assert result["accuracy"] == pytest.approx(explicit_accuracy)
    # The loss is the same mean-over-examples of mean completion-token loss as before.
    assert result["heldout_loss"] == pytest.approx(
        mean_completion_loss(model, held.encoded, CPU, pad_id=tok.pad_token_id), rel=1e-5
    )
    assert result["heldout_examples"] == 23


def test_non_multiple_choice_has_no_accuracy(tiny):
    tok, load_base = tiny
    held = prepare_heldout(tok, ["<|user|>\n12 + 30 =\n<|assistant|>\n"] * 3, ["42", "42 ", "forty-two"], 128)
    assert not held.is_multiple_choice
    result = evaluate_heldout(load_base(), held, CPU, pad_id=tok.pad_token_id)
    assert result["accuracy"] is None and np.isfinite(result["heldout_loss"])


def test_no_heldout_examples_is_a_clear_error(tiny):
    tok, _ = tiny
    with pytest.raises(ValueError, match="heldout_fraction > 0"):
        prepare_heldout(tok, [], [], 128)


def test_always_b_model_scores_share_of_b(tiny):
    tok, load_base = tiny
    train = [encode_prompt_completion(tok, p, " B", 128) for p, _ in _mc_examples(48, seed=2)]
    examples = _mc_examples(20, seed=3)
    held_mc = prepare_heldout(tok, [p for p, _ in examples], [c for _, c in examples], 128)
    held_text = prepare_heldout(tok, ["<|user|>\n12 + 30 =\n<|assistant|>\n"], ["42"], 128)
    spec = FinetuneSpec(
        lora_r=8,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        train=LoraTrainConfig(epochs=6, learning_rate=1e-2, effective_batch_size=16, micro_batch_size=16, seed=0),
    )
    # One fine-tune, judged on two held-out sets at once.
    out = finetune_and_evaluate_many(
        load_base, train, {"mc": held_mc, "text": held_text}, spec, CPU, pad_id=tok.pad_token_id
    )
    share_b = sum(c.strip() == "B" for _, c in examples) / len(examples)
    assert 0 < share_b < 1
    assert out["mc"]["accuracy"] == pytest.approx(share_b)
    assert out["mc"]["train_examples"] == 48 and out["text"]["accuracy"] is None

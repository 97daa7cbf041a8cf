"""The embedded default model: a byte-level BPE tokenizer and a small Llama, pretrained on the fixed
corpus of ``gist_demo.synthetic`` (never on the pool), so the whole graph runs offline on a laptop CPU."""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gist_core import data, modeling
from gist_core.data import Encoded, encode_messages, tulu_segments
from gist_core.modeling import causal_lm_batches, seed_everything

from . import synthetic

CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SHIPPED_MODEL_DIR = Path(__file__).parent / "default_model"
EOS = "</s>"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 2048):
    """Byte-level BPE tokenizer trained on ``texts``; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", EOS, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token=EOS,
        pad_token="<pad>",
        additional_special_tokens=CHAT_TOKENS,
        model_max_length=4096,
    )


@dataclass
class TinyLlamaSpec:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate_size: int = 352
    max_positions: int = 256


def tiny_llama(vocab_size: int, spec: TinyLlamaSpec, tokenizer=None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretrain(
    model: nn.Module,
    encoded: Sequence[Encoded],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Plain causal-LM training of the base model; bounded by a step count (deterministic)."""
    seed_everything(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    while len(losses) < steps:
        for ids, mask, labels in causal_lm_batches(encoded, batch_size, rng, pad_id):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) % 50 == 0 or len(losses) == steps:
                rate = len(losses) / (time.perf_counter() - start)
                log(f"pretrain step {len(losses)}/{steps} loss {loss.item():.3f} ({rate:.1f} steps/s)")
            if len(losses) >= steps:
                break
    model.eval()
    return losses


@dataclass
class EmbeddedModel:
    model: Any  # a transformers LlamaForCausalLM
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    pretrain_losses: list[float]
    key: str  # embedded_model_key of its settings
    made: str = "pretrained on this machine"

    @property
    def facts(self) -> dict:
        """What is kept beside the saved model: its key, how it was made, its pretraining losses and size."""
        return {
            "key": self.key,
            "made": self.made,
            "pretrain_losses": self.pretrain_losses,
            "summary": modeling.model_summary(self.model),
        }


def corpus_texts() -> list[str]:
    """The pretraining corpus as the tokenizer sees it (Tulu chat format)."""
    return ["".join(seg for seg, _ in tulu_segments(c, EOS)) for c in synthetic.pretraining_corpus()]


def embedded_model_key(
    spec: TinyLlamaSpec, vocab_size: int, max_length: int, steps: int, batch_size: int, learning_rate: float, seed: int
) -> str:
    """What the embedded model is made from, as a hash: its settings, the corpus text and the code that trains
    it. Two builds of one key are the same model (up to the float rounding of the torch build), so a built one
    is reused."""
    code = [inspect.getsource(f) for f in TRAINING_CODE]
    made_of = {
        "spec": asdict(spec),
        "settings": [vocab_size, max_length, steps, batch_size, learning_rate, seed],
        "corpus": hashlib.sha256("\x00".join(corpus_texts()).encode()).hexdigest(),
        "code": hashlib.sha256("".join(code).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:24]


# The code whose change makes another model of the same settings.
TRAINING_CODE = (
    train_bpe_tokenizer,
    TinyLlamaSpec,
    tiny_llama,
    pretrain,
    corpus_texts,
    data.tulu_segments,
    data.encode_segments,
    data.encode_messages,
    seed_everything,
    causal_lm_batches,
)


def shipped_model(key: str) -> EmbeddedModel | None:
    """The default model as shipped with the package (``default_model/``, pretrained by
    scripts/build_default_model.py), when it was built for ``key``; else None."""
    facts_file = SHIPPED_MODEL_DIR / "pretraining.json"
    facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
    if facts.get("key") != key:
        return None
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED_MODEL_DIR), local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(SHIPPED_MODEL_DIR), local_files_only=True)
    return EmbeddedModel(model.eval(), tokenizer, facts["pretrain_losses"], key, "shipped with the package")


def build_embedded_model(
    spec: TinyLlamaSpec,
    vocab_size: int,
    max_length: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    log: Callable[[str], None] = print,
) -> EmbeddedModel:
    """Tokenizer and model trained on the fixed corpus in Tulu chat format (every token is learned, not
    only the replies)."""
    conversations = synthetic.pretraining_corpus()
    tokenizer = train_bpe_tokenizer(corpus_texts(), vocab_size=vocab_size)
    model = tiny_llama(len(tokenizer), spec, tokenizer, seed=seed)
    encoded = [encode_messages(tokenizer, c, max_length) for c in conversations]
    for e in encoded:
        e.labels = list(e.input_ids)
    losses = pretrain(
        model,
        encoded,
        steps=steps,
        batch_size=batch_size,
        lr=learning_rate,
        seed=seed,
        pad_id=tokenizer.pad_token_id,
        log=log,
    )
    key = embedded_model_key(spec, vocab_size, max_length, steps, batch_size, learning_rate, seed)
    return EmbeddedModel(model, tokenizer, losses, key)

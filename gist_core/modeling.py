"""Loading models, tokenizers and LoRA adapters, and the batches every training loop uses.

Loading never reaches the network: ``local_files_only`` is always set, and remote code runs
only when the caller passes ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from .data import Encoded

LORA_DROPOUT = 0.1  # the warmup's default and the evaluation fine-tunes'


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Shuffler(Protocol):
    """What causal_lm_batches needs of its rng (random.Random, or a no-op)."""

    def shuffle(self, x: list[int], /) -> None: ...


def causal_lm_batches(encoded: Sequence[Encoded], batch_size: int, rng: Shuffler, pad_id: int):
    """Shuffled, right-padded batches (input_ids, attention_mask, labels)."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = max(len(encoded[i].input_ids) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), T), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(encoded[i].input_ids)
            ids[r, :n] = torch.tensor(encoded[i].input_ids)
            labels[r, :n] = torch.tensor(encoded[i].labels)
            mask[r, :n] = 1
        yield ids, mask, labels


# ------------------------------------------------------------------ loading


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        # Causal LMs often ship without a pad token; padding is masked anyway.
        tok.pad_token = tok.eos_token
    return tok


def check_model_path(path: str) -> None:
    """A clear error for a model that is neither a local directory nor in the local hub cache."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"model directory {path!r} has no config.json; point model_name_or_path "
                "at a directory written by save_pretrained"
            )
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return
    except Exception:  # not a valid repo id either
        pass
    raise FileNotFoundError(
        f"model {path!r} is neither a local directory nor a hub id in the local cache; "
        "download it first (huggingface-cli download ...) or give a local path"
    )


def load_causal_lm(path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
    )
    # transformers types the wrapped PreTrainedModel.to as taking the model as its first argument
    return model.to(device).eval()  # type: ignore[arg-type]


def check_target_modules(model: nn.Module, target_modules: Sequence[str]) -> None:
    """Every LoRA target module name is a layer of the model, or an error naming the layers it has."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise ValueError(
            f"LoRA target_modules {missing} are not layers of {type(model).__name__}; its layers are named "
            f"{sorted(names)[:30]}: set warmup_checkpoint target_modules (e.g. [c_attn] for GPT-2)"
        )


def attach_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: Sequence[str], seed: int):
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} do not exist in {type(model).__name__}; "
            f"available linear layers include {sorted(n for n in names if 'proj' in n or 'attn' in n)[:12]}"
        )
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


class CorruptAdapterError(ValueError):
    """A saved adapter whose files cannot be read (truncated or damaged); the message names the file."""

    def __init__(self, file: str, detail: str):
        self.file = file
        super().__init__(f"{file} is damaged or truncated ({detail})")


def _check_adapter_files(adapter_dir: str) -> None:
    """Read the adapter's config and every tensor header before PEFT does, so damage names the file."""
    from safetensors import safe_open

    config = os.path.join(adapter_dir, "adapter_config.json")
    try:
        with open(config, encoding="utf-8") as fh:
            json.load(fh)
    except (ValueError, OSError) as exc:
        raise CorruptAdapterError(config, f"not readable JSON: {exc}") from None
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return  # an adapter saved as .bin: PEFT reports it
    try:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
        size = os.path.getsize(weights)
        with open(weights, "rb") as fh:  # a cut-off file keeps its header: check the data ends where it says
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, the header describes {8 + n + end}")
    except Exception as exc:  # SafetensorError (not an OSError), ValueError, OSError
        raise CorruptAdapterError(weights, " ".join(str(exc).split())[:300]) from None


def load_adapter(model: nn.Module, adapter_dir: str):
    """Load a saved PEFT adapter onto a freshly loaded base model, LoRA weights trainable.

    Raises CorruptAdapterError naming the file when the adapter's files are damaged.
    """
    from peft import PeftModel

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(
            f"{adapter_dir!r} is not a PEFT adapter directory (no adapter_config.json); "
            "re-materialize warmup_checkpoint"
        )
    _check_adapter_files(adapter_dir)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        base = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        detail = " ".join(str(exc).split())
        if len(detail) > 600:
            detail = detail[:600] + " ..."
        # Not chained: this message is the one the user reads (Dagster shows the innermost error).
        raise ValueError(
            f"adapter {adapter_dir!r} does not fit the base model {base!r}: it was saved for a model with "
            f"other layer names or sizes. Re-materialize warmup_checkpoint with this base model, or configure "
            f"the base model the adapter was trained on. ({detail})"
        ) from None
    return peft_model.eval()


def model_summary(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable, "class": type(model).__name__}

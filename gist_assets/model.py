"""base_model and warmup_checkpoint."""

import json
import random
from typing import Any

import dagster as dg

from gist_core import modeling
from gist_core.data import encode_messages
from gist_core.warmup import LoraTrainConfig, save_checkpoint, train_lora
from gist_demo import smollm2, synthetic, tiny_model
from gist_resources import ComputeResource, StorageResource
from gist_resources.storage import strict_json

from .config import BaseModelConfig, WarmupConfig
from .paths import model_path
from .plots import line_plot
from .pool import candidate_pool, pool_path, read_pool_version
from .versions import asset_fingerprint, data_version

# Defined here (the first GPU stage); gradients.py and the other GPU steps import it.
GPU_STEP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}}
    }
}

EMBEDDED_DEFAULTS = {"max_length": 128, "lora_r": 8, "learning_rate": 1e-3, "effective_batch_size": 16}
# base_model.model_name_or_path "preset:smollm2": a model converted under the storage root (gist_demo.smollm2).
PRESET_PREFIX = "preset:"
PAPER_DEFAULTS = {"max_length": 2048, "lora_r": 128, "learning_rate": 2e-5, "effective_batch_size": 128}


def model_ref_path(storage: StorageResource):
    return storage.path("models", "model_ref.json")


def read_model_ref(storage: StorageResource) -> dict:
    return storage.read_json(model_ref_path(storage), "base_model")


def chat_format(ref: dict) -> str:
    return ref.get("chat_format") or "tulu"


WARMUP_POOL_IDS = "pool_ids.parquet"


def warmup_pool_ids_path(storage: StorageResource):
    """The candidate ids in the pool when the warmup was trained (absent for a warmup older than this record)."""
    return storage.path("warmup", WARMUP_POOL_IDS)


def warmup_manifest_path(storage: StorageResource):
    return storage.path("warmup", "manifest.json")


def read_warmup(storage: StorageResource) -> dict:
    return storage.read_json(warmup_manifest_path(storage), "warmup_checkpoint")


def default_target_modules(model) -> list[str]:
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    for choice in (["q_proj", "k_proj", "v_proj", "o_proj"], ["c_attn"], ["query_key_value", "dense"]):
        if all(c in names for c in choice):
            return choice
    raise ValueError(
        f"cannot guess LoRA target modules for {type(model).__name__}; set warmup "
        "config target_modules (e.g. [q_proj, v_proj])"
    )


@dg.asset(group_name="model", code_version="2", kinds={"pytorch"})
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """The base model: a pointer to a configured model, or the embedded tiny Llama pretrained on a fixed
    corpus shipped with the package (never on the pool, so a refresh is scored by the same model)."""
    ref_path = model_ref_path(storage)
    if config.model_name_or_path:
        preset, path, facts = None, config.model_name_or_path, {}
        if path.startswith(PRESET_PREFIX):
            preset = path[len(PRESET_PREFIX) :]
            if preset != smollm2.PRESET:
                raise ValueError(f"unknown model preset {path!r}; presets: {PRESET_PREFIX}{smollm2.PRESET}")
            dest = smollm2.convert(storage.path("models", smollm2.DIR_NAME), log=context.log.info)
            path, facts = str(dest), smollm2.conversion_facts(dest)
        modeling.check_model_path(path)
        tok = compute.load_tokenizer(path)
        probe = encode_messages(
            tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], 64, config.chat_format
        )  # a format the tokenizer cannot do fails here
        ref: dict[str, Any] = {
            "path": storage.relative(path) if preset else path,
            "embedded": False,
            "preset": preset,
            "chat_format": config.chat_format,
            "max_length": config.max_length or PAPER_DEFAULTS["max_length"],
            "vocab_size": len(tok),
        }
        # A preset's conversion (its source file and converter version) is part of what the model is.
        made = [facts["gguf_sha256"], facts["converter_version"]] if preset else []
        ref["version"] = asset_fingerprint(context, config.model_name_or_path, ref["max_length"], *made)
        storage.write_json(ref_path, ref)
        metadata = {
            "model": config.model_name_or_path,
            "embedded": False,
            "max_length": ref["max_length"],
            "chat_format": config.chat_format,
            "eos_token": tok.eos_token,
            "example_label_tokens": probe.n_label_tokens,
        }
        if preset:
            metadata.update(
                {
                    "path": dg.MetadataValue.path(path),
                    **{
                        k: facts[k]
                        for k in (
                            "parameters",
                            "num_attention_heads",
                            "num_key_value_heads",
                            "tie_word_embeddings",
                            "answer",
                        )
                    },
                }
            )
        return dg.MaterializeResult(data_version=data_version(ref["version"]), metadata=metadata)
    if config.chat_format != "tulu":
        raise ValueError("the embedded model's tokenizer has no chat template: use chat_format 'tulu' with it")

    max_length = config.max_length or int(EMBEDDED_DEFAULTS["max_length"])
    spec = tiny_model.TinyLlamaSpec(
        hidden_size=config.hidden_size,
        layers=config.layers,
        heads=config.heads,
        kv_heads=config.kv_heads,
        intermediate_size=int(config.hidden_size * 2.75),
        max_positions=max(256, max_length),
    )
    built = tiny_model.build_embedded_model(
        spec,
        config.vocab_size,
        max_length,
        steps=config.pretrain_steps,
        batch_size=config.pretrain_batch_size,
        learning_rate=config.pretrain_learning_rate,
        seed=config.seed,
        log=context.log.info,
    )
    model, tokenizer, losses = built.model, built.tokenizer, built.pretrain_losses
    dest = storage.path("models", "base_model")
    with storage.atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    ref = {
        "path": storage.relative(dest),
        "embedded": True,
        "max_length": max_length,
        "vocab_size": len(tokenizer),
        "version": asset_fingerprint(context, synthetic.PRETRAIN_CORPUS_SEED, synthetic.PRETRAIN_CORPUS_SIZE),
    }
    storage.write_json(ref_path, ref)
    return dg.MaterializeResult(
        data_version=data_version(ref["version"]),
        metadata={
            "model": dg.MetadataValue.path(str(dest)),
            "embedded": True,
            "max_length": max_length,
            **modeling.model_summary(model),
            "vocab_size": len(tokenizer),
            "pretrain_final_loss": losses[-1],
            "pretrain_loss": line_plot(losses, "Pretraining loss", "step", "loss"),
        },
    )


def resolve_warmup(config: WarmupConfig, ref: dict) -> dict:
    d = EMBEDDED_DEFAULTS if ref["embedded"] else PAPER_DEFAULTS
    r = config.lora_r or d["lora_r"]
    return {
        "lora_r": r,
        "lora_alpha": config.lora_alpha or 4 * r,
        "learning_rate": config.learning_rate or d["learning_rate"],
        "effective_batch_size": config.effective_batch_size or d["effective_batch_size"],
    }


@dg.asset(
    group_name="model",
    deps=[base_model, candidate_pool],
    code_version="2",
    kinds={"pytorch", "peft"},
    op_tags=GPU_STEP_TAGS,
)
def warmup_checkpoint(
    context: dg.AssetExecutionContext, config: WarmupConfig, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """LoRA warmup on a seeded random fraction of the pool; one PEFT adapter dir per epoch."""
    if not 0 < config.fraction <= 1:
        raise ValueError(f"warmup fraction must be in (0, 1], got {config.fraction}")
    ref = read_model_ref(storage)
    hp = resolve_warmup(config, ref)
    pool = storage.read_parquet(pool_path(storage), "candidate_pool").sort("candidate_id")
    n = max(1, round(config.fraction * pool.height))
    picked = sorted(random.Random(config.seed).sample(range(pool.height), n))
    tokenizer = compute.load_tokenizer(model_path(storage, ref))
    encoded = [
        encode_messages(tokenizer, json.loads(pool["messages"][i]), ref["max_length"], chat_format(ref)) for i in picked
    ]
    encoded = [e for e in encoded if e.n_label_tokens > 0]
    model = compute.load_model(model_path(storage, ref))
    target_modules = list(config.target_modules or []) or default_target_modules(model)
    model = modeling.attach_lora(
        model, hp["lora_r"], hp["lora_alpha"], config.lora_dropout, target_modules, seed=config.seed
    )
    cfg = LoraTrainConfig(
        epochs=config.epochs,
        learning_rate=hp["learning_rate"],
        warmup_ratio=config.warmup_ratio,
        effective_batch_size=hp["effective_batch_size"],
        micro_batch_size=min(config.micro_batch_size, hp["effective_batch_size"]),
        seed=config.seed,
    )
    lora_dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dest = storage.path("warmup")
    checkpoints = []
    with storage.atomic_dir(dest) as tmp:

        def on_epoch_end(epoch, avg_lr, optimizer):
            name = f"epoch_{epoch + 1}"
            save_checkpoint(model, optimizer, tmp / name, {"epoch": epoch + 1, "avg_lr": avg_lr})
            checkpoints.append(
                {"name": name, "epoch": epoch + 1, "avg_lr": avg_lr, "dir": storage.relative(dest / name)}
            )

        result = train_lora(
            model,
            encoded,
            cfg,
            compute.torch_device(),
            compute.autocast_dtype(),
            pad_id=tokenizer.pad_token_id,
            on_epoch_end=on_epoch_end,
            log=context.log.info,
        )
        version = asset_fingerprint(context, ref["version"], read_pool_version(storage)["version"], hp)
        manifest = {
            "version": version,
            "checkpoints": checkpoints,
            "examples": len(encoded),
            "steps": result.steps,
            "seconds": result.seconds,
            "losses": result.losses,
            "target_modules": target_modules,
            "hyperparameters": {**config.model_dump(), **hp},
            "base_model": ref["path"],
        }
        (tmp / "manifest.json").write_text(strict_json(manifest))
        # Which candidates existed when the warmup was trained: scores count those that came later.
        pool.select("candidate_id").write_parquet(tmp / WARMUP_POOL_IDS)
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "checkpoints": dg.MetadataValue.json([c["name"] for c in checkpoints]),
            "examples": len(encoded),
            "steps": result.steps,
            "seconds": round(result.seconds, 2),
            "final_loss": result.losses[-1],
            "avg_lr_per_epoch": dg.MetadataValue.json(result.epoch_avg_lr),
            "hyperparameters": dg.MetadataValue.json(manifest["hyperparameters"]),
            # D, the LoRA dimension every gradient has, and what one float32 target gradient takes.
            "lora_dim_D": lora_dim,
            "target_gradient_bytes_per_example": 4 * lora_dim,
            "loss_curve": line_plot(result.losses, "Warmup loss", "optimizer step", "loss"),
            "path": dg.MetadataValue.path(str(dest)),
        },
    )

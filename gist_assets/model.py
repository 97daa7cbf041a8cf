"""base_model and warmup_checkpoint."""

import json
import random
from typing import Any

import dagster as dg

from gist_core import modeling
from gist_core.data import encode_messages
from gist_core.warmup import LoraTrainConfig, adam_state, train_lora
from gist_demo import smollm2, tiny_model
from gist_resources import ArtifactStore, ComputeResource

from .config import PAPER_WARMUP, BaseModelConfig, WarmupConfig
from .inputs import candidate_pool
from .plots import line_plot
from .steps import GPU_STEP_TAGS
from .versions import asset_fingerprint, data_version

# base_model.model_name_or_path "preset:smollm2": a model converted under the storage root (gist_demo.smollm2).
PRESET_PREFIX = "preset:"


def chat_format(ref: dict) -> str:
    return ref.get("chat_format") or "tulu"


@dg.asset(group_name="model", code_version="3", kinds={"pytorch"})
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, storage: ArtifactStore, compute: ComputeResource
) -> dg.MaterializeResult:
    """The base model: a pointer to a configured model, or the embedded tiny Llama pretrained on a fixed
    corpus shipped with the package (never on the pool, so a refresh is scored by the same model)."""
    if config.model_name_or_path:
        return _configured_model(context, config, storage, compute)
    if config.chat_format != "tulu":
        raise ValueError("the embedded model's tokenizer has no chat template: use chat_format 'tulu' with it")
    spec, settings = embedded_model_settings(config)
    key = tiny_model.embedded_model_key(spec, *settings)
    dest, facts, cache_entry = storage.embedded_model(
        key,
        lambda: tiny_model.shipped_model(key) or tiny_model.build_embedded_model(spec, *settings, log=context.log.info),
    )
    context.log.info(f"embedded model {key}: {facts['made']}" + (f" ({cache_entry})" if cache_entry else ""))
    tokenizer = compute.load_tokenizer(str(dest))
    losses = facts["pretrain_losses"]
    ref: dict[str, Any] = {
        "path": str(dest),
        "embedded": True,
        "max_length": config.max_length,
        "vocab_size": len(tokenizer),
        "version": asset_fingerprint(context, key),  # the key covers the settings, corpus and training code
    }
    storage.write_model_ref(ref)
    return dg.MaterializeResult(
        data_version=data_version(ref["version"]),
        metadata={
            "model": dg.MetadataValue.path(str(dest)),
            "embedded": True,
            "max_length": config.max_length,
            **facts["summary"],
            "vocab_size": len(tokenizer),
            "made": facts["made"],
            "model_cache": dg.MetadataValue.path(str(cache_entry)) if cache_entry else "off",
            "pretrain_final_loss": losses[-1],
            "pretrain_loss": line_plot(losses, "Pretraining loss", "step", "loss"),
        },
    )


def embedded_model_settings(
    config: BaseModelConfig,
) -> tuple[tiny_model.TinyLlamaSpec, tuple[int, int, int, int, float, int]]:
    """The embedded model's architecture, and (vocab_size, max_length, steps, batch size, lr, seed)."""
    spec = tiny_model.TinyLlamaSpec(
        hidden_size=config.hidden_size,
        layers=config.layers,
        heads=config.heads,
        kv_heads=config.kv_heads,
        intermediate_size=int(config.hidden_size * 2.75),
        max_positions=max(256, config.max_length),
    )
    settings = (
        config.vocab_size,
        config.max_length,
        config.pretrain_steps,
        config.pretrain_batch_size,
        config.pretrain_learning_rate,
        config.seed,
    )
    return spec, settings


def _configured_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, storage: ArtifactStore, compute: ComputeResource
) -> dg.MaterializeResult:
    """A local model directory, a cached hub id, or a preset converted under the root: checked, then recorded."""
    preset, path, facts = None, config.model_name_or_path, {}
    if path.startswith(PRESET_PREFIX):
        preset = path[len(PRESET_PREFIX) :]
        if preset != smollm2.PRESET:
            raise ValueError(f"unknown model preset {path!r}; presets: {PRESET_PREFIX}{smollm2.PRESET}")
        dest = smollm2.convert(storage.preset_model_dir(smollm2.DIR_NAME), log=context.log.info)
        path, facts = str(dest), smollm2.conversion_facts(dest)
    modeling.check_model_path(path)
    if config.max_length == BaseModelConfig.model_fields["max_length"].default:
        context.log.warning(
            f"max_length={config.max_length} is the default sized for the embedded model: longer examples are "
            "truncated (the paper uses 2048; set base_model max_length)"
        )
    tok = compute.load_tokenizer(path)
    probe = encode_messages(
        tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], 64, config.chat_format
    )  # a format the tokenizer cannot do fails here
    ref: dict[str, Any] = {
        "path": path,
        "embedded": False,
        "preset": preset,
        "chat_format": config.chat_format,
        "max_length": config.max_length,
        "vocab_size": len(tok),
    }
    # A preset's conversion (its source file and converter version) is part of what the model is.
    made = [facts["gguf_sha256"], facts["converter_version"]] if preset else []
    ref["version"] = asset_fingerprint(context, config.model_name_or_path, config.max_length, *made)
    storage.write_model_ref(ref)
    metadata = {
        "model": config.model_name_or_path,
        "embedded": False,
        "max_length": config.max_length,
        "chat_format": config.chat_format,
        "eos_token": tok.eos_token,
        "example_label_tokens": probe.n_label_tokens,
    }
    if preset:
        facts_shown = ("parameters", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "answer")
        metadata.update({"path": dg.MetadataValue.path(path), **{k: facts[k] for k in facts_shown}})
    return dg.MaterializeResult(data_version=data_version(ref["version"]), metadata=metadata)


def warn_small_settings_on_a_real_model(context, config: WarmupConfig, ref: dict) -> None:
    """The defaults are sized for the embedded model; on a configured one, say so when none was changed."""
    if ref["embedded"] or any(getattr(config, k) != WarmupConfig.model_fields[k].default for k in PAPER_WARMUP):
        return
    context.log.warning(
        "warmup_checkpoint runs with the defaults sized for the embedded tiny model "
        f"({', '.join(f'{k}={getattr(config, k)}' for k in PAPER_WARMUP)}) on {ref['path']}; the paper's "
        f"settings are {', '.join(f'{k}={v}' for k, v in PAPER_WARMUP.items())} (examples/my_run.yaml)"
    )


@dg.asset(
    group_name="model",
    deps=[base_model, candidate_pool],
    code_version="3",
    kinds={"pytorch", "peft"},
    op_tags=GPU_STEP_TAGS,
)
def warmup_checkpoint(
    context: dg.AssetExecutionContext, config: WarmupConfig, storage: ArtifactStore, compute: ComputeResource
) -> dg.MaterializeResult:
    """LoRA warmup on a seeded random fraction of the pool; one PEFT adapter dir per epoch."""
    ref = storage.read_model_ref()
    warn_small_settings_on_a_real_model(context, config, ref)
    pool = storage.read_pool(columns=["candidate_id", "messages"]).sort("candidate_id")
    n = max(1, round(config.fraction * pool.height))
    picked = sorted(random.Random(config.seed).sample(range(pool.height), n))
    tokenizer = compute.load_tokenizer(storage.model_path(ref))
    encoded = [
        encode_messages(tokenizer, json.loads(pool["messages"][i]), ref["max_length"], chat_format(ref)) for i in picked
    ]
    encoded = [e for e in encoded if e.n_label_tokens > 0]
    model = compute.load_model(storage.model_path(ref))
    modeling.check_target_modules(model, config.target_modules)
    model = modeling.attach_lora(
        model, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules, seed=config.seed
    )
    train = LoraTrainConfig(
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        warmup_ratio=config.warmup_ratio,
        effective_batch_size=config.effective_batch_size,
        micro_batch_size=min(config.micro_batch_size, config.effective_batch_size),
        seed=config.seed,
    )
    lora_dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    checkpoints = []
    with storage.warmup_writer() as writer:

        def on_epoch_end(epoch, avg_lr, optimizer):
            moments, info = adam_state(model, optimizer)
            entry = writer.save_checkpoint(
                f"epoch_{epoch + 1}", model, moments, {**info, "epoch": epoch + 1, "avg_lr": avg_lr}
            )
            checkpoints.append({**entry, "epoch": epoch + 1, "avg_lr": avg_lr})

        result = train_lora(
            model,
            encoded,
            train,
            compute.torch_device(),
            compute.autocast_dtype(),
            pad_id=tokenizer.pad_token_id,
            on_epoch_end=on_epoch_end,
            log=context.log.info,
        )
        version = asset_fingerprint(context, ref["version"], storage.pool_record()["version"])
        manifest: dict[str, Any] = {
            "version": version,
            "checkpoints": checkpoints,
            "examples": len(encoded),
            "steps": result.steps,
            "seconds": result.seconds,
            "losses": result.losses,
            "target_modules": config.target_modules,
            "hyperparameters": config.model_dump(),
            "base_model": storage.relative(storage.model_path(ref)),
        }
        # Which candidates existed when the warmup was trained: scores count those that came later.
        writer.finish(manifest, pool.select("candidate_id"))
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
            "path": dg.MetadataValue.path(str(storage.warmup_dir())),
        },
    )

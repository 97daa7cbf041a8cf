"""Mean-pooled last-layer hidden states (the RDS-style representation baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import Encoded
from .gradients import MAX_BATCH_SIZE, MAX_BATCH_TOKENS, autocast_for, length_batches


@torch.no_grad()
def mean_pooled_hidden_states(
    model,
    encoded: Sequence[Encoded],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_tokens: int = MAX_BATCH_TOKENS,
    max_batch_size: int = MAX_BATCH_SIZE,
    pad_id: int = 0,
) -> np.ndarray:
    """(N, hidden) mean of the last hidden layer over each example's real tokens."""
    model.eval()
    out = None
    for batch in length_batches(encoded, max_tokens, max_batch_size, pad_id):
        mask = batch.attention_mask.to(device)
        with autocast_for(device, dtype):
            hidden = (
                model(input_ids=batch.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
                .hidden_states[-1]
                .float()
            )
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        if out is None:
            out = np.zeros((len(encoded), pooled.shape[1]), dtype=np.float32)
        out[np.asarray(batch.indices)] = pooled.cpu().numpy()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)

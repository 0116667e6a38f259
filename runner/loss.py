"""The training loss: model + causal-LM cross-entropy in one module, summed over label tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from runner.kernels import require_liger

IGNORE = -100  # the label of positions that carry no loss (HF's ignore_index)


class CausalLMLoss(torch.nn.Module):
    """Model + loss in one module, so DDP sees one forward. Returns the summed token CE.

    `hf` is the model's own loss (full fp32 logits); `chunked` runs lm_head + CE over chunks of
    tokens under checkpoint, so at most one chunk of logits exists at a time, in forward and backward;
    `liger` is the same idea as one fused Triton kernel (runner.kernels).
    """

    def __init__(self, model: torch.nn.Module, kind: str = "chunked", chunk_tokens: int = 1024):
        super().__init__()
        self.model, self.kind, self.chunk_tokens = model, kind, chunk_tokens
        if kind == "liger":
            self.fused = liger_linear_cross_entropy()
        else:
            self.fused = None

    def forward(self, input_ids, labels, attention_mask=None):
        if self.kind == "hf":
            num_items = (labels[:, 1:] != IGNORE).sum()
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                             num_items_in_batch=num_items)
            return out.loss * num_items  # back to a sum: the caller normalises over the whole step
        causal_lm = self.model.get_base_model()
        hidden = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.fused is not None:
            return self.fused(causal_lm.lm_head.weight, hidden[:, :-1].reshape(-1, hidden.shape[-1]),
                              labels[:, 1:].reshape(-1))
        return chunked_cross_entropy(hidden[:, :-1], causal_lm.lm_head.weight, labels[:, 1:], self.chunk_tokens)


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.t()).float(), targets, ignore_index=IGNORE, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_ce, hidden[start:end], weight, targets[start:end], use_reentrant=False)
    return total


def liger_linear_cross_entropy():
    """Liger's fused lm_head + cross-entropy: logits exist one chunk at a time, computed in Triton."""
    require_liger()
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")

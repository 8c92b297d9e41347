"""The loss functions: the task's, and the consistency between a reconstruction and its target."""

from __future__ import annotations

import torch.nn.functional as F


def task_loss(pred, labels, task):
    if task == "regression":
        return F.l1_loss(pred, labels)
    return F.cross_entropy(pred.reshape(-1, 2), labels.reshape(-1))  # (B*4, 2) logits vs (B*4,) 0/1


def consistency_loss(pred, target, mask, kind):
    """Mean over real steps and channels of (pred - target)^2 (l2) or |pred - target| (l1)."""
    diff = pred - target
    err = diff.pow(2) if kind == "l2" else diff.abs()  # (B, T, d)
    if mask is None:
        return err.mean()
    w = mask[..., None].to(err.dtype)  # (B, T, 1)
    return (err * w).sum() / (w.sum() * err.shape[2]).clamp(min=1)

"""The loss functions: the task's, and the consistency between a reconstruction and its target."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(pred, labels, task):
    """L1 (regression) or cross-entropy per emotion, the mean over the batch's labelled samples.

    A sample whose label is hidden (NaN, or -1 per emotion: ``Config.label_fraction``,
    ``mskt.data.labels``) adds nothing and gets no gradient; a batch with no label gives 0."""
    if task == "regression":
        known = ~torch.isnan(labels)
        if bool(known.all()):  # every label: exactly the plain loss (recorded numbers stay as they were)
            return F.l1_loss(pred, labels)
        err = (pred - labels.nan_to_num(0.0)).abs() * known  # no NaN reaches the graph
        return err.sum() / known.sum().clamp(min=1)
    labels = labels.reshape(-1)
    known = labels >= 0
    if bool(known.all()):
        return F.cross_entropy(pred.reshape(-1, 2), labels)  # (B*4, 2) logits vs (B*4,) 0/1
    err = F.cross_entropy(pred.reshape(-1, 2), labels.clamp(min=0), reduction="none") * known
    return err.sum() / known.sum().clamp(min=1)


def consistency_loss(pred, target, mask, kind):
    """Mean over real steps and channels of (pred - target)^2 (l2) or |pred - target| (l1)."""
    diff = pred - target
    err = diff.pow(2) if kind == "l2" else diff.abs()  # (B, T, d)
    if mask is None:
        return err.mean()
    w = mask[..., None].to(err.dtype)  # (B, T, 1)
    return (err * w).sum() / (w.sum() * err.shape[2]).clamp(min=1)

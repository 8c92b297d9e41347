"""The loss functions: the task's, and the consistency between a reconstruction and its target.

Each is a mean: a sum over the batch's items (samples, labelled samples, real steps) over their
count. ``denominator`` (optional) maps that local count to the one to divide by instead: in a
distributed step, the global batch's count scaled to this rank's share of the samples
(``MulT.loss_denominator``), so that DDP's average of the ranks' weighted gradients is the gradient
of the global batch's mean, whatever each rank's count is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean(total, count, denominator):
    return total / (count.clamp(min=1) if denominator is None else denominator(count))


def task_loss(pred, labels, task, denominator=None):
    """L1 (regression) or cross-entropy per emotion, the mean over the batch's labelled samples.

    A sample whose label is hidden (NaN, or -1 per emotion: ``Config.label_fraction``,
    ``mskt.data.labels``) adds nothing and gets no gradient; a batch with no label gives 0."""
    if task == "regression":
        known = ~torch.isnan(labels)
        if denominator is None and bool(known.all()):  # every label: exactly the plain loss (recorded numbers stay as they were)
            return F.l1_loss(pred, labels)
        err = (pred - labels.nan_to_num(0.0)).abs() * known  # no NaN reaches the graph
        return _mean(err.sum(), known.sum(), denominator)
    labels = labels.reshape(-1)
    known = labels >= 0
    if denominator is None and bool(known.all()):
        return F.cross_entropy(pred.reshape(-1, 2), labels)  # (B*4, 2) logits vs (B*4,) 0/1
    err = F.cross_entropy(pred.reshape(-1, 2), labels.clamp(min=0), reduction="none") * known
    return _mean(err.sum(), known.sum(), denominator)


def consistency_loss(pred, target, mask, kind, denominator=None):
    """Mean over real steps and channels of (pred - target)^2 (l2) or |pred - target| (l1)."""
    diff = pred - target
    err = diff.pow(2) if kind == "l2" else diff.abs()  # (B, T, d)
    if mask is None:
        if denominator is None:
            return err.mean()
        return _mean(err.sum(), torch.tensor(float(err.numel()), device=err.device), denominator)
    w = mask[..., None].to(err.dtype)  # (B, T, 1)
    return _mean((err * w).sum(), w.sum() * err.shape[2], denominator)

"""Analyses the notebooks display: reconstruction quality of A' against A, and attention maps.

Functions return numbers and DataFrames; ``mskt.viz.plots`` draws them.

Reconstruction quality is measured in standardised feature units (a model that reads its
reconstructions out to the features: kt with ``kt_target="raw"``, whose theta, phi and delta share
one audio readout, or kt_any), on real steps only, each reconstruction on its own time grid with the
real features resampled onto it. Which reconstructions there are, and on which grid, the model says
(``reconstruction_sources``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mskt.model import MulT, key_mask, resample
from mskt.train import Tensors
from mskt.train.evaluation import default_test_batch

@torch.inference_mode()
def reconstructions(model: MulT, data: Tensors, batch_size: int = 256, modality: str = "audio") -> dict:
    """For every sample: the real standardised features of ``modality`` and each reconstruction of it
    (``model.reconstruction_sources``: kt's theta, phi and delta), on each reconstruction's grid.
    Returns {source: {"pred", "target", "mask"}} of numpy arrays (N, T, D_m), (N, T, D_m), (N, T),
    plus "prediction" (N, ...) and "labels". Needs a model that reads its reconstructions out to the
    features (``read_out``: kt with kt_target='raw', kt_any)."""
    cfg = model.cfg
    probe = torch.zeros(1, 1, cfg.d_model, device=next(model.parameters()).device)
    if modality not in model.reconstructs or model.read_out(modality, probe) is None:
        raise ValueError(f"reconstruction quality of {modality} needs a model that reconstructs it and reads it out to its "
                         f"features (kt with kt_target='raw', or kt_any); this run: {cfg.variant}, kt_target={cfg.kt_target}")
    sources = model.reconstruction_sources(modality)
    model.eval()
    parts = {s: {"pred": [], "target": [], "mask": []} for s in sources}
    preds = []
    for batch in data.batches(batch_size):
        out = model(batch, return_internals=True)
        target = out.internals[f"{modality}_features"]  # (B, T_m, D_m), standardised, padding 0
        len_m = batch["lengths"][modality]
        preds.append(out.pred.float().cpu())
        for source, (key, grid) in sources.items():
            pred = model.read_out(modality, out.internals[key])  # (B, T_grid, D_m)
            T = pred.shape[1]
            length = out.lengths.get(grid, batch["lengths"][grid])  # the grid as the forward used it
            on_grid = target if T == target.shape[1] else resample(target, len_m, T, length)  # (B, T, D_m)
            parts[source]["pred"].append(pred.cpu())
            parts[source]["target"].append(on_grid.cpu())
            parts[source]["mask"].append(key_mask(length, T).cpu())
    result = {s: {k: torch.cat(v).numpy() for k, v in d.items()} for s, d in parts.items()}
    result["prediction"] = torch.cat(preds).numpy()
    result["labels"] = data.labels.cpu().numpy()
    return result


def _sources(rec: dict) -> list:
    """The reconstructions in a :func:`reconstructions` result, in the model's order."""
    return [k for k, v in rec.items() if isinstance(v, dict)]


def _real(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x[mask]  # (n_real_steps, D)


def _r2(pred: np.ndarray, target: np.ndarray) -> float:
    """1 - SSE / SST with SST about zero, the training mean of standardised features: R^2 against
    always predicting the training-set mean audio."""
    return float(1.0 - ((pred - target) ** 2).sum() / max((target**2).sum(), 1e-12))


def _cosine(pred: np.ndarray, target: np.ndarray) -> float:
    num = (pred * target).sum(axis=1)
    den = np.linalg.norm(pred, axis=1) * np.linalg.norm(target, axis=1)
    ok = den > 1e-12
    return float((num[ok] / den[ok]).mean()) if ok.any() else float("nan")


def quality_summary(rec: dict, seed: int = 0) -> pd.DataFrame:
    """One row per reconstruction (vision = theta, language = phi, fused = delta) and per trivial
    baseline (training-mean audio; the audio of another, shuffled sample): MSE, R^2, cosine."""
    rows = []
    rng = np.random.default_rng(seed)
    for source in _sources(rec):
        r = rec[source]
        pred, target = _real(r["pred"], r["mask"]), _real(r["target"], r["mask"])
        rows.append({"reconstruction": f"A' from {source}", "mse": float(((pred - target) ** 2).mean()), "r2": _r2(pred, target), "cosine": _cosine(pred, target)})
    # Baselines on the fused (text) grid: every real step of every sample.
    r = rec["fused"]
    target = _real(r["target"], r["mask"])
    zeros = np.zeros_like(target)
    rows.append({"reconstruction": "training-mean audio", "mse": float((target**2).mean()), "r2": _r2(zeros, target), "cosine": float("nan")})
    perm = rng.permutation(len(r["target"]))
    shuffled = _real(r["target"][perm], r["mask"] & r["mask"][perm])
    target_sh = _real(r["target"], r["mask"] & r["mask"][perm])
    rows.append({"reconstruction": "audio of a shuffled sample", "mse": float(((shuffled - target_sh) ** 2).mean()), "r2": _r2(shuffled, target_sh), "cosine": _cosine(shuffled, target_sh)})
    return pd.DataFrame(rows)


def error_per_dimension(rec: dict, feature_names=None) -> pd.DataFrame:
    """MSE per audio feature for each reconstruction; long format (source, feature, mse)."""
    rows = []
    for source in _sources(rec):
        r = rec[source]
        err = ((_real(r["pred"], r["mask"]) - _real(r["target"], r["mask"])) ** 2).mean(axis=0)  # (D_a,)
        names = feature_names or [f"audio_{i:03d}" for i in range(len(err))]
        rows += [{"source": source, "feature": n, "mse": float(e)} for n, e in zip(names, err)]
    return pd.DataFrame(rows)


def error_per_position(rec: dict, bins: int = 10) -> pd.DataFrame:
    """MSE against the relative position of a step in its utterance (0 = first real step, 1 = last),
    in ``bins`` bins; long format (source, position, mse)."""
    rows = []
    for source in _sources(rec):
        r = rec[source]
        N, T, _ = r["pred"].shape
        length = r["mask"].sum(axis=1, keepdims=True)  # (N, 1)
        t = np.arange(T)[None, :]
        rel = (t - (T - length) + 0.5) / np.maximum(length, 1)  # (N, T), in (0, 1) on real steps
        err = ((r["pred"] - r["target"]) ** 2).mean(axis=2)  # (N, T)
        which = np.minimum((rel * bins).astype(int), bins - 1)
        for b in range(bins):
            sel = r["mask"] & (which == b)
            if sel.any():
                rows.append({"source": source, "position": (b + 0.5) / bins, "mse": float(err[sel].mean())})
    return pd.DataFrame(rows)


def per_sample_errors(rec: dict) -> pd.DataFrame:
    """Per test sample: reconstruction MSE of A' (fused) and the absolute prediction error, to see
    whether samples whose audio is reconstructed badly are also predicted badly."""
    r = rec["fused"]
    err = ((r["pred"] - r["target"]) ** 2).mean(axis=2)  # (N, T)
    rec_mse = (err * r["mask"]).sum(axis=1) / np.maximum(r["mask"].sum(axis=1), 1)
    pred, labels = rec["prediction"], rec["labels"]
    if pred.ndim == 1:
        pred_err = np.abs(pred - labels)
    else:  # emotions: the fraction of the 4 emotions predicted wrong
        pred_err = (pred.argmax(-1) != labels).mean(axis=1)
    return pd.DataFrame({"reconstruction_mse": rec_mse, "prediction_error": pred_err, "label": labels if labels.ndim == 1 else labels.sum(1)})


# ----------------------------------------------------------------------------------------------
# Attention


@torch.inference_mode()
def attention_maps(model: MulT, data: Tensors, samples) -> dict:
    """Attention weights of the chosen samples (indices into ``data``), from the explicit attention
    path, with the inputs the default test protocol gives (as ``evaluate``): {"source->target": [per
    layer (n, heads, T_target, T_source) numpy]}; "t->t" keys are the self-attention decoder's. Also
    "lengths" {modality: (n,)}, the real steps of each grid as the forward used it, to crop padding."""
    model.eval()
    index = torch.as_tensor(list(samples), dtype=torch.long, device=data.labels.device)
    batch = default_test_batch(model, data.batch(index))  # as evaluate() gives it
    out = model(batch, return_attention=True)
    maps = {k: [w.float().cpu().numpy() for w in layers] for k, layers in out.attention.items()}
    maps["lengths"] = {m: v.cpu().numpy() for m, v in out.lengths.items()}  # each grid's real steps, as the forward used them
    return maps


def average_attention(model: MulT, data: Tensors, max_samples: int = 256, bins: int = 20) -> dict:
    """Attention per direction and layer, averaged over heads and samples in *relative* positions.

    Each sample's real block (its true query and key steps) is binned onto a ``bins`` x ``bins``
    grid of relative positions (0 = first real step, 1 = last) and scaled by its number of key steps,
    so 1 means uniform attention whatever the utterance's length; averaging raw weights in absolute
    steps would instead let padding and short utterances (larger 1/L per step) draw a pattern.
    Returns {"source->target": [per layer (bins, bins)]}.
    """
    n = min(len(data), max_samples)
    maps = attention_maps(model, data, range(n))
    lengths = maps.pop("lengths")

    def length(modality, i, steps):
        return int(min(steps, max(1, lengths[modality][i])))

    out = {}
    for key, layers in maps.items():
        source, target = key.split("->")
        averaged = []
        for w in layers:  # (n, h, T, S)
            w = w.mean(axis=1)  # (n, T, S)
            total = np.zeros((bins, bins))
            count = np.zeros((bins, bins))
            for i in range(len(w)):
                t, s_ = length(target, i, w.shape[1]), length(source, i, w.shape[2])
                block = w[i, -t:, -s_:] * s_  # (t, s): 1 = uniform over the real keys
                rows = (np.arange(t) * bins // t)[:, None]  # (t, 1) relative-position bin of each query
                cols = (np.arange(s_) * bins // s_)[None, :]  # (1, s)
                np.add.at(total, (np.broadcast_to(rows, block.shape), np.broadcast_to(cols, block.shape)), block)
                np.add.at(count, (np.broadcast_to(rows, block.shape), np.broadcast_to(cols, block.shape)), 1)
            averaged.append(total / np.maximum(count, 1))
        out[key] = averaged
    return out

"""The paper's reported numbers (Liu et al., Tables 1-5), for side-by-side tables.

Regression rows: Acc7, Acc2, F1 (percent, non-zero convention as MulT), MAE, Corr.
IEMOCAP rows: (Acc, F1) per emotion in percent. Keys are our variant names; ``mctn`` is the
paper's "MCTN" row (unaligned: "CTC + MCTN"). The paper's other baselines, which are not variants
here, are reference rows (``BASELINES``, :func:`baseline_rows`) for the results tables.
"""

from __future__ import annotations

REGRESSION_COLUMNS = ("acc7", "acc2_nonzero", "f1_nonzero", "mae", "corr")

PAPER = {
    # Table 1, CMU-MOSI.
    ("mosi", True): {
        "full": (39.7, 82.9, 82.7, 0.870, 0.694),
        "vision": (34.1, 76.6, 76.4, 0.721, 0.421),
        "language": (36.4, 78.1, 77.3, 0.751, 0.619),
        "language_vision": (38.7, 81.3, 81.2, 0.849, 0.688),
        "kt": (39.1, 82.3, 82.2, 0.858, 0.691),
        "mctn": (35.6, 79.3, 79.1, 0.909, 0.676),
    },
    ("mosi", False): {
        "full": (39.3, 82.3, 82.1, 0.861, 0.690),
        "vision": (34.0, 76.1, 75.9, 0.717, 0.401),
        "language": (36.0, 77.5, 77.2, 0.742, 0.606),
        "language_vision": (37.5, 80.9, 80.7, 0.838, 0.681),
        "kt": (38.7, 81.9, 81.7, 0.844, 0.687),
        "mctn": (32.7, 75.9, 76.4, 0.991, 0.613),  # "CTC + MCTN"
    },
    # Table 2, CMU-MOSEI (the last five rows of each block are the paper's own variants).
    ("mosei", True): {
        "full": (50.7, 80.6, 80.8, 0.623, 0.700),
        "vision": (43.5, 66.4, 69.3, 0.756, 0.343),
        "language": (46.5, 77.4, 78.2, 0.653, 0.631),
        "language_vision": (48.4, 79.5, 79.6, 0.639, 0.633),
        "kt": (51.1, 80.0, 80.3, 0.635, 0.637),
        "mctn": (49.6, 79.8, 80.6, 0.609, 0.670),  # unnamed in the extracted text: see BASELINES
    },
    ("mosei", False): {
        "full": (49.7, 79.8, 80.1, 0.641, 0.681),
        "vision": (42.1, 65.7, 68.4, 0.741, 0.339),
        "language": (45.4, 76.9, 77.1, 0.660, 0.623),
        "language_vision": (47.9, 78.2, 79.1, 0.649, 0.627),
        "kt": (49.6, 79.4, 79.5, 0.646, 0.648),
        "mctn": (48.2, 79.3, 79.7, 0.631, 0.645),  # "CTC + MCTN"; unnamed in the extracted text: see BASELINES
    },
}

EMOTION_COLUMNS = ("happy_acc", "happy_f1", "sad_acc", "sad_f1", "angry_acc", "angry_f1", "neutral_acc", "neutral_f1")

PAPER_IEMOCAP = {
    # Table 3, IEMOCAP.
    True: {
        "full": (90.3, 88.1, 86.4, 86.0, 87.3, 87.0, 72.2, 70.1),
        "vision": (83.7, 81.6, 81.5, 81.2, 82.0, 81.3, 63.2, 62.7),
        "language": (85.3, 85.9, 85.7, 84.2, 86.1, 85.6, 70.1, 68.7),
        "language_vision": (89.1, 86.8, 85.9, 85.0, 86.1, 85.2, 70.0, 69.4),
        "kt": (90.1, 87.6, 87.5, 85.5, 87.2, 86.8, 71.9, 70.1),
        "mctn": (84.9, 83.1, 80.5, 79.6, 79.7, 80.4, 62.3, 57.0),
    },
    False: {
        "full": (84.8, 81.9, 77.7, 74.1, 73.9, 70.2, 62.5, 59.7),
        "vision": (77.7, 72.6, 69.9, 68.3, 68.1, 64.6, 57.3, 51.2),
        "language": (79.3, 78.8, 74.6, 71.8, 71.6, 67.5, 60.2, 55.9),
        "language_vision": (82.8, 81.0, 76.9, 72.8, 72.6, 68.2, 60.9, 58.4),
        "kt": (84.4, 81.7, 77.7, 74.0, 73.8, 69.6, 61.9, 59.5),
        "mctn": (80.5, 77.5, 72.0, 71.7, 64.9, 65.6, 49.4, 49.3),  # "CTC + MCTN"
    },
}

# The paper's other baselines (not variants here): reference rows for the tables, in the paper's
# units and column order (REGRESSION_COLUMNS, or EMOTION_COLUMNS for IEMOCAP). Unaligned rows are
# the paper's "CTC + X". The paper's extracted Table 2 (MOSEI) lost the method names: its baseline
# rows are assigned by their order and by their values, which match MulT's published Table 2
# (Tsai et al. 2019; aligned Graph-MFN, RAVEN, MCTN; unaligned CTC + RAVEN, CTC + MCTN). That match
# was not re-read from MulT's paper in this repository: check it before quoting the MOSEI rows.
BASELINES = {
    ("mosi", True): {
        "RMFN": (38.3, 78.4, 78.0, 0.922, 0.681),
        "MFM": (36.2, 78.1, 78.1, 0.951, 0.662),
        "RAVEN": (33.2, 78.0, 76.6, 0.915, 0.691),
    },
    ("mosi", False): {
        "CTC + RAVEN": (31.7, 72.7, 73.1, 1.076, 0.544),
    },
    ("mosei", True): {
        "Graph-MFN": (45.0, 76.9, 77.0, 0.71, 0.54),
        "RAVEN": (50.0, 79.1, 79.5, 0.614, 0.662),
    },
    ("mosei", False): {
        "CTC + RAVEN": (45.5, 75.4, 75.7, 0.664, 0.599),
    },
    ("iemocap", True): {
        "RMFN": (87.5, 85.8, 83.8, 82.9, 85.1, 84.6, 69.5, 69.1),
        "MFM": (90.2, 85.8, 88.4, 86.1, 87.5, 86.7, 72.1, 68.1),
        "RAVEN": (87.3, 85.8, 83.4, 83.1, 87.3, 86.7, 69.7, 69.3),
    },
    ("iemocap", False): {
        "CTC + RAVEN": (77.0, 76.8, 67.6, 65.6, 65.0, 64.1, 62.0, 59.5),
    },
}

# Table 4 (target modality of the cross-modal transformers) and Table 5 (consistency loss),
# both on CMU-MOSEI aligned, kt variant.
PAPER_TARGETS = {
    "text": (49.0, 79.7, 80.2, 0.636, 0.632),
    "audio": (48.2, 79.6, 80.0, 0.639, 0.627),
    "vision": (48.4, 79.5, 79.6, 0.641, 0.633),
    "all": (51.1, 80.0, 80.3, 0.635, 0.630),
}
PAPER_CONSISTENCY = {
    "l1": (50.9, 79.7, 80.1, 0.639, 0.631),
    "l2": (51.1, 80.0, 80.3, 0.635, 0.637),
}


def paper_row(dataset: str, aligned: bool, variant: str) -> dict | None:
    """The paper's numbers for a variant as {metric: value} in our units (fractions for accuracies)."""
    if dataset == "iemocap":
        row = PAPER_IEMOCAP.get(aligned, {}).get(variant)
        return None if row is None else {k: v / 100 for k, v in zip(EMOTION_COLUMNS, row)}
    row = PAPER.get((dataset, aligned), {}).get(variant)
    if row is None:
        return None
    return {k: (v / 100 if k.startswith(("acc", "f1")) else v) for k, v in zip(REGRESSION_COLUMNS, row)}


def _as_metrics(row, dataset: str) -> dict:
    if dataset == "iemocap":
        return {k: v / 100 for k, v in zip(EMOTION_COLUMNS, row)}
    return {k: (v / 100 if k.startswith(("acc", "f1")) else v) for k, v in zip(REGRESSION_COLUMNS, row)}


def baseline_rows(dataset: str, aligned: bool) -> dict:
    """The paper's other baselines on this dataset and alignment: {name: {metric: value}} in our
    units (fractions for accuracies); {} where the paper has none."""
    return {name: _as_metrics(row, dataset) for name, row in BASELINES.get((dataset, aligned), {}).items()}

"""What the three benchmark datasets look like, as the public MulT files ship them.

Every number here is from REFERENCE.md (the MulT pickles, Tsai et al. 2019): feature dims,
sequence lengths of the aligned and unaligned files, and split sizes. The synthetic generator
builds data of exactly these shapes, and the readers check real files against them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mskt.modalities import MODALITIES  # noqa: F401 -- re-exported: the data speak of the same three
SPLITS = ("train", "valid", "test")
EMOTIONS = ("neutral", "happy", "sad", "angry")  # MulT's IEMOCAP label order


@dataclass(frozen=True)
class DataShape:
    name: str
    task: str  # "regression" (sentiment in [-3, 3]) or "emotions" (4 binary emotions)
    dims: dict  # modality -> feature dim
    aligned_len: int  # every modality has this many steps in the word-aligned files
    unaligned_lens: dict  # modality -> steps in the *_noalign files
    split_sizes: dict  # split -> number of samples

    def lengths(self, aligned: bool) -> dict:
        return {m: self.aligned_len for m in MODALITIES} if aligned else dict(self.unaligned_lens)


DATA_SHAPES = {
    # MOSI: GloVe 300, COVAREP subset 5, Facet 20; 1284 / 229 / 686 segments.
    "mosi": DataShape(
        name="mosi",
        task="regression",
        dims={"text": 300, "audio": 5, "vision": 20},
        aligned_len=50,
        unaligned_lens={"text": 50, "audio": 375, "vision": 500},
        split_sizes={"train": 1284, "valid": 229, "test": 686},
    ),
    # MOSEI: GloVe 300, COVAREP 74, Facet 35; 16326 / 1871 / 4659 segments.
    "mosei": DataShape(
        name="mosei",
        task="regression",
        dims={"text": 300, "audio": 74, "vision": 35},
        aligned_len=50,
        unaligned_lens={"text": 50, "audio": 500, "vision": 500},
        split_sizes={"train": 16326, "valid": 1871, "test": 4659},
    ),
    # IEMOCAP: same feature sets as MOSEI, 20 aligned steps; about 2717 / 789 / 938 utterances.
    "iemocap": DataShape(
        name="iemocap",
        task="emotions",
        dims={"text": 300, "audio": 74, "vision": 35},
        aligned_len=20,
        unaligned_lens={"text": 20, "audio": 400, "vision": 500},
        split_sizes={"train": 2717, "valid": 789, "test": 938},
    ),
}


def data_shape(name: str) -> DataShape:
    from mskt.errors import ConfigError

    key = name.lower().replace("cmu-", "").replace("cmu_", "")
    if key not in DATA_SHAPES:
        raise ConfigError(f"unknown dataset preset {name!r}; allowed: {', '.join(DATA_SHAPES)}")
    return DATA_SHAPES[key]


# ----------------------------------------------------------------------------------------------
# Dataset identity: which paper rows and which label range a file's data have. Feature dims are
# not part of it: extractors vary (GloVe 300 or BERT 768 text, COVAREP 5 or 74, Facet 20/35/47,
# OpenFace, librosa, wav2vec), and the model reads its dims from the data.

DATASETS = ("mosi", "mosei", "iemocap", "sims", "other")  # what `--dataset` may name, besides "auto"

# Sentiment range per dataset: CMU-MOSI and CMU-MOSEI are annotated in [-3, 3]; CH-SIMS (MMSA's
# release) in [-1, 1]. A dataset of no known name keeps the MOSI convention.
LABEL_RANGES = {"mosi": (-3.0, 3.0), "mosei": (-3.0, 3.0), "sims": (-1.0, 1.0), "other": (-3.0, 3.0)}

# The task each named dataset holds ("other" may hold either).
DATASET_TASKS = {"mosi": "regression", "mosei": "regression", "iemocap": "emotions", "sims": "regression"}

# The feature dims of each dataset's usual release, only to say in the load report how a file
# differs: the paper's MulT files, and MMSA's CH-SIMS (BERT 768, librosa 33, OpenFace 709).
REFERENCE_DIMS = {
    **{name: dict(shape.dims) for name, shape in DATA_SHAPES.items()},
    "sims": {"text": 768, "audio": 33, "vision": 709},
}


def dataset_identity(name: str) -> str:
    """The identity behind a dataset's name: one of ``DATASETS`` ("other" for a user's own name)."""
    key = str(name).lower()
    return key if key in DATASETS else "other"


def label_range(name: str) -> tuple[float, float]:
    """The sentiment range (low, high) of the dataset called ``name`` (regression only)."""
    return LABEL_RANGES[dataset_identity(name)]

"""Your own data (issue 20): files whose feature dims differ from the paper's, datasets beyond the
paper's three (CH-SIMS in MMSA's layout), and the dataset identity that decides paper rows, label
range and metrics. The files are written in the exact MulT and MMSA layouts by ``tests/formats.py``;
every check states its expectation from what the writer put in."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.metrics import f1_score

import formats as fmt
from mskt.cli import main
from mskt.config import Config
from mskt.data.readers import load_dataset
from mskt.errors import ConfigError, DataError
from mskt.experiments.grid import run_grid
from mskt.experiments.paper import paper_row
from mskt.metrics import compute_metrics, regression_metrics, sims_regression_metrics

SIZES = {"train": 8, "valid": 4, "test": 5}
ALIGNED = {"text": 6, "audio": 6, "vision": 6}
SIMS_DIMS = {"text": 768, "audio": 33, "vision": 709}  # MMSA's CH-SIMS: BERT, librosa, OpenFace
SIMS_STEPS = {"text": 39, "audio": 24, "vision": 55}  # unaligned_39.pkl: text and vision as shipped, audio cut from 400
TINY_FLAGS = ["--d-model", "8", "--heads", "2", "--encoder-layers", "1", "--kt-layers", "1", "--crossmodal-layers", "1",
              "--memory-layers", "1", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--progress", "off", "--cpu-kernels", "torch"]


def _mult_file(path, dims, labels=None, seed=0):
    """A MulT pickle (left-padded, labels (N, 1, 1)) with feature dims ``dims``; ``labels`` per split replace the drawn ones."""
    obj, _ = fmt.custom_mult_object(SIZES, ALIGNED, dims, seed=seed, min_length=1)
    for s, values in (labels or {}).items():
        obj[s]["labels"] = np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    return fmt.write_pickle(path, obj), obj


def _sims_file(path, dims=SIMS_DIMS, label_range=(-1.0, 1.0), seed=0):
    obj, lens = fmt.custom_mmsa_object(SIZES, SIMS_STEPS, dims, aligned=False, label_range=label_range, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    return fmt.write_pickle(path, obj), obj, lens


def _identity_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "mskt" and "feature dims" in r.getMessage()]


def _one_line_error(call) -> str:
    with pytest.raises(DataError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# Feature dims other than the paper's


def test_issue_case_50_dim_mosi_loads_with_one_line_naming_its_dims(tmp_path, caplog):
    """The issue's file: real CMU-MOSI utterance features of 50 dims each and -1/+1 labels, saved as a
    MulT ``mosi_data.pkl``, used to be refused ('expected feature dim 300 for mosi, found 50')."""
    rng = np.random.default_rng(1)
    labels = {s: rng.choice([-1.0, 1.0], size=n) for s, n in SIZES.items()}
    path, obj = _mult_file(tmp_path / "mosi_data.pkl", {"text": 50, "audio": 50, "vision": 50}, labels)
    with caplog.at_level(logging.INFO, logger="mskt"):
        ds = load_dataset(path)
    assert ds.dims == {"text": 50, "audio": 50, "vision": 50}
    assert ds.meta.name == "mosi" and ds.meta.task == "regression" and ds.meta.aligned
    for s in SIZES:
        np.testing.assert_array_equal(ds[s].labels, labels[s].astype(np.float32))
        np.testing.assert_array_equal(ds[s].text, obj[s]["text"])
    lines = _identity_lines(caplog)
    assert len(lines) == 1, lines
    assert "mosi_data.pkl" in lines[0] and "dataset mosi" in lines[0] and "[-3, 3]" in lines[0]
    assert "feature dims text 50, audio 50, vision 50" in lines[0]
    assert "text 300, audio 5, vision 20" in lines[0]  # the paper's, beside them


def test_dims_must_still_agree_across_splits(tmp_path):
    path, obj = _mult_file(tmp_path / "mosi_data.pkl", {"text": 768, "audio": 5, "vision": 20})
    obj["valid"]["text"] = obj["valid"]["text"][:, :, :300]
    fmt.write_pickle(path, obj)
    msg = _one_line_error(lambda: load_dataset(path))
    assert "mosi_data.pkl" in msg and "'valid'" in msg and "'text'" in msg and "feature dim 300 disagrees with split 'train' (768)" in msg


def test_bert_mosi_mult_pickle_trains_and_evaluates_against_the_paper(tmp_path, capsys):
    """BERT-dimension MOSI (text 768) in MulT's layout: ``mskt train`` reads its dims from the data,
    the run is MOSI (paper rows, Acc7 in [-3, 3]), and ``mskt evaluate`` scores it the same way."""
    path, _ = _mult_file(tmp_path / "data" / "mosi_data.pkl", {"text": 768, "audio": 5, "vision": 20})
    run = tmp_path / "run"
    assert main(["train", "--data", str(path), "--variant", "kt", "--out", str(run), *TINY_FLAGS]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["text_dim"], cfg["audio_dim"], cfg["vision_dim"]) == (768, 5, 20)
    assert cfg["dataset"] == "mosi"  # resolved from the file name, so the run folder says what it was
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"] == "mosi"
    assert {"acc7", "acc5", "acc2_nonzero", "f1_nonzero", "mae", "corr"} <= set(metrics["test"])
    assert paper_row("mosi", True, "kt") is not None
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--run", str(run), "--out", str(out)]) == 0
    evaluated = json.loads(out.read_text())["test"]
    assert evaluated.keys() == metrics["test"].keys()
    assert evaluated["mae"] == pytest.approx(metrics["test"]["mae"], rel=1e-5)
    assert "acc7" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# CH-SIMS in MMSA's layout


def test_sims_mmsa_file_loads_as_sims(tmp_path, caplog):
    path, obj, lens = _sims_file(tmp_path / "SIMS" / "Processed" / "unaligned_39.pkl")
    with caplog.at_level(logging.INFO, logger="mskt"):
        ds = load_dataset(path)
    assert ds.meta.name == "sims" and ds.meta.format == "mmsa-pickle" and ds.meta.task == "regression"
    assert ds.meta.aligned is False
    assert ds.dims == SIMS_DIMS
    for s in SIZES:
        np.testing.assert_array_equal(ds[s].labels, obj[s]["regression_labels"])
        for m in ("audio", "vision"):
            np.testing.assert_array_equal(ds[s].lengths[m], lens[s][m])
    (line,) = _identity_lines(caplog)
    assert "dataset sims (from the file)" in line and "sentiment in [-1, 1]" in line
    assert "feature dims text 768, audio 33, vision 709" in line and "differ" not in line


def test_sims_grid_trains_and_reports_mmsa_sims_metrics_without_paper_rows(tmp_path):
    path, _, _ = _sims_file(tmp_path / "SIMS" / "Processed" / "unaligned_39.pkl")
    base = Config.from_dict({**_tiny_config(), "data": str(path)})
    runs = run_grid(base, ["kt"], seeds=1, out_dir=tmp_path / "grid")
    test_keys = {"acc2", "acc3", "acc5", "f1", "mae", "corr"}
    assert test_keys <= set(runs.columns) and "acc7" not in runs.columns
    row = runs.iloc[0]
    (run_dir,) = [p for p in (tmp_path / "grid").iterdir() if p.is_dir()]
    assert json.loads((run_dir / "config.json").read_text())["dataset"] == "sims"
    # The grid's numbers are MMSA's MetricsTop on this run's own test predictions, not just in range.
    from mskt.train import Tensors, load_run, predict

    ds = load_dataset(str(path))
    _, model = load_run(run_dir)
    out = predict(model, Tensors.from_split(ds["test"], "regression", "cpu"), missing="audio")  # the default protocol: audio missing
    reference = _mmsa_sims_reference(out["pred"], out["labels"])
    for k in test_keys:
        assert row[k] == pytest.approx(reference[k], abs=1e-9), k
    table = (tmp_path / "grid" / "results.md").read_text()
    assert "| acc2 | acc3 | acc5 | f1 | mae | corr |" in table
    assert "(paper)" not in table and "CH-SIMS conventions" in table
    cells = [c.strip() for c in table.split("| kt | 1 | ")[1].split("|")[:6]]  # one seed: mean ± 0
    assert cells == [f"{100 * reference[k]:.1f} ± 0.0" for k in ("acc2", "acc3", "acc5", "f1")] + [f"{reference[k]:.3f} ± 0.000" for k in ("mae", "corr")]


def _tiny_config() -> dict:
    return dict(d_model=8, heads=2, encoder_layers=1, kt_layers=1, crossmodal_layers=1, memory_layers=1, epochs=1,
                batch_size=8, eval_batch_size=8, device="cpu", progress="off", cpu_kernels="torch", seed=7)


def _mmsa_sims_reference(y_pred, y_true) -> dict:
    """MMSA's ``MetricsTop.__eval_sims_regression``, transcribed loop for loop (numpy and sklearn)."""
    test_preds = np.clip(np.asarray(y_pred, dtype=np.float64), -1.0, 1.0)
    test_truth = np.clip(np.asarray(y_true, dtype=np.float64), -1.0, 1.0)
    out = {}
    for k, ms in ((2, [-1.01, 0.0, 1.01]), (3, [-1.01, -0.1, 0.1, 1.01]), (5, [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01])):
        preds_k, truth_k = test_preds.copy(), test_truth.copy()
        for i in range(k):
            preds_k[np.logical_and(test_preds > ms[i], test_preds <= ms[i + 1])] = i
        for i in range(k):
            truth_k[np.logical_and(test_truth > ms[i], test_truth <= ms[i + 1])] = i
        out[f"acc{k}"] = np.sum(np.round(preds_k) == np.round(truth_k)) / float(len(truth_k))
        if k == 2:
            out["f1"] = f1_score(truth_k, preds_k, average="weighted")
    out["mae"] = np.mean(np.absolute(test_preds - test_truth))
    out["corr"] = np.corrcoef(test_preds, test_truth)[0][1]
    return out


def test_sims_metrics_are_mmsa_metricstop():
    rng = np.random.default_rng(0)
    edges = np.array([-1.0, -0.7, -0.1, 0.0, 0.1, 0.7, 1.0])  # every bin edge, where (lo, hi] matters
    y = np.concatenate([edges, rng.choice(np.round(np.arange(-1, 1.01, 0.2), 1), size=200)])
    p = np.concatenate([edges[::-1], rng.uniform(-1.6, 1.6, size=200)])  # beyond [-1, 1] too: clipped
    ours, ref = sims_regression_metrics(p, y), _mmsa_sims_reference(p, y)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k
    assert compute_metrics("regression", p, y, "sims") == ours
    assert compute_metrics("regression", p, y, "mosi") == regression_metrics(p, y)
    # Exactly on an edge: 0 is negative for Acc2, 0.1 is neutral for Acc3, -0.7 is class 0 of Acc5.
    assert sims_regression_metrics([0.0], [-0.5])["acc2"] == 1.0
    assert sims_regression_metrics([0.1], [-0.1])["acc3"] == 0.0 and sims_regression_metrics([0.1], [0.05])["acc3"] == 1.0
    assert sims_regression_metrics([-0.7], [-1.0])["acc5"] == 1.0
    assert sims_regression_metrics([1.7], [1.0])["mae"] == 0.0  # clipped before the error, as MMSA


# ----------------------------------------------------------------------------------------------
# Identity: from the file, or given


def test_identity_given_overrides_the_file(tmp_path, caplog):
    labels = {s: np.linspace(-1, 1, n) for s, n in SIZES.items()}
    custom, _ = _mult_file(tmp_path / "my_features.pkl", {"text": 64, "audio": 12, "vision": 35}, labels)
    with caplog.at_level(logging.INFO, logger="mskt"):
        ds = load_dataset(custom)
    assert ds.meta.name == "my_features"  # an unknown dataset keeps its own name and has no paper row
    assert paper_row(ds.meta.name, True, "kt") is None
    assert "dataset other" in _identity_lines(caplog)[0] and "no paper rows" in _identity_lines(caplog)[0]
    assert load_dataset(custom, dataset="sims").meta.name == "sims"
    assert load_dataset(custom, dataset="mosei").meta.name == "mosei"
    mosi, _ = _mult_file(tmp_path / "mosi_data.pkl", {"text": 768, "audio": 5, "vision": 20})
    assert load_dataset(mosi, dataset="other").meta.name == "other"  # so no paper row either
    # A SIMS release with other extractors (audio 25, vision 177) in a folder of another name is
    # not recognised by its dims; --dataset sims says what it is.
    v2, _, _ = _sims_file(tmp_path / "chsims_v2" / "unaligned.pkl", dims={"text": 768, "audio": 25, "vision": 177})
    assert load_dataset(v2).meta.name == "chsims_v2"
    assert load_dataset(v2, dataset="sims").meta.name == "sims"


def test_identity_that_does_not_fit_the_data_is_a_one_line_error(tmp_path):
    mosi, _ = _mult_file(tmp_path / "mosi_data.pkl", {"text": 768, "audio": 5, "vision": 20})  # labels in [-3, 3]
    msg = _one_line_error(lambda: load_dataset(mosi, dataset="sims"))
    assert "mosi_data.pkl" in msg and "expected sentiment in [-1, 1] for sims" in msg and "--dataset mosi" in msg
    # SIMS by its dims, but with labels of MOSI's range: refused, and the way out named.
    wide, _, _ = _sims_file(tmp_path / "SIMS" / "unaligned_39.pkl", label_range=(-3.0, 3.0))
    msg = _one_line_error(lambda: load_dataset(wide))
    assert "unaligned_39.pkl" in msg and "[-1, 1] for sims" in msg
    assert load_dataset(wide, dataset="other").meta.name == "other"
    emotions, _ = fmt.write_mult_pickle(tmp_path, "iemocap", True)[:2]
    msg = _one_line_error(lambda: load_dataset(emotions, dataset="mosi"))
    assert "iemocap_data.pkl" in msg and "--dataset mosi holds regression labels" in msg and "emotions" in msg
    with pytest.raises(DataError, match="dataset='chsims' is not allowed; choose one of auto, mosi, mosei, iemocap, sims, other"):
        load_dataset(mosi, dataset="chsims")
    with pytest.raises(ConfigError, match="dataset='chsims' is not allowed; choose one of auto, mosi, mosei, iemocap, sims, other"):
        Config.from_dict({"dataset": "chsims"})


def test_cli_dataset_flag_reaches_info_and_the_store(tmp_path, capsys):
    labels = {s: np.linspace(-1, 1, n) for s, n in SIZES.items()}
    path, _ = _mult_file(tmp_path / "features.pkl", {"text": 768, "audio": 33, "vision": 709}, labels)
    store = tmp_path / "sims.h5"
    assert main(["data", "convert", str(path), str(store), "--dataset", "sims"]) == 0
    capsys.readouterr()
    assert main(["data", "info", str(store)]) == 0
    assert "dataset sims" in capsys.readouterr().out
    assert load_dataset(store).meta.name == "sims"
    assert main(["data", "info", str(path), "--dataset", "iemocap"]) == 2
    assert "holds emotions labels, but the file holds regression labels" in capsys.readouterr().err

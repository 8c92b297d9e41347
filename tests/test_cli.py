"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from formats import write_mult_pickle

ROOT = Path(__file__).resolve().parents[1]
REAL_CSD = ROOT.parent / "shared" / "data" / "real" / "CMU_MOSI_Opinion_Labels.csd"
TINY_MODEL = ["--d-model", "8", "--heads", "2", "--encoder-layers", "1", "--kt-layers", "1", "--crossmodal-layers", "1", "--memory-layers", "1"]


def mskt(*args, cwd=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSKT_HOME": str(cwd or ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mskt", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"mskt {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.skipif(not REAL_CSD.exists(), reason="../shared/data/real is not beside the repository")
def test_data_info_on_the_real_csd():
    out = mskt("data", "info", REAL_CSD).stdout
    assert "93 videos, 2199 segments" in out
    assert "value range [-3, 3]" in out


def test_synth_writes_a_store_that_info_reads(tmp_path):
    store = tmp_path / "mosi.h5"
    mskt("data", "synth", "--preset", "mosi", "--unaligned", "--scale", "0.02", "--seed", "3", "--out", store)
    out = mskt("data", "info", store).stdout
    assert "unaligned" in out and "mskt-h5" in out
    assert "train     text" in out and "375" in out and "500" in out  # MOSI unaligned steps: text 50, audio 375, vision 500


def test_convert_a_mult_pickle_round_trips(tmp_path):
    from mskt.data.readers import load_dataset

    pkl, _, _ = write_mult_pickle(tmp_path, "mosi")
    out_h5 = tmp_path / "mosi.h5"
    proc = mskt("data", "convert", pkl, out_h5)
    assert "wrote" in proc.stdout
    a, b = load_dataset(pkl), load_dataset(out_h5)
    for s in a.splits:
        for m in ("text", "audio", "vision"):
            assert np.array_equal(a[s].features[m], b[s].features[m])
        assert np.array_equal(a[s].labels, b[s].labels)
        assert list(a[s].ids) == list(b[s].ids)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["data", "info", "missing.pkl"], "missing.pkl: no such file"),
        (["train", "--variant", "bogus"], "variant='bogus' is not allowed"),
        (["train", "--epochs", "ten"], "epochs must be int"),
        (["grid", "--variants", "full,nope", "--out", "x"], "unknown variant"),
        (["grid", "--variants", "full,kt", "--against", "vision", "--out", "x"], "--against vision: not among --variants full,kt"),
        (["grid", "--variants", "full,kt", "--bootstrap", "10", "--out", "x"], "--bootstrap needs --against"),
    ],
)
def test_expected_errors_are_one_line_without_traceback(args, needle, tmp_path):
    proc = mskt(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def test_a_malicious_pickle_is_refused_by_the_cli(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "mosi_data.pkl"
    bad.write_bytes(pickle.dumps({"train": Payload()}))
    proc = mskt("data", "info", bad, check=False)
    assert proc.returncode == 2 and "refused to unpickle" in proc.stderr and "system" in proc.stderr
    assert not marker.exists()


def test_train_then_evaluate_and_grid(tmp_path):
    run = tmp_path / "runs" / "kt"
    data = ["--data", "synthetic:mosi", "--data-scale", "0.02", "--epochs", "2", "--batch-size", "8"]
    out = mskt("train", "--variant", "kt", *data, *TINY_MODEL, "--out", run, cwd=tmp_path).stdout
    assert "best epoch" in out and "mae" in out
    for name in ("config.json", "history.csv", "metrics.json", "checkpoint.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())

    # Evaluating the run on its own data reproduces its test metrics exactly.
    mskt("evaluate", "--run", run, "--out", tmp_path / "eval.json", cwd=tmp_path)
    again = json.loads((tmp_path / "eval.json").read_text())["test"]
    assert again == pytest.approx(metrics["test"], abs=1e-6)

    # Another dataset's test split of the same shape works; one of another shape is refused.
    mskt("evaluate", "--run", run, "--data", "synthetic:mosi", cwd=tmp_path)
    proc = mskt("evaluate", "--run", run, "--data", "synthetic:mosei", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "does not fit the run" in proc.stderr

    grid = tmp_path / "grid"
    out = mskt("grid", "--variants", "language,kt", "--seeds", "2", *data, *TINY_MODEL, "--out", grid, cwd=tmp_path).stdout
    assert "| kt |" in out
    table = (grid / "results.md").read_text()
    assert "| language | 2 |" in table and "| kt | 2 |" in table and "(paper)" not in table  # synthetic: no paper rows
    runs = (grid / "runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 4
    assert not (grid / "comparisons.md").exists() and "comparisons" not in out  # only with --against

    # --against: the same runs (read back), each other variant against kt, paired by seed
    out = mskt("grid", "--variants", "language,kt", "--seeds", "2", "--against", "kt", *data, *TINY_MODEL, "--out", grid, cwd=tmp_path).stdout
    compared = (grid / "comparisons.md").read_text()
    assert compared in out and compared.count("| language vs kt | ") == 7  # every metric of the results table
    assert "Holm correction across the table's 7 tests" in compared
    rows = (grid / "comparisons.csv").read_text().splitlines()
    assert len(rows) == 1 + 7 and rows[0].startswith("a,b,metric,n,")
    assert not (grid / "bootstrap.csv").exists() and "bootstrap" not in compared  # only with --bootstrap

    # --bootstrap: seeds x test samples from the runs' per-sample predictions (which reproduce metrics.json)
    mskt("grid", "--variants", "language,kt", "--seeds", "2", "--against", "kt", "--bootstrap", "50", *data, *TINY_MODEL, "--out", grid, cwd=tmp_path)
    boot = pd.read_csv(grid / "bootstrap.csv")
    assert len(boot) == 7 and set(boot["n_seeds"]) == {2} and set(boot["n_boot"]) == {50} and (boot["ci_lo"] <= boot["ci_hi"]).all()
    tests = pd.read_csv(grid / "comparisons.csv").set_index("metric")
    assert boot.set_index("metric")["delta"].to_numpy() == pytest.approx(tests.loc[boot["metric"], "delta"].to_numpy(), abs=1e-5)
    assert "50 resamples" in (grid / "comparisons.md").read_text()


def test_grid_on_a_real_dataset_file_puts_the_papers_rows_beside_ours(tmp_path):
    pkl, _, _ = write_mult_pickle(tmp_path, "mosi")  # mosi_data.pkl: CMU-MOSI aligned, as MulT ships it
    grid = tmp_path / "grid"
    mskt("grid", "--data", pkl, "--variants", "language,kt", "--seeds", "1", "--epochs", "1", "--batch-size", "4", *TINY_MODEL, "--out", grid, cwd=tmp_path)
    table = (grid / "results.md").read_text()
    # Table 1 of the paper, CMU-MOSI aligned: Language only 36.4 / 78.1 / 77.3 / 0.751 / 0.619; Ours 39.1 / 82.3 / 82.2 / 0.858 / 0.691.
    assert "| *language (paper)* | | 36.4 | 78.1 | 77.3 |" in table
    assert "| *kt (paper)* | | 39.1 | 82.3 | 82.2 |" in table
    assert "0.751" in table and "0.691" in table


# ----------------------------------------------------------------------------------------------
# The log: a warning names its logger once.

FALLBACK = """
import logging, sys
from mskt.cli import configure_logging
configure_logging()
import torch
torch.set_num_threads(1)
from mskt.fast import accelerate, compiled_kernels
from mskt.model import ModelConfig, build_model
from mskt.model.layers import TransformerLayer
assert compiled_kernels() is not None  # the test is about the fallback line, not about building
class SubclassedLayer(TransformerLayer):
    pass
model = build_model(ModelConfig(variant="full", d_model=8, heads=2, encoder_layers=1, crossmodal_layers=1, memory_layers=1,
                                text_dim=5, audio_dim=3, vision_dim=4))
model.crossmodal["audio->text"].layers[0].__class__ = SubclassedLayer
accelerate(model)
"""


def test_the_fallback_warning_names_its_logger_once(tmp_path):
    from mskt.fast import compiled_kernels

    if compiled_kernels() is None:
        pytest.skip("the compiled kernels are not available here: no stack is accelerated, so none falls back")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSKT_HOME": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "mskt.fast: 1 stack runs its Python code (crossmodal.audio->text): layers.0 is a SubclassedLayer, not a TransformerLayer"
    ], lines


def test_log_messages_do_not_carry_their_logger_name(caplog):
    """A format with %(name)s (pytest's, logging.basicConfig()'s default, the CLI's for warnings)
    adds the name; a message that carried it too read "mskt.fast: mskt.fast: ..."."""
    import logging

    from mskt.cli import LogFormat
    from mskt.fast import accelerate, compiled_kernels
    from mskt.model import ModelConfig, build_model
    from mskt.model.layers import TransformerLayer

    if compiled_kernels() is None:
        pytest.skip("the compiled kernels are not available here: no stack is accelerated, so none falls back")

    class SubclassedLayer(TransformerLayer):
        pass

    model = build_model(ModelConfig(variant="full", d_model=8, heads=2, encoder_layers=1, crossmodal_layers=1, memory_layers=1,
                                    text_dim=5, audio_dim=3, vision_dim=4))
    model.crossmodal["audio->text"].layers[0].__class__ = SubclassedLayer
    with caplog.at_level(logging.WARNING, logger="mskt.fast"):
        accelerate(model)
    (record,) = [r for r in caplog.records if r.name == "mskt.fast"]
    assert record.getMessage().startswith("1 stack runs its Python code (crossmodal.audio->text)"), record.getMessage()
    formatted = logging.Formatter("%(name)s: %(message)s").format(record)
    assert formatted.count("mskt.fast") == 1, formatted

    # The CLI's format: a warning gets its logger's name, an INFO line stays as it is.
    assert LogFormat("%(message)s").format(record) == formatted
    info = logging.LogRecord("mskt", logging.INFO, __file__, 1, "data.pkl: dataset mosi", (), None)
    assert LogFormat("%(message)s").format(info) == "data.pkl: dataset mosi"

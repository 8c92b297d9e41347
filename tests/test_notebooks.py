"""Every numbered notebook runs headlessly through papermill with smoke parameters, writes its
figures (PDF with embedded TrueType fonts, and PNG) and holds no error output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("papermill")

from mskt.errors import MsktError
from mskt.notebooks import declared_parameters, notebook_paths, run_notebooks

ROOT = Path(__file__).resolve().parents[1]

# The figures each notebook must write (names without extension).
EXPECTED_FIGURES = {
    "01_data_exploration.ipynb": ["01_labels", "01_lengths", "01_feature_statistics", "01_modality_correlation"],
    "02_training.ipynb": ["02_training_history"],
    "03_reconstruction_quality.ipynb": ["03_reconstruction_quality", "03_error_breakdown", "03_examples", "03_projection", "03_error_relation"],
    "04_attention_maps.ipynb": ["04_attention_sample0_layer1", "04_attention_average"],
    "05_ablations.ipynb": ["05_results", "05_ablations"],
}


def _listing(folder: Path) -> set:
    return set(folder.iterdir()) if folder.is_dir() else set()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("notebooks")
    before = _listing(ROOT / "runs"), _listing(ROOT / "figures")
    results = run_notebooks(smoke=True, out_dir=out, log=lambda line: None)
    after = _listing(ROOT / "runs"), _listing(ROOT / "figures")
    return out, results, before, after


def test_every_notebook_has_a_parameters_cell_with_smoke():
    for path in notebook_paths():
        assert "smoke" in declared_parameters(path), path.name


def test_every_notebook_runs_with_smoke_parameters(smoke_run):
    out, results, _, _ = smoke_run
    assert [r.notebook for r in results] == [p.name for p in notebook_paths()]
    failed = [(r.notebook, r.error) for r in results if r.status != "ok"]
    assert not failed, failed
    for r in results:
        nb = json.loads(r.output.read_text())
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, (r.notebook, errors)


@pytest.mark.parametrize("notebook", sorted(EXPECTED_FIGURES))
def test_each_notebook_writes_its_figures(smoke_run, notebook):
    out, _, _, _ = smoke_run
    for name in EXPECTED_FIGURES[notebook]:
        pdf, png = out / "figures" / f"{name}.pdf", out / "figures" / f"{name}.png"
        assert pdf.is_file() and png.is_file(), name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        data = pdf.read_bytes()
        assert b"/FontFile2" in data, f"{name}.pdf: fonts are not embedded TrueType"  # Type 42 = TrueType
        assert b"/Subtype /Type3" not in data, f"{name}.pdf has Type 3 fonts"


def test_smoke_runs_write_only_into_their_own_folder(smoke_run):
    out, _, before, after = smoke_run
    assert (out / "figures").is_dir() and (out / "kt-run" / "metrics.json").is_file()
    assert (out / "ablations" / "variants" / "results.csv").is_file()
    assert after == before, "a smoke run wrote into the repository's runs/ or figures/"


def test_a_relative_output_folder_is_resolved_before_the_notebooks_change_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MSKT_HOME", str(ROOT))  # the notebooks are found from the project root, not the cwd
    monkeypatch.chdir(tmp_path)
    results = run_notebooks(smoke=True, only=["02"], out_dir="relative-out", log=lambda line: None)
    assert results[0].status == "ok", results[0].error
    assert (tmp_path / "relative-out" / "kt-run" / "metrics.json").is_file()
    assert not (ROOT / "notebooks" / "relative-out").exists()


def test_unknown_parameters_are_refused(tmp_path):
    with pytest.raises(MsktError, match="no notebook declares"):
        run_notebooks(smoke=True, params={"epochz": 3}, out_dir=tmp_path, log=lambda line: None)


def test_a_failing_notebook_is_named_with_its_cell(tmp_path):
    results = run_notebooks(smoke=True, only=["01"], params={"data": str(tmp_path / "missing.pkl")}, out_dir=tmp_path, log=lambda line: None)
    assert results[0].status == "failed"
    assert "cell" in results[0].error and "DataError" in results[0].error

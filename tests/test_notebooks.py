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
    "06_robustness.ipynb": ["06_robustness_rates", "06_robustness_conditions", "06_robustness_steps", "06_robustness_matched",
                            "06_explorer_sample0_missing_audio"],
    "07_tuning.ipynb": ["07_optimization_history", "07_param_importances", "07_slice"],
    "08_when_kt_helps.ipynb": ["08_label_efficiency", "08_phase_diagram", "08_robustness"],
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


def test_executed_notebooks_hold_no_progress_output_no_widget_state_and_notes_as_plain_lines(smoke_run):
    """Nobody watches a runner's kernels (mskt.console): no tqdm bar (text or widget), no live curve,
    and in 02 no widget state at all (04 and 06 keep their explorers' widgets on purpose). The data's
    note (non-finite values replaced by 0: the synthetic audio has -inf) is a stdout line in every
    notebook, not a stderr box."""
    _, results, _, _ = smoke_run
    for r in results:
        nb = json.loads(r.output.read_text())
        state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
        names = [m.get("model_name") or m.get("state", {}).get("_model_name") for m in state.values()]
        progress = [n for n in names if n in ("FloatProgressModel", "IntProgressModel")]
        assert not progress, (r.notebook, progress)
        notes = []
        for cell in nb["cells"]:
            for o in cell.get("outputs", []):
                assert "transient" not in o and "display_id" not in o.get("metadata", {}), (r.notebook, o)  # no live curve
                text = "".join(o.get("text", ""))
                assert not any(bar in text for bar in ("%|", "it/s]", "epoch/s]", "run/s]", "trial/s]")), (r.notebook, text)
                if "replaced non-finite feature values by 0" in text:
                    notes.append(o["name"])
        assert notes and set(notes) == {"stdout"}, (r.notebook, notes)
    training = json.loads(next(r for r in results if r.notebook == "02_training.ipynb").output.read_text())
    assert "widgets" not in training["metadata"]
    outputs = [o for c in training["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("name") == "stderr"], "02 shows something on stderr"
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1, "02 shows its final figure once, and no live curve"


def test_smoke_runs_write_only_into_their_own_folder(smoke_run):
    out, _, before, after = smoke_run
    assert (out / "figures").is_dir() and (out / "kt-run" / "metrics.json").is_file()
    assert (out / "ablations" / "variants" / "results.csv").is_file()
    assert (out / "robustness" / "sweep.csv").is_file() and (out / "robustness" / "kt_any-seed1111" / "metrics.json").is_file()
    assert after == before, "a smoke run wrote into the repository's runs/ or figures/"


def test_a_relative_output_folder_is_resolved_before_the_notebooks_change_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MSKT_HOME", str(ROOT))  # the notebooks are found from the project root, not the cwd
    monkeypatch.chdir(tmp_path)
    results = run_notebooks(smoke=True, only=["02"], out_dir="relative-out", params={"figures_dir": "relative-figs"}, log=lambda line: None)
    assert results[0].status == "ok", results[0].error
    assert (tmp_path / "relative-out" / "kt-run" / "metrics.json").is_file()
    assert (tmp_path / "relative-figs" / "02_training_history.png").is_file()  # a *_dir parameter too
    assert not (ROOT / "notebooks" / "relative-out").exists()
    assert not (ROOT / "notebooks" / "relative-figs").exists()


def test_unknown_parameters_are_refused(tmp_path):
    with pytest.raises(MsktError, match="no notebook declares"):
        run_notebooks(smoke=True, params={"epochz": 3}, out_dir=tmp_path, log=lambda line: None)


def test_a_failing_notebook_is_named_with_its_cell(tmp_path):
    results = run_notebooks(smoke=True, only=["01"], params={"data": str(tmp_path / "missing.pkl")}, out_dir=tmp_path, log=lambda line: None)
    assert results[0].status == "failed"
    assert "cell" in results[0].error and "DataError" in results[0].error


# ----------------------------------------------------------------------------------------------
# Parameters are type-checked against the notebooks' declared defaults before anything runs.


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"smoke": "yes"}, "--param smoke='yes': 01_data_exploration.ipynb declares smoke = False, so give true or false"),
        ({"smoke": 1}, "give true or false"),
        ({"epochs": "ten"}, "declares epochs = 10, so give an integer"),
        ({"epochs": 2.5}, "give an integer"),
        ({"data_scale": "half"}, "give a finite number"),
        ({"data": 123}, "give a string; a value that parses as JSON is read as JSON, so quote it"),
        ({"samples": 3}, "give a JSON list"),
        ({"overrides": "consistency=l1"}, "give a JSON object"),
    ],
)
def test_parameters_of_the_wrong_type_are_refused_before_anything_runs(tmp_path, params, needle):
    out = tmp_path / "out"
    with pytest.raises(MsktError) as err:
        run_notebooks(params=params, out_dir=out, log=lambda line: None)
    assert needle in str(err.value)
    assert not out.exists()


def test_cli_strings_are_parsed_to_the_declared_types():
    from mskt.notebooks import check_params, declared_defaults, parse_params

    params = parse_params(["smoke=true", "epochs=3", "data_scale=1", "data=mosi_data.pkl", "samples=[2, 3]", 'overrides={"consistency": "l1"}'])
    assert params == {"smoke": True, "epochs": 3, "data_scale": 1, "data": "mosi_data.pkl", "samples": [2, 3], "overrides": {"consistency": "l1"}}
    check_params(params, {p: declared_defaults(p) for p in notebook_paths()})  # no error


# ----------------------------------------------------------------------------------------------
# A failing notebook: exit 2 naming notebook and cell, summary.json, and no figure of it in place.


def _notebook(cells: list[str]) -> dict:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('smoke = False\nfigures_dir = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(src) for src in cells]
    return nb


SAVE = (
    "from matplotlib.figure import Figure\n"
    "from mskt.viz.plots import save_figure\n"
    "fig = Figure(figsize=(1, 1))\n"
    "fig.add_subplot().plot([0, 1])\n"
    "save_figure(fig, {name!r}, figures_dir or None)"
)


@pytest.fixture
def failing_project(tmp_path):
    """A project (MSKT_HOME) whose 01 saves a figure and succeeds, 02 saves one and then raises."""
    import nbformat

    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    nbformat.write(_notebook([SAVE.format(name="good")]), root / "notebooks" / "01_good.ipynb")
    nbformat.write(_notebook([SAVE.format(name="broken"), 'raise RuntimeError("deliberate failure")']), root / "notebooks" / "02_broken.ipynb")
    (root / "figures").mkdir()
    (root / "figures" / "broken.png").write_bytes(b"an older, complete figure")  # must survive untouched
    return root


def test_a_failing_notebook_exits_2_and_leaves_no_figure_looking_complete(failing_project):
    import os
    import subprocess
    import sys

    root, out = failing_project, failing_project / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSKT_HOME": str(root)}
    env.pop("MSKT_FIGURE_STAGING", None)
    proc = subprocess.run([sys.executable, "-m", "mskt", "notebooks", "--out", str(out)], capture_output=True, text=True, cwd=root, env=env, timeout=240)

    # Exit 2 and one error line on stderr, naming the notebook, the cell and the error; no traceback,
    # and nothing from the kernels (the runner's own lines go to stdout).
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mskt: error:")]
    # libzmq itself may abort a dying kernel's socket with one line of its own (seen once in CI:
    # "Assertion failed: pfd.revents & POLLIN (src/signaler.cpp:238)"): not the runner's, not a kernel warning.
    others = [line for line in proc.stderr.strip().splitlines() if line not in errors and not line.startswith("Assertion failed: pfd.revents")]
    assert len(errors) == 1 and others == [], proc.stderr
    assert "02_broken.ipynb failed at cell In [" in errors[0]
    assert '`raise RuntimeError("deliberate failure")`' in errors[0] and "RuntimeError: deliberate failure" in errors[0]
    assert "01_good.ipynb" in proc.stdout and "02_broken.ipynb" in proc.stdout and "summary.json" in proc.stdout

    # The notebook that succeeded has its figure in place; the failed one's never got there, and the
    # older figure of the same name is untouched. No temporary or staging files are left in place.
    figures = root / "figures"
    assert sorted(p.name for p in figures.iterdir()) == ["broken.png", "good.pdf", "good.png"]
    assert (figures / "good.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (figures / "broken.png").read_bytes() == b"an older, complete figure"
    assert not (out / ".staging").exists()

    # What the failed notebook saved is kept aside, marked FAILED, saying where it was meant to go.
    kept = out / "02_broken.failed-figures"
    assert "did not finish" in (kept / "FAILED").read_text() and str(figures / "broken.png") in (kept / "FAILED").read_text()
    assert len(list(kept.glob("*-broken.png"))) == 1

    # summary.json: per notebook status, seconds, error; the run failed.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["not_run"] == []
    good, broken = summary["notebooks"]
    assert (good["notebook"], good["status"], good["error"]) == ("01_good.ipynb", "ok", "")
    assert sorted(good["figures"]) == [str(figures / "good.pdf"), str(figures / "good.png")]
    assert broken["notebook"] == "02_broken.ipynb" and broken["status"] == "failed" and broken["figures"] == []
    assert "cell In [" in broken["error"] and "RuntimeError: deliberate failure" in broken["error"]
    assert good["seconds"] > 0 and broken["seconds"] > 0
    assert not list(out.glob(".*.tmp"))  # summary.json was written through a temporary file


def test_outside_the_runner_save_figure_writes_in_place(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from mskt.viz.plots import STAGING_ENV, save_figure

    monkeypatch.delenv(STAGING_ENV, raising=False)
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    paths = save_figure(fig, "direct", tmp_path / "figs")
    assert paths == [tmp_path / "figs" / "direct.pdf", tmp_path / "figs" / "direct.png"]
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["direct.pdf", "direct.png"]

    # Under the runner it stages instead, and commit_figures puts the files where they were meant to go.
    from mskt.notebooks import commit_figures

    stage = tmp_path / "stage"
    monkeypatch.setenv(STAGING_ENV, str(stage))
    paths = save_figure(fig, "staged", tmp_path / "later")
    assert not (tmp_path / "later").exists()
    assert sorted(commit_figures(stage)) == sorted(p.resolve() for p in paths)
    assert sorted(p.name for p in (tmp_path / "later").iterdir()) == ["staged.pdf", "staged.png"]
    assert not stage.exists()


# ----------------------------------------------------------------------------------------------
# The main job's log: the notebooks and their times, nothing from the kernels.


def test_the_log_of_a_run_holds_only_the_notebooks_and_their_times(tmp_path):
    """Over jupyter's default TCP transport every kernel printed "Kernel is running over TCP without
    encryption" to the runner's stderr (8 times in a main job); the runner's kernels use IPC sockets."""
    import os
    import subprocess
    import sys

    import nbformat

    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    for name in ("01_one", "02_two"):
        nbformat.write(_notebook(["print('ran')"]), root / "notebooks" / f"{name}.ipynb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSKT_HOME": str(root)}
    env.pop("MSKT_FIGURE_STAGING", None)
    out = root / "out"
    proc = subprocess.run([sys.executable, "-m", "mskt", "notebooks", "--out", str(out)], capture_output=True, text=True, cwd=root, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "without encryption" not in proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["01_one.ipynb", "02_two.ipynb"], lines
    assert all(line.split()[1].endswith("s") and line.split()[2] == "ok" for line in lines[:-1]), lines
    assert lines[-1].startswith(f"executed notebooks in {out}"), lines


def test_the_notebooks_show_paired_comparisons(smoke_run):
    """05 shows every variant against kt and the ablations against the default, paired by seed; 06 the
    robustness reading, which with the smoke run's one training seed says it cannot test."""
    out, results, _, _ = smoke_run
    text = {r.notebook: json.dumps(json.loads(r.output.read_text())["cells"]) for r in results}
    assert "language_vision vs kt" in text["05_ablations.ipynb"] and "Holm correction across the table" in text["05_ablations.ipynb"]
    assert "ablations against targets=all: not tested (ablation_seeds=1" in text["05_ablations.ipynb"]
    assert "vs full+drop: not tested: 1 common seed(s)" in text["06_robustness.ipynb"]


# ----------------------------------------------------------------------------------------------
# What a notebook writes where: figures/ only when told (the main job tells it), and a run_dir
# with no run is an error naming the path as resolved (from the project root, not notebooks/).


def test_figures_go_to_figures_only_when_told(monkeypatch, tmp_path):
    from mskt.paths import notebook_figures_dir

    monkeypatch.setenv("MSKT_HOME", str(tmp_path))
    assert notebook_figures_dir("", smoke=False) == tmp_path / "runs" / "scratch-figures"
    assert notebook_figures_dir("", smoke=True) == tmp_path / "runs" / "scratch-figures"
    assert notebook_figures_dir("figures", smoke=False) == tmp_path / "figures"  # explicit: the main job's way
    assert notebook_figures_dir("paper/figs", smoke=True) == tmp_path / "paper" / "figs"  # relative: from the root
    assert notebook_figures_dir(str(tmp_path / "x"), smoke=True) == tmp_path / "x"
    for given in ("figures", str(tmp_path / "figures"), "figures/../figures"):
        with pytest.raises(MsktError, match=r"a smoke run never writes the repository's figures/") as e:
            notebook_figures_dir(given, smoke=True)
        assert "\n" not in str(e.value)


def test_every_notebook_resolves_its_figures_through_the_helper_and_the_main_job_passes_figures(monkeypatch, tmp_path):
    """Each notebook takes its folder from notebook_figures_dir(figures_dir, smoke) (through the shared
    preamble, mskt.notebooks.setup) and saves only
    there; the main job (no --smoke) passes the repository's figures/ explicitly."""
    for path in notebook_paths():
        source = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        assert "figures = setup(figures_dir, smoke, plugins)" in source, path.name  # mskt.notebooks.setup: notebook_figures_dir
        assert "figures_dir or" not in source and "save_figure(fig, name)" not in source, path.name

    import mskt.notebooks as runner

    seen = {}
    monkeypatch.setattr(runner, "_run_each", lambda pm, paths, defaults, shared, *a: seen.update(shared=shared) or [])
    runner.run_notebooks(smoke=False, only=["01"], out_dir=tmp_path, log=lambda line: None)
    assert seen["shared"]["figures_dir"] == str(ROOT / "figures")
    runner.run_notebooks(smoke=True, only=["01"], out_dir=tmp_path, log=lambda line: None)
    assert seen["shared"]["figures_dir"] == str(tmp_path / "figures")


def _git_status(*paths) -> str | None:
    import subprocess

    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *paths], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def test_plain_papermill_with_smoke_leaves_the_committed_figures_alone(tmp_path, monkeypatch):
    """What the issue saw: `papermill notebooks/01_... out.ipynb -p smoke True`, run as a user runs
    it (cwd notebooks/, no runner), rewrote the tracked figures/. Now it writes runs/scratch-figures/
    and figures/ is unchanged, byte for byte (and in git's view)."""
    import os
    import time

    import papermill as pm

    monkeypatch.delenv("MSKT_HOME", raising=False)
    monkeypatch.delenv("MSKT_FIGURE_STAGING", raising=False)
    def snapshot():  # git's view where there is one, and the files' bytes either way
        return _git_status("figures"), {p: p.read_bytes() for p in (ROOT / "figures").rglob("*") if p.is_file()}

    # Notebook 01 up to its first figure: the rest draws more of the same (10 s more).
    nb = json.loads((ROOT / "notebooks" / "01_data_exploration.ipynb").read_text())
    first = next(i for i, c in enumerate(nb["cells"]) if "save_figure" in "".join(c["source"]))
    nb["cells"] = nb["cells"][: first + 1]
    (tmp_path / "01_first_figure.ipynb").write_text(json.dumps(nb))

    before = snapshot()
    started = time.time()
    pm.execute_notebook(str(tmp_path / "01_first_figure.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters={"smoke": True}, cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False)
    assert snapshot() == before, "plain papermill with smoke wrote into the repository's figures/"
    written = ROOT / "runs" / "scratch-figures" / "01_labels.png"
    assert written.is_file() and os.path.getmtime(written) >= started - 1


def test_a_run_dir_with_no_run_is_an_error_naming_the_path_resolved_from_the_project_root(tmp_path, monkeypatch):
    from mskt.paths import finished_run, is_finished_run

    monkeypatch.delenv("MSKT_HOME", raising=False)
    project = tmp_path / "project"
    for folder in ("mskt", "notebooks", "runs/empty"):
        (project / folder).mkdir(parents=True)
    (project / "pyproject.toml").touch()
    empty = project / "runs" / "empty"
    monkeypatch.chdir(project / "notebooks")  # where papermill and JupyterLab run a notebook's kernel
    with pytest.raises(MsktError) as e:
        finished_run("runs/empty")
    msg = str(e.value)
    assert f"resolved to {empty}:" in msg and "missing config.json, checkpoint.pt, metrics.json" in msg and "\n" not in msg
    with pytest.raises(MsktError, match=f"resolved to {project / 'runs' / 'nothing'}: no such folder"):
        finished_run("runs/nothing")
    for name in ("config.json", "checkpoint.pt", "metrics.json"):
        assert not is_finished_run(empty)
        (empty / name).write_text("{}")
    assert finished_run("runs/empty") == empty
    monkeypatch.chdir(project)
    assert finished_run("runs/empty") == empty  # the same folder from the root as from notebooks/
    monkeypatch.chdir(ROOT)

    # The notebook itself (papermill, kernel in notebooks/): an error, not a new model trained there.
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "notebooks" / "03_reconstruction_quality.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"smoke": True, "run_dir": "runs/no-such-run"}, cwd=str(ROOT / "notebooks"),
                            kernel_name="python3", progress_bar=False)
    assert f"resolved to {ROOT / 'runs' / 'no-such-run'}: no such folder" in e.value.evalue
    assert not (ROOT / "notebooks" / "runs").exists() and not (ROOT / "runs" / "no-such-run").exists()


def test_every_notebook_takes_its_folder_parameters_from_the_project_root():
    """Papermill runs a notebook in notebooks/: a relative out_dir, grid_dir, robustness_dir, sweep_dir or
    run_dir given to it must still mean <root>/..., as on the command line (issue 29). Each notebook's
    folder parameters go through mskt.paths.resolve_path (or finished_run, or mskt.notebooks.run_or_train,
    which uses both), never a bare Path()."""
    import re

    folder_params = re.compile(r"\b(out_dir|grid_dir|robustness_dir|sweep_dir|run_dir)\b")
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
        bare = [line.strip() for line in code.splitlines() if re.search(r"Path\((out_dir|grid_dir|robustness_dir|sweep_dir|run_dir)\)", line)
                or re.search(r"project_root\(\) / (out_dir|grid_dir|robustness_dir|sweep_dir|run_dir)\b", line)]
        assert not bare, f"{nb.name}: folder parameter taken from the working folder: {bare}"
        if folder_params.search(code.split("\n", 1)[1] if "\n" in code else ""):
            assert any(f in code for f in ("resolve_path", "finished_run", "run_or_train")), f"{nb.name}: folder parameters not resolved from the project root"
        if re.search(r"^data: str", code, re.M) and "run_or_train(" not in code:  # 03, 04: run_or_train resolves it
            assert "data = resolve_data_source(data)" in code, f"{nb.name}: its data path is not resolved from the project root"


def _tiny_project(tmp_path):
    """A project folder (pyproject.toml and mskt/ mark its root) with notebooks/, as mskt.paths finds it."""
    project = tmp_path / "project"
    for folder in ("mskt", "notebooks", "data"):
        (project / folder).mkdir(parents=True)
    (project / "pyproject.toml").touch()
    return project


def test_a_relative_data_path_is_read_from_the_project_root_under_plain_papermill(tmp_path, monkeypatch):
    """A notebook's relative ``data`` file means <root>/..., like its folder parameters, also under
    plain papermill, whose kernel runs in notebooks/; a synthetic source stays as it is."""
    import papermill as pm

    from mskt.data.readers import load_dataset
    from mskt.data.store import write_store
    from mskt.paths import resolve_data_source

    monkeypatch.delenv("MSKT_HOME", raising=False)
    project = _tiny_project(tmp_path)
    store = project / "data" / "tiny.h5"
    write_store(load_dataset("synthetic:mosi", scale=0.01, seed=0), store)
    monkeypatch.chdir(project / "notebooks")
    assert resolve_data_source("data/tiny.h5") == str(store)
    assert resolve_data_source(str(store)) == str(store)
    assert resolve_data_source("synthetic:mosi-unaligned?audio_shared=0.5") == "synthetic:mosi-unaligned?audio_shared=0.5"

    # Notebook 01 up to the cell that loads its data, run as a user runs it: cwd notebooks/, no runner.
    nb = json.loads((ROOT / "notebooks" / "01_data_exploration.ipynb").read_text())
    load = next(i for i, c in enumerate(nb["cells"]) if "load_dataset(data" in "".join(c["source"]))
    nb["cells"] = nb["cells"][: load + 1]
    (tmp_path / "01_load.ipynb").write_text(json.dumps(nb))
    pm.execute_notebook(str(tmp_path / "01_load.ipynb"), str(tmp_path / "out.ipynb"), parameters={"smoke": True, "data": "data/tiny.h5"},
                        cwd=str(project / "notebooks"), kernel_name="python3", progress_bar=False)
    out = json.loads((tmp_path / "out.ipynb").read_text())["cells"][-1]["outputs"]
    assert f"{store}: mskt-h5" in "".join("".join(o.get("text", "")) for o in out), out
    monkeypatch.chdir(ROOT)


def test_the_notebook_preamble_imports_plugins_from_the_project_root_and_returns_the_figures_folder(tmp_path, monkeypatch):
    import sys

    from mskt.errors import ConfigError
    from mskt.notebooks import setup
    from mskt.plugins import module_name_for

    monkeypatch.delenv("MSKT_HOME", raising=False)
    project = _tiny_project(tmp_path)
    (project / "mine.py").write_text("LOADED = True\n")
    monkeypatch.chdir(project / "notebooks")  # where papermill and JupyterLab run a notebook's kernel
    assert setup("", True, []) == project / "runs" / "scratch-figures"
    name = module_name_for(project / "mine.py")
    assert name not in sys.modules
    assert setup("figs", False, ["mine.py"]) == project / "figs"
    assert sys.modules.pop(name).LOADED
    with pytest.raises(ConfigError, match=r"plugins: \S*nothing\.py: no such file"):
        setup("", False, ["nothing.py"])
    monkeypatch.chdir(ROOT)


def test_run_or_train_trains_the_variant_it_is_given_or_loads_the_run(tmp_path):
    from mskt.notebooks import run_or_train

    trained = run_or_train("", variant="language_vision", smoke=True, out_dir=str(tmp_path))
    assert trained.config.variant == "language_vision" and (tmp_path / "language_vision-run" / "metrics.json").is_file()
    assert len(trained.test) == len(trained.dataset["test"]) > 0
    loaded = run_or_train(str(tmp_path / "language_vision-run"), variant="kt")  # a run given: its variant, not the parameter
    assert loaded.config.variant == "language_vision" and len(loaded.test) == len(trained.test)
    with pytest.raises(MsktError, match="no finished run in it"):
        run_or_train(str(tmp_path))

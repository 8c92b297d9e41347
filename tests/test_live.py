"""Progress where a person watches, none where nobody does; a live training curve; notes as plain lines.

The rule (mskt.console): $MSKT_PROGRESS decides when set; in a Jupyter kernel, a frontend that takes
input (JupyterLab) watches and nbclient (papermill) does not; elsewhere a terminal without $CI.
tests/test_browser.py sees the bars and the live curve in JupyterLab itself; here the parts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from mskt import console
from mskt.train import train

try:
    from conftest import tiny_run_config
except ImportError:  # tests/ imported as a package
    from tests.conftest import tiny_run_config


class FakeKernel:
    def __init__(self, allow_stdin: bool):
        self.request = {"header": {"msg_type": "execute_request"}, "content": {"code": "", "allow_stdin": allow_stdin}}

    def get_parent(self, channel=None):
        return self.request


@pytest.mark.parametrize("env, kernel, tty, ci, expected", [
    ("off", FakeKernel(True), True, "", False),   # the runner says it: no bars, even for a person's frontend
    ("on", None, False, "1", True),
    ("", FakeKernel(True), False, "1", True),     # JupyterLab: bars, also on a CI machine (the browser test)
    ("", FakeKernel(False), True, "", False),     # nbclient (papermill, nbconvert --execute)
    ("", None, True, "", True),                   # a terminal
    ("", None, True, "1", False),                 # ... under CI
    ("", None, False, "", False),                 # a pipe, a log file
])
def test_who_watches(monkeypatch, env, kernel, tty, ci, expected):
    monkeypatch.setenv(console.PROGRESS_ENV, env)
    monkeypatch.setattr(console, "jupyter_kernel", lambda: kernel)
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: tty, raising=False)
    monkeypatch.setenv("CI", ci)
    assert console.watched() is expected
    assert console.progress_enabled("auto") is expected
    assert console.progress_enabled("on") and not console.progress_enabled("off")  # a config's explicit setting wins


def test_a_kernel_without_get_parent_falls_back_to_its_stdin_flag():
    class Old:
        _allow_stdin = True

    assert console.frontend_takes_input(Old()) and not console.frontend_takes_input(object())


def test_bars_show_only_where_enabled_and_inner_bars_go_inside_an_outer_one(capsys):
    list(console.progress_bar(range(3), desc="quiet", setting="off"))
    assert capsys.readouterr().err == ""
    with console.outer_progress(2, desc="outer", setting="on") as outer:
        inner = console.progress_bar(range(2), desc="inner", setting="on")
        assert not inner.leave  # it goes away when done: one bar per grid, not one per run
        list(inner)
        with console.outer_progress(5, desc="nested outer", setting="on") as nested:
            assert nested.disable  # a sweep's grids: only the outermost bar shows
        outer.update(2)
    err = capsys.readouterr().err
    assert "outer: 100%" in err and "2/2" in err and "nested outer" not in err
    assert console.progress_bar(range(1), desc="top", setting="on").leave


def test_a_watched_run_shows_its_epochs_and_a_live_curve(tiny_mosi, capsys, monkeypatch):
    """progress "on" (what auto gives in JupyterLab): a bar over the epochs with the last train and
    validation loss; the live curve displays once and then updates that one output per epoch."""
    import IPython.display

    from mskt.viz.live import LiveHistory, live_history

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj.data))

    def display(obj, display_id=False):
        assert display_id is True
        shown.append(("display", obj.data))
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    assert live_history("off") is None
    live = live_history("on")
    assert isinstance(live, LiveHistory)
    result = train(tiny_run_config(variant="kt", epochs=2, progress="on"), save=False, dataset=tiny_mosi, on_epoch=live)
    err = capsys.readouterr().err
    assert "kt: 100%" in err and "2/2" in err and "train=" in err and f"valid={result.history['valid_loss'].iloc[-1]:.4f}" in err
    assert [kind for kind, _ in shown] == ["display", "update"]
    assert shown[0][1].startswith(b"\x89PNG") and shown[0][1] != shown[1][1]  # the figure changed: epoch 2 was drawn
    assert sorted(live.rows) == [1, 2]
    resumed = LiveHistory(result.history)  # a resumed run starts from the epochs it keeps; a redone epoch replaces its row
    resumed(2, result.history.iloc[1].to_dict())
    assert sorted(resumed.rows) == [1, 2] and resumed.draws == 1


def test_a_note_is_info_in_the_log_and_one_plain_line_in_a_kernel(monkeypatch, caplog, capsys):
    logger = logging.getLogger("mskt.test_live")
    monkeypatch.setattr(console, "jupyter_kernel", lambda: None)
    with caplog.at_level(logging.INFO, logger="mskt"):
        console.note(logger, "%s: replaced %d values", "file.pkl", 3)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, "file.pkl: replaced 3 values")]
    assert capsys.readouterr().out == ""  # outside a kernel the log is the one place
    caplog.clear()
    monkeypatch.setattr(console, "jupyter_kernel", lambda: FakeKernel(True))
    with caplog.at_level(logging.WARNING, logger="mskt"):  # the notebooks configure WARNING
        console.note(logger, "%s: replaced %d values", "file.pkl", 3)
    assert capsys.readouterr().out == "file.pkl: replaced 3 values\n"


@pytest.mark.slow
def test_plain_papermill_shows_no_bars_and_notes_are_plain_lines(tmp_path, monkeypatch):
    """A real kernel under papermill, without the runner's $MSKT_PROGRESS: nobody watches, and a
    note is one stdout line, not a stderr box."""
    pm = pytest.importorskip("papermill")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.delenv(console.PROGRESS_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import logging\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from mskt.console import jupyter_kernel, note, watched\n"
        "print(jupyter_kernel() is not None, watched())\n"
        "note(logging.getLogger('mskt'), 'a note')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source, out = tmp_path / "probe.ipynb", tmp_path / "probe.out.ipynb"
    nbformat.write(nb, source)
    pm.execute_notebook(str(source), str(out), kernel_name="python3", progress_bar=False, log_output=False, cwd=str(tmp_path))
    outputs = json.loads(out.read_text())["cells"][0]["outputs"]
    assert [(o["output_type"], o.get("name"), "".join(o.get("text", ""))) for o in outputs] == [("stream", "stdout", "True False\na note\n")]


def _fake_run(cfg, run_dir, dataset=None) -> dict:
    return {"best_epoch": 1, "seconds": 0.0, "test": {"mae": 1.0}}


@pytest.mark.parametrize("progress", ["on", "off"])
def test_a_grid_and_a_sweep_count_their_runs_in_one_bar(tmp_path, monkeypatch, capsys, progress):
    """The runs themselves are stubbed: only the bars are under test."""
    from mskt.experiments import grid, label_efficiency

    monkeypatch.setattr(grid, "_run_one", _fake_run)
    monkeypatch.setattr(grid, "load_dataset", lambda *a, **k: None)
    base = tiny_run_config(progress=progress, data="synthetic:mosi")
    grid.run_configs(base, {"a": {}, "b": {}}, seeds=2, out_dir=tmp_path / "grid")
    err = capsys.readouterr().err
    assert ("runs of grid: 100%" in err and "4/4" in err and "b seed 8: best epoch 1" in err) is (progress == "on"), err
    assert progress == "on" or err == ""
    label_efficiency.sweep(base, fractions=(0.5, 1.0), values=(0.0, 1.0), variants=("language_vision",), seeds=1, out_dir=tmp_path / "sweep")
    err = capsys.readouterr().err
    assert ("sweep runs: 100%" in err and "4/4" in err) is (progress == "on"), err
    assert "runs of audio_shared" not in err  # its grids show no bar of their own inside the sweep's


def test_a_study_counts_its_trials(tmp_path, monkeypatch, capsys):
    import types

    import mskt.train
    from mskt.experiments.tune import tune

    def fake_train(cfg, out_dir=None, dataset=None, resume=False, on_epoch=None):
        return types.SimpleNamespace(metrics={"valid": {"loss": cfg.lr}})

    monkeypatch.setattr(mskt.train, "train", fake_train)
    tune(tiny_run_config(progress="on", data="synthetic:mosi"), trials=2, study="bar", root=tmp_path, dataset=object())
    err = capsys.readouterr().err
    assert "trials of bar: 100%" in err and "2/2" in err and "best " in err, err


@pytest.mark.slow
def test_the_stop_button_ends_a_run_in_one_line_and_leaves_it_resumable(tmp_path):
    """A real kernel interrupted while it trains (JupyterLab's stop button is this interrupt): the
    cell's error is the one line that resumes the run, and the run folder keeps its epochs."""
    jupyter_client = pytest.importorskip("jupyter_client")
    from mskt.train import load_checkpoint

    run = tmp_path / "run"
    code = (
        "import sys, time\n"
        "sys.path.insert(0, %r)\n"
        "from conftest import tiny_run_config\n"
        "from mskt.data.synthetic import make_synthetic\n"
        "from mskt.train import train\n"
        "data = make_synthetic('mosi', aligned=True, scale=0.01, seed=0)\n"
        "def slow(epoch, row):\n"
        "    print('epoch', epoch, flush=True)\n"
        "    time.sleep(0.5)\n"
        "train(tiny_run_config(epochs=100), out_dir=%r, dataset=data, on_epoch=slow)\n"
    ) % (str(Path(__file__).parent), str(run))
    km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    try:
        msg_id = kc.execute(code)
        error, interrupted = None, False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and "epoch 2" in content["text"] and not interrupted:
                km.interrupt_kernel()  # what the stop button asks the server to do
                interrupted = True
            elif kind == "error":
                error = content
            elif kind == "status" and content["execution_state"] == "idle":
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert interrupted and error is not None, "the run was not interrupted"
    assert error["ename"] == "RunInterrupted" and len(error["traceback"]) == 1, error
    (line,) = error["traceback"]
    done = load_checkpoint(run / "last.pt")["epoch"]
    assert done >= 2 and not (run / "metrics.json").exists()
    assert line.startswith(f"interrupted after epoch {done} of 100; {run} keeps epochs 1-{done} (last.pt): resume with "), line

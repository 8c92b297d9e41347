"""The repository keeps its promises: the README's test command is what CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    return [l.strip() for l in lines if l.strip().startswith("python3 -m venv .venv &&")]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1, commands
    ci = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_command[0] in ci


def test_readme_has_a_main_job_command():
    assert any("pytest" not in c and ".venv/bin/mskt" in c for c in _readme_commands())


def test_no_notebook_is_committed_with_outputs():
    import json

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        dirty = [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and (c.get("outputs") or c.get("execution_count"))]
        assert not dirty, f"{path.name}: cells {dirty} hold outputs; strip them before committing"


def test_import_has_no_side_effects(tmp_path):
    import subprocess
    import sys

    code = "import mskt, mskt.model, mskt.fast, mskt.train, mskt.data, mskt.data.readers, mskt.cli, torch; print(torch.get_default_dtype(), torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    base = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_default_dtype(), torch.get_num_threads())"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout == base.stdout
    assert list(tmp_path.iterdir()) == []

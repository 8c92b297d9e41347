"""papermill sees every notebook's parameters: each is type-annotated with a one-line help comment,
`papermill --help-notebook` lists it with its type, and nothing is unparseable or unknown."""

from __future__ import annotations

import ast
import json
import logging
import re

import pytest

papermill = pytest.importorskip("papermill")
from click.testing import CliRunner  # noqa: E402  (papermill's CLI is a click command)
from papermill.cli import papermill as papermill_cli  # noqa: E402

from mskt.errors import MsktError  # noqa: E402
from mskt.notebooks import check_params, declared_defaults, notebook_paths  # noqa: E402

NOTEBOOKS = notebook_paths()


def _parameters_source(path) -> str:
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_parameter_is_annotated_with_a_help_comment(path):
    source = _parameters_source(path)
    for node in ast.parse(source).body:
        assert isinstance(node, ast.AnnAssign) and node.value is not None, (path.name, ast.unparse(node))
    for line in source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.search(r"\S\s+#\s+\S", line), f"{path.name}: no help comment on {line!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_papermill_help_lists_every_parameter_with_its_type(path, caplog):
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(papermill_cli, ["--help-notebook", str(path)])
    assert result.exit_code == 0, result.output
    assert "Unknown type" not in result.output, result.output
    assert not [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    for name, default in declared_defaults(path).items():
        kind = type(default).__name__
        assert re.search(rf"^\s+{name}: {kind} \(default ", result.output, re.M), (name, kind, result.output)


def test_the_annotation_is_the_type(tmp_path):
    nb = {
        "cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "rate: float = 1  # a rate\n", "outputs": [], "execution_count": None}],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = tmp_path / "01_x.ipynb"
    path.write_text(json.dumps(nb))
    assert declared_defaults(path) == {"rate": 1.0}
    check_params({"rate": 0.5}, {path: declared_defaults(path)})  # an int default does not make it an int
    with pytest.raises(MsktError, match="rate"):
        check_params({"rate": "fast"}, {path: declared_defaults(path)})
    nb["cells"][0]["source"] = 'epochs: int = "ten"  # per run\n'
    path.write_text(json.dumps(nb))
    with pytest.raises(MsktError, match=r"01_x.ipynb: parameter epochs is annotated int but its default is 'ten'"):
        declared_defaults(path)

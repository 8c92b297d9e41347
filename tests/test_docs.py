"""The documentation runs: every Python block of README.md and docs/*.md is executed (on tiny data
where it defines something), every ``python -c`` command runs, every ``mskt ...`` command line parses
with the real parser, and the prose facts a code block cannot show (which notebooks exist, the next
free notebook number, how parameters are declared) are compared with the code.

A block that must not run is marked, on the line right before its opening fence, with
``<!-- not run: reason -->``; one that reads names a notebook defined earlier gets them from ``GIVEN``
with ``<!-- run with: name name -->``. docs/extending.md ("Documentation that runs") describes both.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ----------------------------------------------------------------------------------------------
# Reading the Markdown


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None = None  # the reason, when marked <!-- not run: reason -->
    given: tuple = ()  # names from <!-- run with: ... -->

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{path}:{self.line}"


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(not run|run with)\s*:(.*?)-->\s*$")


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, dedented by their fence's indent, with their markers."""
    blocks, lines = [], path.read_text().splitlines()
    marker, i = None, 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():  # a marker holds only for the block right after it
                mm = MARKER.match(lines[i])
                marker = (mm.group(1), mm.group(2).strip()) if mm else None
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        block = Block(path, start, lang.lower(), "\n".join(body) + "\n")
        if marker:
            kind, value = marker
            if kind == "not run":
                assert value, f"{block.where}: <!-- not run: --> needs a reason"
                block.not_run = value
            else:
                block.given = tuple(value.split())
        blocks.append(block)
        marker = None
        i += 1
    return blocks


def all_blocks() -> list[Block]:
    return [b for path in DOCS for b in code_blocks(path)]


def python_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.lang in ("python", "py")]


# ----------------------------------------------------------------------------------------------
# Python blocks: executed, then what they define is called on tiny data


def _tiny_table():
    import pandas as pd

    from mskt.experiments.grid import summarize

    runs = pd.DataFrame({
        "label": ["full", "full", "kt", "kt"], "acc2_nonzero": [0.8, 0.82, 0.78, 0.8], "f1_nonzero": [0.8, 0.81, 0.77, 0.8],
        "mae": [0.85, 0.83, 0.9, 0.88], "corr": [0.7, 0.72, 0.68, 0.7],
    })
    return summarize(runs, "regression")


# Names a block may ask for with <!-- run with: ... -->: what the notebook cells before it define.
GIVEN = {
    "table": lambda tmp: _tiny_table(),
    "figures_dir": lambda tmp: str(tmp / "figures"),
    "smoke": lambda tmp: True,
    "plugins": lambda tmp: [],
}


def _exercise_read_npz(ns, tmp):
    import numpy as np

    from mskt.errors import DataError
    from mskt.modalities import MODALITIES

    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 6), ("valid", 3), ("test", 3)):
        for m, d in zip(MODALITIES, (4, 3, 2)):
            x = rng.normal(size=(n, 5, d)).astype(np.float32)
            x[0, :2] = 0  # a sample of length 3, left-padded
            arrays[f"{s}_{m}"] = x
        arrays[f"{s}_labels"] = rng.uniform(-3, 3, size=n).astype(np.float32)
        arrays[f"{s}_ids"] = np.array([f"{s}{i}" for i in range(n)])
    np.savez(tmp / "tiny.npz", **arrays)
    ds = ns["read_npz"](tmp / "tiny.npz")
    assert len(ds["train"]) == 6 and ds.meta.aligned and ds["train"].lengths["text"][0] == 3
    del arrays["test_ids"]
    np.savez(tmp / "broken.npz", **arrays)
    with pytest.raises(DataError, match="no array 'test_ids'"):
        ns["read_npz"](tmp / "broken.npz")


def _exercise_ccc(ns, tmp):
    import numpy as np

    y = np.array([-2.0, 0.5, 1.0, 3.0])
    assert ns["_ccc"](y, y) == pytest.approx(1.0)
    assert ns["_ccc"](2 * y + 1, y) < 0.9  # Pearson's r would be 1
    assert np.isnan(ns["_ccc"](np.ones(3), np.ones(3)))


def _exercise_kt_mlp(ns, tmp):
    import torch

    from conftest import make_batch_fn, tiny_model_config
    from mskt.model import build_model

    model = build_model(tiny_model_config(variant="kt_mlp"))
    assert isinstance(model, ns["KTMLP"]) and isinstance(model.transfer["vision->audio"], ns["StepMLP"])
    with torch.no_grad():
        out = model(make_batch_fn(model.cfg))
    assert out.pred.shape[0] == 4 and torch.isfinite(out.pred).all()


def _exercise_figure(ns, tmp):
    assert (tmp / "figures" / "09_results.png").is_file() and (tmp / "figures" / "09_results.pdf").is_file()


EXERCISES = {"read_npz": _exercise_read_npz, "_ccc": _exercise_ccc, "KTMLP": _exercise_kt_mlp, "fig": _exercise_figure}


@pytest.fixture
def registry_kept():
    """A block may register a variant; the registry is as it was afterwards."""
    from mskt.model import registry

    before = dict(registry.VARIANTS)
    yield
    registry.VARIANTS.clear()
    registry.VARIANTS.update(before)


def run_block(block: Block, tmp: Path) -> dict:
    unknown = [n for n in block.given if n not in GIVEN]
    assert not unknown, f"{block.where}: <!-- run with: --> names {unknown}; the test gives {sorted(GIVEN)}"
    import sys
    import types

    # A module of its own, as a user's file is: dataclasses (a variant's Options) look their module up.
    module = types.ModuleType("__doc_block__")
    ns = module.__dict__
    ns.update({n: GIVEN[n](tmp) for n in block.given})
    sys.modules["__doc_block__"] = module
    try:
        exec(compile(block.code, block.where, "exec"), ns)
    finally:
        del sys.modules["__doc_block__"]
    return ns


@pytest.mark.parametrize("block", [b for b in python_blocks() if not b.not_run], ids=lambda b: b.where)
def test_python_blocks_run(block, tmp_path, monkeypatch, registry_kept):
    from mskt.viz.plots import STAGING_ENV

    monkeypatch.delenv(STAGING_ENV, raising=False)  # a figure goes where the block says
    ns = run_block(block, tmp_path)
    for name, exercise in EXERCISES.items():
        if name in ns and name not in block.given:
            exercise(ns, tmp_path)


def test_blocks_that_do_not_run_say_why():
    marked = [b for b in all_blocks() if b.not_run]
    assert marked, "no block is marked <!-- not run: reason -->; is the marker still read?"
    for b in marked:
        assert len(b.not_run.split()) >= 2, f"{b.where}: say why it does not run, found {b.not_run!r}"


def test_a_broken_import_in_a_block_fails(tmp_path):
    """What docs/architecture.md held: mirrored_code imported from mskt.fast.stacks."""
    md = tmp_path / "broken.md"
    md.write_text("Print the digest:\n\n```python\nfrom mskt.fast.stacks import mirrored_code\n```\n\n"
                  "<!-- not run: a fragment -->\n```python\nreturn read_npz(path)\n```\n")
    blocks = code_blocks(md)
    assert [b.not_run for b in blocks] == [None, "a fragment"]
    with pytest.raises(ImportError, match="mirrored_code"):
        run_block(blocks[0], tmp_path)


# ----------------------------------------------------------------------------------------------
# python -c "..." commands, in code blocks and in inline code


PYTHON_C = re.compile(r"""python3?\s+-c\s+("(?:[^"\\]|\\.)*"|'[^']*')""")


def python_commands() -> list[tuple[str, str]]:
    """(where, code) of every python -c command not in a block marked not run."""
    found = []
    for path in DOCS:
        text = path.read_text()
        skipped = {b.line for b in code_blocks(path) if b.not_run}
        starts = [(b.line, b.line + b.code.count("\n")) for b in code_blocks(path) if b.line in skipped]
        for m in PYTHON_C.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            if any(a <= line <= z for a, z in starts):
                continue
            found.append((f"{path.relative_to(ROOT)}:{line}", shlex.split(m.group(1))[0]))
    return found


def test_python_commands_are_found():
    assert any("mirrored_code" in code for _, code in python_commands())


@pytest.mark.parametrize("where, code", python_commands(), ids=[w for w, _ in python_commands()])
def test_python_commands_run(where, code):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{where}: {code}\n{proc.stderr[-2000:]}"


# ----------------------------------------------------------------------------------------------
# mskt command lines: parsed by the real parser


SHELL_END = {"&&", "||", "|", ";", "do", "done", "then", "fi", ">", "2>&1"}


def shell_lines(code: str) -> list[str]:
    """Logical lines: continuations joined, comments dropped by shlex later."""
    return code.replace("\\\n", " ").splitlines()


def mskt_invocations(line: str) -> list[list[str]]:
    """The argument lists of every mskt call on a shell line, also quoted ones (sbatch --wrap "mskt ...")."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        raise AssertionError(f"not a shell line ({e}): {line}") from None
    calls, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        start = None
        if tok == "mskt" or tok.endswith("/mskt"):
            start = i + 1
        elif tok == "-m" and tokens[i + 1:i + 2] in (["mskt"], ["mskt.cli"]):
            start = i + 2
        elif " " in tok and re.search(r"(^|[\s/])mskt\s", tok):
            calls += mskt_invocations(tok)
        if start is None:
            i += 1
            continue
        args, i, optional = [], start, False
        while i < len(tokens) and tokens[i] not in SHELL_END:
            word = tokens[i]
            if word.startswith("[-"):  # [--flag value]: an optional part (a JSON list value starts otherwise)
                word, optional = word[1:], True
            if optional and word.endswith("]"):
                word, optional = word[:-1], False
            if word.endswith(";"):
                args.append(word[:-1])
                break
            args.append(word)
            i += 1
        calls.append(args)
    return calls


def _subparser(parser, words):
    """The sub-parser that takes the options after ``words`` (e.g. data info)."""
    import argparse

    for w in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or w not in actions[0].choices:
            break
        parser = actions[0].choices[w]
    return parser


def check_mskt_args(args: list[str]) -> None:
    """Raise AssertionError naming what is wrong; parsing only, nothing runs."""
    from mskt.cli import _import_plugins, build_parser
    from mskt.errors import MsktError

    cwd = os.getcwd()
    os.chdir(ROOT)  # the docs' commands run from the project root: --plugin docs/examples/kt_gru.py
    try:
        _import_plugins(args)  # as `mskt` does before it builds its parser: the plugin's options are flags
    finally:
        os.chdir(cwd)
    parser = build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parsed = parser.parse_args(args)
        except SystemExit as e:
            if e.code:
                raise AssertionError(f"mskt {' '.join(args)}: {err.getvalue().strip().splitlines()[-1]}") from None
            return  # --help
    # argparse accepts an unambiguous prefix (--epoch for --epochs): the docs spell flags out.
    sub = _subparser(parser, [a for a in args if not a.startswith("-")][:2])
    for a in args:
        flag = a.split("=", 1)[0]
        if flag.startswith("--") and flag not in sub._option_string_actions:
            raise AssertionError(f"mskt {' '.join(args)}: {flag} is not a flag of {sub.prog} (argparse took it as an abbreviation)")
    if parsed.command in ("train", "grid", "tune") and not any("$" in a for a in args):  # $v: a shell variable
        from mskt.cli import _config_from_args
        from mskt.model import VARIANTS

        try:
            _config_from_args(parsed)  # values: a variant, a preset, a number where a number belongs
        except MsktError as e:
            raise AssertionError(f"mskt {' '.join(args)}: {e}") from None
        bad = [v for v in getattr(parsed, "variants", "").split(",") if v and v not in VARIANTS]
        if parsed.command == "grid" and bad:
            raise AssertionError(f"mskt {' '.join(args)}: unknown variant(s) {bad}")
    if parsed.command == "notebooks":
        from mskt.notebooks import check_params, declared_defaults, notebook_paths, parse_params

        only = [o.strip() for o in parsed.only.split(",")] if parsed.only else None
        try:
            check_params(parse_params(parsed.param), {p: declared_defaults(p) for p in notebook_paths(only)})
        except MsktError as e:
            raise AssertionError(f"mskt {' '.join(args)}: {e}") from None


def mskt_lines(paths=DOCS) -> list[tuple[str, list[str]]]:
    found = []
    for path in paths:
        for b in code_blocks(path):
            if b.lang not in ("bash", "sh", "shell", "console"):  # an unnamed block is output, not commands
                continue
            for line in shell_lines(b.code):
                for args in mskt_invocations(line):
                    found.append((f"{b.where}: {line.strip()[:80]}", args))
    return found


def test_the_readme_command_lines_are_found():
    readme = [args for where, args in mskt_lines([ROOT / "README.md"])]
    subcommands = {a[0] for a in readme if a}
    assert {"data", "train", "evaluate", "grid", "tune", "notebooks", "bench"} <= subcommands, subcommands
    assert ["train", "--preset", "mosei-unaligned", "--variant", "kt", "--out", "runs/kt-mosei"] in readme  # torchrun ... -m mskt train
    assert any(a[:3] == ["train", "--preset", "mosi"] and "$v" in a for a in readme)  # inside sbatch --wrap "..."
    assert any("--missing-mode" in a and "step" in a for a in readme)  # [--missing-mode step]


@pytest.mark.parametrize("where, args", mskt_lines(), ids=[w for w, _ in mskt_lines()])
def test_mskt_command_lines_parse(where, args):
    check_mskt_args(args)


@pytest.mark.parametrize(
    "line, needle",
    [
        ("mskt trian --data synthetic:mosi", "invalid choice: 'trian'"),
        ("mskt train --data synthetic:mosi --epoch-count 3", "unrecognized arguments: --epoch-count"),
        ("mskt train --data synthetic:mosi --epoch 3", "--epoch is not a flag of mskt train"),
        ("mskt evaluate --run runs/kt --missing-rates 0.3", "unrecognized arguments: --missing-rates"),
        ("mskt data synth --out x.h5", "the following arguments are required: --preset"),
        ("  torchrun --standalone -m mskt tune --data synthetic:mosi --trails 3", "unrecognized arguments: --trails"),
        ('sbatch --wrap "mskt grid --out runs/g --variant kt"', "--variant is not a flag of mskt grid"),
        ("mskt notebooks --only 03 --param epochz=3", "no notebook declares it"),
        ("mskt notebooks --only 01 --param smoke=yes", "so give true or false"),
        ("mskt train --data synthetic:mosi --variant kt_mpl", "variant='kt_mpl' is not allowed"),
        ("mskt grid --variants full,kt-any --out runs/g", "unknown variant(s) ['kt-any']"),
    ],
)
def test_a_bad_command_line_is_caught(line, needle):
    (args,) = mskt_invocations(line)
    with pytest.raises(AssertionError, match=re.escape(needle)):
        check_mskt_args(args)


# ----------------------------------------------------------------------------------------------
# Prose facts, compared with the code


def _notebooks():
    from mskt.notebooks import notebook_paths

    return notebook_paths()


NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


def test_the_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    stems = [p.stem for p in _notebooks()]
    # The notebook table: one row per notebook, in order.
    rows = re.findall(r"^\| `(\d\d_\w+)` \|", readme, flags=re.M)
    assert rows == stems, f"README's notebook table {rows} != notebooks/ {stems}"
    # The layout table: the notebooks' topics, named as the files are.
    (topics,) = re.findall(r"^\| `notebooks/` \| numbered notebooks \(([^)]*)\) \|", readme, flags=re.M)
    assert [t.strip() for t in topics.split(",")] == [s[3:].replace("_", " ") for s in stems]
    # Counts in words: "all eight notebooks", "runs all eight".
    counts = re.findall(r"\ball (\w+) (?:notebooks|on tiny data)", readme)
    assert counts, "the README no longer says how many notebooks the main job runs"
    assert all(NUMBER_WORDS.get(c) == len(stems) for c in counts), (counts, len(stems))


def test_extending_names_the_next_free_notebook_number():
    text = (ROOT / "docs" / "extending.md").read_text()
    section = text[text.index("## A notebook"):text.index("\n## ", text.index("## A notebook") + 1)]
    last = max(int(p.name[:2]) for p in _notebooks())
    new, after = re.search(r"a new `(\d\d)_name\.ipynb` runs\s+after `(\d\d)`", section).groups()
    assert (int(new), int(after)) == (last + 1, last), f"the next free notebook is {last + 1:02d}, after {last:02d}"
    numbers = set(re.findall(r"\b(\d\d)_(?:name|results)\b", section)) | set(re.findall(r"--only (\d\d)\b", section))
    assert numbers == {f"{last + 1:02d}"}, numbers


def _parameter_cells():
    for path in _notebooks():
        for cell in json.loads(path.read_text())["cells"]:
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                yield path, "".join(cell["source"])


def test_the_parameters_example_is_declared_as_the_notebooks_declare_theirs(tmp_path):
    """docs/extending.md shows annotated assignments, says the runner reads them (and plain ones),
    and that every notebook writes them; each claim against the code."""
    import nbformat

    from mskt.notebooks import declared_defaults

    (example,) = [b for b in python_blocks() if b.path.name == "extending.md" and b.code.startswith("data")]
    tree = ast.parse(example.code)
    assert tree.body and all(isinstance(n, ast.AnnAssign) for n in tree.body), f"{example.where}: not all annotated"
    for path, source in _parameter_cells():
        kinds = {type(n).__name__ for n in ast.parse(source).body}
        assert kinds == {"AnnAssign"}, f"{path.name}: its parameters cell has {kinds}; docs/extending.md says annotated"

    def declared(source):
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = ["parameters"]
        nb.cells = [cell]
        path = tmp_path / "p.ipynb"
        nbformat.write(nb, path)
        return declared_defaults(path)

    ns = {}
    exec(example.code, ns)
    expected = {k: v for k, v in ns.items() if not k.startswith("__")}
    assert declared(example.code) == expected
    assert declared("epochs = 6\nsmoke = False") == {"epochs": 6, "smoke": False}  # plain ones are read too
    assert type(declared("data_scale: float = 1")["data_scale"]) is float  # the annotation is the type

"""A variant of your own, in a file outside the repository, reaches every entry point without a
file of mskt/ being touched: ``mskt train``, ``mskt evaluate``, ``mskt grid`` (two worker
processes), ``mskt tune`` with ``--finalize``, the bench's configs, notebooks 02 and 03 under papermill, and
``load_run`` in a fresh interpreter. It has an option of its own (``gru_layers``), which the config
validates, the CLI takes as a flag, ``tune`` searches and ``config.json`` records.

Also: installed packages' entry points (group ``mskt.variants``), and a name registered twice by
two modules is an error naming both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mskt.config import Config
from mskt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "8", "--heads", "2", "--encoder-layers", "1", "--kt-layers", "1", "--crossmodal-layers", "1", "--memory-layers", "1",
        "--data", "synthetic:mosi", "--data-scale", "0.02", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--progress", "off"]

# theta and phi as GRUs: kt with an option of its own, the example docs/extending.md walks through.
KT_GRU = (ROOT / "docs" / "examples" / "kt_gru.py").read_text()


def _env(home: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MSKT_HOME": str(home), "PYTHONPATH": str(ROOT)}


def mskt(*args, cwd: Path):
    proc = subprocess.run([sys.executable, "-m", "mskt", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=_env(cwd), timeout=600)
    assert proc.returncode == 0, f"mskt {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder outside the repository holding the plugin file; the commands run from it."""
    folder = tmp_path_factory.mktemp("my_ideas")
    assert ROOT not in folder.parents
    (folder / "kt_gru.py").write_text(KT_GRU)
    return folder


@pytest.fixture(scope="module")
def trained(outside) -> Path:
    """``mskt train`` with the plugin and its option, from outside the repository."""
    mskt("train", "--plugin", "kt_gru.py", "--variant", "kt_gru", "--gru-layers", "2", *TINY, "--out", "run", cwd=outside)
    return outside / "run"


def test_train_records_the_plugin_and_its_option(trained, outside):
    stored = json.loads((trained / "config.json").read_text())
    assert stored["variant"] == "kt_gru" and stored["gru_layers"] == 2
    assert stored["plugins"] == [str(outside / "kt_gru.py")]  # absolute: readable from any folder
    assert "lambda_text" in stored and "modality_dropout" not in stored  # kt's options, not kt_any's


def test_evaluate_and_load_run_import_the_recorded_plugin(trained, tmp_path):
    # From another folder, without --plugin: config.json says which file registers kt_gru.
    proc = mskt("evaluate", "--run", trained, "--out", tmp_path / "m.json", cwd=tmp_path)
    assert "mae" in json.loads((tmp_path / "m.json").read_text())["test"], proc.stdout
    code = (f"from mskt.train import load_run; cfg, model = load_run({str(trained)!r}); "
            "print(type(model).__name__, cfg.gru_layers, model.transfer['vision->audio'].gru.num_layers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["KTGRU", "2", "2"]


def test_grid_with_two_worker_processes(outside):
    mskt("grid", "--plugin", "kt_gru.py", "--variants", "kt_gru,kt", "--gru-layers", "2", "--seeds", "1", "--jobs", "2",
         *TINY, "--threads", "1", "--out", "grid", cwd=outside)
    runs = sorted((outside / "grid").glob("*/config.json"))
    by_variant = {json.loads(p.read_text())["variant"]: json.loads(p.read_text()) for p in runs}
    assert set(by_variant) == {"kt_gru", "kt"}
    assert by_variant["kt_gru"]["gru_layers"] == 2 and "gru_layers" not in by_variant["kt"]  # kt does not own it


def test_tune_searches_the_option_and_finalize_reads_the_study(outside):
    mskt("tune", "--plugin", "kt_gru.py", "--variant", "kt_gru", "--trials", "1", "--study", "gru", "--root", "tune", *TINY, cwd=outside)
    trials = [json.loads(p.read_text()) for p in (outside / "tune" / "gru").glob("trial-*/config.json")]
    assert len(trials) == 1 and all(t["variant"] == "kt_gru" and "gru_layers" in t for t in trials)
    from mskt.experiments.tune import default_space

    # In this process, the repository's copy: a second file registering kt_gru here would be a collision.
    space = default_space(Config.from_dict({"plugins": [str(ROOT / "docs" / "examples" / "kt_gru.py")], "variant": "kt_gru"}))
    assert (space["gru_layers"].low, space["gru_layers"].high) == (1, 2)  # from the option's search range
    # finalize without --plugin: the study's stored config names it.
    proc = mskt("tune", "--finalize", "--study", "gru", "--root", "tune", "--seeds", "1", "--threads", "1", cwd=outside)
    assert "results" in proc.stdout


def test_bench_configs_carry_the_plugins_to_each_records_process():
    """``mskt bench --plugin`` runs each record in a spawned process through ``bench_config``; the
    config it builds names the plugin, so that process imports it (as a grid worker does, above)."""
    from mskt.experiments.bench import bench_config

    example = str(ROOT / "docs" / "examples" / "kt_gru.py")
    cfg = bench_config("mosi", "kt_gru", plugins=(example,))
    assert cfg.plugins == (example,) and cfg.variant == "kt_gru"


@pytest.mark.parametrize("notebook", ["02_training", "03_reconstruction_quality"])
def test_notebooks_02_and_03_under_papermill(notebook, outside, trained, tmp_path):
    pm = pytest.importorskip("papermill")
    source = ROOT / "notebooks" / f"{notebook}.ipynb"
    params = {"smoke": True, "figures_dir": str(tmp_path / "figs")}  # not <cwd>/figures: with no project above it, cwd is the root
    if notebook == "02_training":
        params.update(plugins=[str(outside / "kt_gru.py")], variant="kt_gru", run_dir=str(tmp_path / "run"),
                      overrides={"gru_layers": 2, "data_scale": 0.02, "epochs": 1})
    else:  # the run trained above; its config.json imports the plugin
        params.update(run_dir=str(trained))
    pm.execute_notebook(str(source), str(tmp_path / "out.ipynb"), parameters=params, cwd=str(tmp_path), kernel_name="python3",
                        progress_bar=False)
    if notebook == "02_training":  # the run records the plugin: load_run and notebook 03 import it from there
        stored = json.loads((tmp_path / "run" / "config.json").read_text())
        assert stored["gru_layers"] == 2 and stored["plugins"] == [str(outside / "kt_gru.py")]


# -- in-process: registry and options ----------------------------------------------------------


def test_extending_md_shows_the_example_file_as_it_is():
    text = (ROOT / "docs" / "extending.md").read_text()
    marker = "it is docs/examples/kt_gru.py, which tests/test_plugins.py runs"
    block = text[text.index(marker):].split("```python\n", 1)[1].split("```", 1)[0]
    assert block == KT_GRU


def test_an_option_of_another_variant_is_refused_naming_its_owner():
    with pytest.raises(ConfigError, match=r"lambda_vision is an option of variant kt\b.*not of 'full'"):
        Config.from_dict({"variant": "full", "lambda_vision": 0.5})
    # The base's options carry over where the new variant owns them.
    kt = Config.from_dict({"variant": "kt", "consistency": "l1", "lambda_vision": 0.5})
    assert kt.replace(variant="kt_any").consistency == "l1"
    assert not hasattr(kt.replace(variant="full").options, "consistency")


def test_old_option_names_still_read():
    assert Config.from_dict({"lambda_language": 0.25}).lambda_text == 0.25


def test_two_modules_registering_one_name_is_an_error_naming_both(tmp_path):
    from mskt.plugins import load_plugins

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "twin.py").write_text(textwrap.dedent('''
            from mskt.model import register
            from mskt.model.variants.full import Full

            @register("twin_variant")
            class Twin(Full):
                pass
        '''))
    first = load_plugins([str(tmp_path / "a" / "twin.py")])
    with pytest.raises(ConfigError, match=r"variant 'twin_variant' is registered twice: by mskt_plugin_twin_\w+\.Twin and by mskt_plugin_twin_\w+\.Twin"):
        load_plugins([str(tmp_path / "b" / "twin.py")])
    assert load_plugins(first) == first  # the same file again: imported once, no error
    from mskt.model import VARIANTS

    VARIANTS.pop("twin_variant")


def test_a_missing_plugin_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"plugins: .*nowhere\.py: no such file"):
        Config.from_dict({"plugins": [str(tmp_path / "nowhere.py")]})
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_module_xyz' \(ModuleNotFoundError"):
        Config.from_dict({"plugins": ["no_such_module_xyz"]})


def test_installed_entry_points_register_variants(tmp_path):
    """A package installed with an ``mskt.variants`` entry point: its variant is a choice of the
    CLI (and its option a flag) without --plugin."""
    site = tmp_path / "site"
    (site / "lab_variants").mkdir(parents=True)
    (site / "lab_variants" / "__init__.py").write_text(KT_GRU.replace('"kt_gru"', '"kt_gru_installed"'))
    dist = site / "lab_variants-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-variants\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mskt.variants]\nkt_gru_installed = lab_variants\n")
    env = {**_env(tmp_path), "PYTHONPATH": f"{ROOT}{os.pathsep}{site}"}
    code = ("from mskt.config import Config; c = Config.from_dict({'variant': 'kt_gru_installed', 'gru_layers': 2}); "
            "print(c.variant, c.gru_layers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["kt_gru_installed", "2"]
    helptext = subprocess.run([sys.executable, "-m", "mskt", "train", "--help"], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "--gru-layers" in helptext

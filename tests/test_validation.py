"""Trust: bad configuration is an error that names the field and says what is allowed, and a
checkpoint that would run code when loaded is refused without running it.

Config: every field with a value of the wrong type (through from_dict, the path of JSON, papermill
parameters and the CLI, and through direct construction), every range-checked field out of range,
every float field non-finite, and the boundary values that must stay allowed.
Checkpoints: a raw pickle whose reduce calls os.system, a torch.save of a dict holding such an object,
and a torch.save of a plain custom class; through load_checkpoint, load_run and ``mskt evaluate``.
"""

from __future__ import annotations

import math
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mskt.config import RANGES, Config
from mskt.errors import ConfigError, MsktError
from mskt.model import VARIANTS
from mskt.model.options import option_fields

ROOT = Path(__file__).resolve().parents[1]
# Every key a config takes: its fields and each built-in variant's options (with the variant that owns them).
OWNER = {}
for _variant in ("kt", "kt_any"):
    for _name in option_fields(VARIANTS[_variant].Options):
        OWNER.setdefault(_name, _variant)
FIELDS = {**Config.fields(), **{n: f for v in ("kt", "kt_any") for n, f in option_fields(VARIANTS[v].Options).items()}}


def _with_owner(values: dict) -> dict:
    """``values`` with the variant that owns its options (the default variant, kt, owns kt's)."""
    owners = {OWNER[k] for k in values if k in OWNER}
    return {**values, **({"variant": owners.pop()} if owners else {})}
TINY = dict(d_model=8, heads=2, encoder_layers=1, kt_layers=1, crossmodal_layers=1, memory_layers=1, text_dim=7, audio_dim=5, vision_dim=6, text_steps=8)

# A value of the wrong type for each kind of field (bool is refused where a number is meant).
WRONG_TYPES = {
    "int": ["ten", 2.5, True, None, [1]],
    "float": ["fast", True, None, [0.1]],
    "str": [3, None, True, ["x"]],
    "bool": ["maybe", 2, None, 0.5],
    "tuple": [3, None, True, [3], ["a", None]],  # plugins: a list of module names or file paths
}


def _kind(name: str) -> str:
    t = FIELDS[name].type
    return t if isinstance(t, str) else t.__name__


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_field_refuses_a_wrong_type(name):
    for bad in WRONG_TYPES[_kind(name)]:
        with pytest.raises(ConfigError, match=rf"\b{name}\b") as err:
            Config.from_dict(_with_owner({name: bad}))
        assert "must be" in str(err.value), str(err.value)
        # Built directly, the same error rather than a TypeError from a comparison.
        with pytest.raises(ConfigError, match=rf"\b{name}\b"):
            Config(**_with_owner({name: bad})).check()


def test_unknown_keys_are_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\].*allowed:.*\blr\b"):
        Config.from_dict({"learning_rate": 0.1})


# Out-of-range values per field: written out here, not derived from mskt.config.RANGES, so a bound
# dropped from the code fails a test.
OUT_OF_RANGE = {
    "text_dim": [0, -3],
    "audio_dim": [0],
    "vision_dim": [0],
    "text_steps": [0],
    "d_model": [0, -8],
    "heads": [0, -2],  # heads=0 used to be a ZeroDivisionError in ModelConfig.check
    "encoder_layers": [-1],
    "kt_layers": [0],
    "crossmodal_layers": [0],
    "memory_layers": [0],
    "text_kernel": [0, -1, 2, 4],  # even kernels change the number of steps: the model breaks
    "audio_kernel": [0, 2],
    "vision_kernel": [0, 6],
    "attn_dropout": [-0.1, 1.0, 1.5],
    "attn_dropout_audio": [-0.1, 1.0],
    "attn_dropout_vision": [-0.1, 1.0],
    "relu_dropout": [-0.1, 1.0],
    "res_dropout": [-0.1, 1.0],
    "embed_dropout": [-0.1, 1.0],
    "out_dropout": [-0.1, 1.0],
    "lambda_vision": [-0.5],
    "lambda_text": [-1.0],
    "lambda_fused": [-1e-3],
    "lambda_aux": [-2.0],
    "lambda_any": [-0.1],
    "modality_dropout": [-0.1, 1.5],
    "data_scale": [0.0, -1.0, 1e6],
    "data_seed": [-1],
    "epochs": [0, -5],
    "patience": [-1],
    "min_epochs": [-1],
    "max_steps": [-1],
    "min_steps": [-3],
    "batch_size": [0],
    "lr": [0.0, -1e-3],
    "weight_decay": [-1e-4],
    "grad_clip": [-0.1],
    "seed": [-1, 2**64],
    "eval_batch_size": [0],
    "threads": [-1, 10**6],
    "train_missing_rate": [-0.1, 1.5],
    "label_fraction": [0.0, -0.5, 1.01],
}
# The boundary values that must stay allowed.
ALLOWED = {
    "encoder_layers": 0, "text_kernel": 3, "audio_kernel": 5, "vision_kernel": 1, "attn_dropout": 0.0,
    "out_dropout": 0.99, "lambda_vision": 0.0, "lambda_fused": 2.5, "lambda_aux": 0.0, "modality_dropout": 1.0, "lambda_any": 0.0, "data_scale": 100.0,
    "data_seed": 0, "weight_decay": 0.0, "grad_clip": 0.0, "seed": 0, "threads": 0, "lr": 1e-7, "epochs": 1,
    "label_fraction": 1.0,
}


def test_every_numeric_field_has_a_range():
    numeric = {n for n in FIELDS if _kind(n) in ("int", "float")}
    kernels = {"text_kernel", "audio_kernel", "vision_kernel"}
    ranged_options = {n for n, f in FIELDS.items() if n in OWNER and (f.metadata["low"] or f.metadata["high"])}
    assert numeric - kernels == set(RANGES) | ranged_options, "a numeric config field or option without an allowed range"
    assert set(OUT_OF_RANGE) == numeric, "a numeric Config field this test does not try out of range"


@pytest.mark.parametrize("name", sorted(OUT_OF_RANGE))
def test_out_of_range_values_are_refused_saying_what_is_allowed(name):
    for bad in OUT_OF_RANGE[name]:
        with pytest.raises(ConfigError, match=rf"\b{name}\b must be") as err:
            Config.from_dict(_with_owner({**TINY, name: bad}))
        msg = str(err.value)
        assert repr(bad) in msg or str(bad) in msg, msg  # the value found
        assert any(word in msg for word in ("in [", "in (", ">= 1", "odd")), msg  # what is allowed


@pytest.mark.parametrize("name", sorted(n for n in FIELDS if _kind(n) == "float"))
def test_every_float_field_refuses_non_finite_values(name):
    for bad in (math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"):
        with pytest.raises(ConfigError, match=rf"\b{name} must be a finite number"):
            Config.from_dict(_with_owner({name: bad}))


def test_boundary_values_are_allowed():
    kt_any = {k: ALLOWED[k] for k in ("lambda_any", "modality_dropout")}
    cfg = Config.from_dict({**TINY, **{k: v for k, v in ALLOWED.items() if k not in kt_any}})
    assert all(getattr(cfg, k) == v for k, v in ALLOWED.items() if k not in kt_any)
    cfg = Config.from_dict({**TINY, **kt_any, "variant": "kt_any"})
    assert all(getattr(cfg, k) == v for k, v in kt_any.items())


def test_other_string_fields_are_checked():
    with pytest.raises(ConfigError, match="device='gpu' is not a device; use auto, cpu, cuda or cuda:N"):
        Config.from_dict({"device": "gpu"})
    with pytest.raises(ConfigError, match="data must be a file path"):
        Config.from_dict({"data": "  "})
    assert Config.from_dict({"device": "cuda:1"}).device == "cuda:1"  # a valid name, even without a GPU here


def test_numpy_numbers_are_accepted_as_their_python_kind():
    np = pytest.importorskip("numpy")
    cfg = Config.from_dict({"epochs": np.int64(3), "lr": np.float32(0.5)})
    assert cfg.epochs == 3 and type(cfg.epochs) is int and type(cfg.lr) is float


def test_a_config_json_with_nan_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"lr": NaN}')  # Python's json writes and reads NaN
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        Config.load(path)


# ----------------------------------------------------------------------------------------------
# Malicious checkpoints


class RunsCode:
    """Unpickling this calls os.system: the classic pickle payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class CustomState:
    """A plain custom class: harmless here, but weights_only loading must refuse any such global."""

    def __init__(self):
        self.weights = [1.0, 2.0]


def _good_config() -> Config:
    return Config.from_dict({**TINY, "device": "cpu", "progress": "off"})


def _write_checkpoint(kind: str, path: Path, marker: Path) -> None:
    config = _good_config().to_dict()
    if kind == "raw-pickle-os-system":
        path.write_bytes(pickle.dumps({"model": RunsCode(marker), "config": config}))
    elif kind == "torch-save-os-system":
        torch.save({"model": {"w": torch.zeros(2)}, "config": config, "epoch": RunsCode(marker)}, path)
    elif kind == "torch-save-custom-class":
        torch.save({"model": CustomState(), "config": config, "epoch": 0}, path)
    else:
        raise AssertionError(kind)


KINDS = ["raw-pickle-os-system", "torch-save-os-system", "torch-save-custom-class"]


def test_the_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """The control: without weights_only the file does run code, so the refusals below mean something."""
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    _write_checkpoint("raw-pickle-os-system", path, marker)
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_load_checkpoint_refuses_a_malicious_file_naming_it(kind, tmp_path):
    from mskt.train import load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    _write_checkpoint(kind, path, marker)
    with pytest.raises(MsktError, match=str(path).replace("\\", "\\\\")):
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran its code"


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    _good_config().save(run / "config.json")
    return run


def test_load_run_loads_a_genuine_checkpoint(tmp_path):
    """The control for the next test: the same run folder with a real checkpoint loads."""
    from mskt.model import build_model
    from mskt.train import load_run

    run = _run_folder(tmp_path)
    cfg = _good_config()
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg.to_dict(), "epoch": 1}, run / "checkpoint.pt")
    loaded, model = load_run(run)
    assert loaded == cfg and not model.training


@pytest.mark.parametrize("kind", KINDS)
def test_load_run_refuses_a_malicious_checkpoint_naming_it(kind, tmp_path):
    from mskt.train import load_run

    run = _run_folder(tmp_path)
    marker = tmp_path / "pwned"
    _write_checkpoint(kind, run / "checkpoint.pt", marker)
    with pytest.raises(MsktError, match="checkpoint.pt"):
        load_run(run)
    assert not marker.exists(), "loading the run ran the checkpoint's code"


@pytest.mark.parametrize("kind", ["raw-pickle-os-system", "torch-save-os-system"])
def test_evaluate_refuses_a_malicious_checkpoint_in_one_line(kind, tmp_path):
    run = _run_folder(tmp_path)
    marker = tmp_path / "pwned"
    _write_checkpoint(kind, run / "checkpoint.pt", marker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSKT_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "mskt", "evaluate", "--run", str(run)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert str(run / "checkpoint.pt") in proc.stderr
    assert not marker.exists()


def test_cli_config_errors_are_one_line(tmp_path):
    """heads=0 used to reach ``d_model % heads`` and end in a ZeroDivisionError traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MSKT_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "mskt", "train", "--heads", "0", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "mskt: error: heads must be in [1, inf) (and must divide d_model), found 0"
    assert not (tmp_path / "run").exists()

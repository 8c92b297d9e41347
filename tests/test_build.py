"""The kernel build's two targets (``MSKT_KERNEL_ARCH``): the flags each gets, where each is kept,
and a one-line error for anything else."""

from __future__ import annotations

import platform

import pytest

from mskt.errors import ConfigError
from mskt.fast import build


def test_native_is_the_default_and_portable_targets_a_generic_cpu(monkeypatch):
    monkeypatch.delenv("MSKT_KERNEL_ARCH", raising=False)
    assert build.kernel_arch() == "native"
    assert "-march=native" in build.cflags()
    portable = build.cflags("portable")
    assert not any("native" in f or "prefer-vector-width" in f for f in portable)
    if platform.machine() == "x86_64":
        assert "-march=x86-64" in portable and "-mtune=generic" in portable
    # Both keep the same arithmetic flags: only the target differs.
    assert [f for f in portable if "march" not in f and "mtune" not in f] == [f for f in build.cflags("native") if "march" not in f and "vector-width" not in f]


def test_each_build_has_its_own_folder_and_stamp(monkeypatch):
    assert build.build_tag("native") != build.build_tag("portable")
    assert build.build_tag("portable") == f"portable_{platform.machine().lower()}"
    monkeypatch.setenv("MSKT_KERNEL_ARCH", "portable")
    portable_digest = build._source_digest()
    monkeypatch.setenv("MSKT_KERNEL_ARCH", "native")
    assert build._source_digest() != portable_digest  # a stamp from one build never vouches for the other


@pytest.mark.parametrize("value", ["generic", "x86-64", "NATIVE"])
def test_an_unknown_target_is_a_one_line_error(monkeypatch, value):
    monkeypatch.setenv("MSKT_KERNEL_ARCH", value)
    with pytest.raises(ConfigError, match=r"MSKT_KERNEL_ARCH=.*expected one of native, portable") as e:
        build.kernel_arch()
    assert "\n" not in str(e.value)


def test_one_kernel_cache_per_machine_keyed_by_cpu_and_source(monkeypatch, tmp_path):
    """The build folder is the user's cache (overridable), the same from any working folder or
    checkout, and another CPU target or another C++ source gets another folder."""
    monkeypatch.delenv("MSKT_KERNEL_CACHE", raising=False)
    monkeypatch.delenv("MSKT_KERNEL_ARCH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert build.kernel_cache() == tmp_path / "home" / ".cache" / "mskt" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.kernel_cache() == tmp_path / "xdg" / "mskt" / "kernels"
    monkeypatch.setenv("MSKT_KERNEL_CACHE", str(tmp_path / "shared"))
    assert build.kernel_cache() == tmp_path / "shared"

    # Two checkouts, two working folders: one build folder.
    folders = []
    for checkout in ("a", "b"):
        (tmp_path / checkout / "mskt").mkdir(parents=True)
        (tmp_path / checkout / "pyproject.toml").touch()
        monkeypatch.chdir(tmp_path / checkout)
        folders.append(build.kernel_build_dir())
    assert folders[0] == folders[1]
    assert folders[0].parent == tmp_path / "shared"
    assert folders[0].name == f"mskt_kernels_{build.build_tag()}_{build._source_digest()[:12]}"

    monkeypatch.setenv("MSKT_KERNEL_ARCH", "portable")
    assert build.kernel_build_dir() != folders[0]
    monkeypatch.setenv("MSKT_KERNEL_ARCH", "native")
    edited = tmp_path / "cpu_kernels.cpp"
    edited.write_bytes(build.SOURCE.read_bytes() + b"\n// another source tree\n")
    monkeypatch.setattr(build, "SOURCE", edited)
    assert build.kernel_build_dir() != folders[0]  # never loads another source's library

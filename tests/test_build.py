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

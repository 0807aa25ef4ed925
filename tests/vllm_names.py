"""Every vLLM name the plugin imports, and every attribute it reads from one, read from its own
source with ``ast`` (for tests/test_vllm_contract.py: a new import cannot escape that test)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keepkv_vllm"


def _is_vllm(module: str | None) -> bool:
    return module is not None and (module == "vllm" or module.startswith("vllm."))


def _files(package: Path) -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(package.parent)), ast.parse(path.read_text(), filename=str(path)))
        for path in sorted(package.rglob("*.py"))
    ]


def _bindings(tree: ast.Module) -> dict[str, tuple[str, str | None]]:
    """Local name -> (module, name or None for ``import module``) of every vLLM import in a file,
    including imports inside functions (the plugin defers many until they are needed)."""
    bound: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_vllm(node.module):
            for alias in node.names:
                bound[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _is_vllm(alias.name):
                    # `import vllm.a.b` binds `vllm`; `import vllm.a.b as x` binds x to vllm.a.b
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = (alias.name if alias.asname else local, None)
    return bound


def vllm_imports(package: Path = PACKAGE) -> dict[tuple[str, str | None], list[str]]:
    """(module, name or None for ``import module``) -> the plugin's file:line importing it."""
    found: dict[tuple[str, str | None], list[str]] = {}
    for where, tree in _files(package):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_vllm(node.module):
                for alias in node.names:
                    found.setdefault((node.module, alias.name), []).append(f"{where}:{node.lineno}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _is_vllm(alias.name):
                        found.setdefault((alias.name, None), []).append(f"{where}:{node.lineno}")
    return found


def vllm_attribute_reads(package: Path = PACKAGE) -> dict[tuple[str, str | None, str], list[str]]:
    """(module, imported name or None, attribute) -> file:line, for every ``x.attr`` the plugin
    reads where ``x`` is a vLLM import of that file: ``ops.cpu_attn_reshape_and_cache``,
    ``cpu_worker.CPUModelRunner``, ``InputProcessor._validate_params``, ``RequestStatus.RUNNING``.
    Attributes only assigned (``EngineCore.kv_compression_stats = ...``) are the plugin's own."""
    found: dict[tuple[str, str | None, str], list[str]] = {}
    for where, tree in _files(package):
        bound = _bindings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Load)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
            ):
                module, name = bound[node.value.id]
                found.setdefault((module, name, node.attr), []).append(f"{where}:{node.lineno}")
    return found

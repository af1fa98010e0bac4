"""A real Triton server on this machine, for tests and benchmarks.

It runs the ``tritonserver`` binary bundled in the PyPI wheel ``nvidia-pytriton==0.6.0``,
installed in its own environment (the "Triton env", ``make triton-env``): that server has
only the Python backend, whose stub needs ``numpy<2`` in the env, the stub copied into a
writable backend folder, ``LD_LIBRARY_PATH`` with the wheel's ``nvidia_pytriton.libs`` and
the env interpreter's libdir, and the env's ``bin`` first on ``PATH``
(``docs/explanation/architecture.md``, "Real components, and how the tests start them").
Production uses the Triton container's onnxruntime/TensorRT backends instead.

The server binds to 127.0.0.1 only, on free ports picked at start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from medssl.errors import RunnerError
from medssl.models.card import CARD_FILE, load_card
from medssl.models.repository import latest_version
from medssl.models.triton_config import InstanceKind, ServingOptions, model_config, write_config

#: The Python-backend ``model.py`` that runs ``model.onnx`` with onnxruntime inside Triton.
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")

__all__ = [
    "ENV_VARIABLE",
    "LocalTritonServer",
    "TritonEnv",
    "find_triton_env",
    "inspect_triton_env",
    "python_backend_repository",
]

#: Environment variable naming the Triton env (a virtual environment folder).
ENV_VARIABLE = "MEDSSL_TRITON_ENV"
_DEFAULT_ENV = ".venv-triton"
_SERVER = Path("pytriton", "tritonserver")


def find_triton_env() -> Path:
    """The Triton env: ``$MEDSSL_TRITON_ENV``, else ``<repo root>/.venv-triton``.

    Raises:
        RunnerError: the folder does not hold a Python environment (the error says how to
            make one).
    """
    configured = os.environ.get(ENV_VARIABLE)
    if configured:
        env = Path(configured)
    else:
        root = Path(__file__).resolve().parents[2]
        if not (root / "pyproject.toml").is_file():
            raise RunnerError(
                f"medssl is not running from a source checkout, so there is no default Triton "
                f"env; set {ENV_VARIABLE} to a virtual environment with "
                "'numpy<2' nvidia-pytriton==0.6.0 onnxruntime"
            )
        env = root / _DEFAULT_ENV
    if not (env / "bin" / "python").exists():
        raise RunnerError(
            f"no Triton env at {env}: run `make triton-env` in the medssl checkout (or set "
            f"{ENV_VARIABLE} to a virtual environment with 'numpy<2' nvidia-pytriton==0.6.0 "
            "onnxruntime)"
        )
    return env


@dataclass(frozen=True)
class TritonEnv:
    """What the server needs to know about the Triton env, as its own Python reports it.

    Attributes:
        root: the environment folder.
        site_packages: its ``purelib`` folder, holding ``pytriton/``.
        python_version: ``"3.11"``: picks the Python backend stub.
        libdir: the interpreter's ``LIBDIR`` (``libpython3.x.so`` for the stub).
    """

    root: Path
    site_packages: Path
    python_version: str
    libdir: Path

    @property
    def server_dir(self) -> Path:
        return self.site_packages / _SERVER

    @property
    def executable(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"


def inspect_triton_env(env: str | Path | None = None) -> TritonEnv:
    """Ask the env's Python where its packages and libpython are; check the server is there.

    Args:
        env: the environment folder; ``None``: :func:`find_triton_env`.

    Raises:
        RunnerError: the env's Python fails, or nvidia-pytriton's server is not installed in it.
    """
    root = Path(env) if env is not None else find_triton_env()
    code = (
        "import json, sys, sysconfig; print(json.dumps({"
        "'site': sysconfig.get_paths()['purelib'], "
        "'version': '%d.%d' % sys.version_info[:2], "
        "'libdir': sysconfig.get_config_var('LIBDIR')}))"
    )
    try:
        result = subprocess.run(
            [str(root / "bin" / "python"), "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        facts = json.loads(result.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise RunnerError(f"cannot query the Triton env's Python in {root}: {exc}") from exc
    found = TritonEnv(root, Path(facts["site"]), facts["version"], Path(facts["libdir"]))
    stub = found.server_dir / "python_backend_stubs" / found.python_version
    for needed in (found.executable, stub / "triton_python_backend_stub"):
        if not needed.is_file():
            raise RunnerError(
                f"{needed} is missing: the Triton env {root} needs nvidia-pytriton==0.6.0 for "
                f"Python {found.python_version} (`make triton-env`)"
            )
    return found


class LocalTritonServer:
    """``tritonserver`` serving a model repository on 127.0.0.1, as a context manager.

    Args:
        model_repository: the repository folder (``<name>/config.pbtxt``, version folders).
        env: the Triton env folder; ``None``: :func:`find_triton_env`.
        start_timeout_s: seconds :meth:`start` waits for ``/v2/health/ready``.
        args: extra ``tritonserver`` arguments (e.g. ``["--log-verbose=1"]``).

    Example::

        with LocalTritonServer(repo) as server:
            runner = TritonRunner(server.http_url, card)
    """

    def __init__(
        self,
        model_repository: str | Path,
        *,
        env: str | Path | None = None,
        start_timeout_s: float = 120.0,
        args: tuple[str, ...] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise RunnerError(f"{self.model_repository}: no such model repository folder")
        self.env = inspect_triton_env(env)
        self.start_timeout_s = start_timeout_s
        self.args = tuple(args)
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._ports = (0, 0, 0)

    @property
    def http_url(self) -> str:
        """``127.0.0.1:port`` of the HTTP endpoint (a TritonRunner URL)."""
        return f"127.0.0.1:{self._ports[0]}"

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:port`` of the gRPC endpoint."""
        return f"127.0.0.1:{self._ports[1]}"

    @property
    def metrics_url(self) -> str:
        """``127.0.0.1:port`` of the Prometheus metrics endpoint (``/metrics``)."""
        return f"127.0.0.1:{self._ports[2]}"

    @property
    def log_path(self) -> Path | None:
        """The server's log file while it runs."""
        return None if self._workdir is None else self._workdir / "tritonserver.log"

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log ("" before start)."""
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> LocalTritonServer:
        """Start the server and wait until it reports ready.

        Raises:
            RunnerError: the server exited or was not ready in ``start_timeout_s`` (the log
                tail included); it is stopped.
        """
        if self._process is not None:
            raise RunnerError("this LocalTritonServer is already running")
        self._workdir = Path(tempfile.mkdtemp(prefix="medssl-triton-"))
        backends = self._backends(self._workdir)
        http, grpc, metrics = _free_ports(3)
        self._ports = (http, grpc, metrics)
        command = [
            str(self.env.executable),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self._ports[0]}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self._ports[1]}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self._ports[2]}",
            "--exit-timeout-secs=5",
            *self.args,
        ]
        with open(self._workdir / "tritonserver.log", "wb") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,
            )
        try:
            self._wait_ready(self._process)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL to its process group) and remove its files."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the group start() created
                process.wait(timeout=15)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _backends(self, workdir: Path) -> Path:
        """A writable backend folder: the wheel's Python backend plus the env's stub."""
        backends = workdir / "backends"
        shutil.copytree(self.env.server_dir / "backends" / "python", backends / "python")
        stub = (
            self.env.server_dir
            / "python_backend_stubs"
            / self.env.python_version
            / "triton_python_backend_stub"
        )
        shutil.copy2(stub, backends / "python" / stub.name)
        return backends

    def _environment(self) -> dict[str, str]:
        """The parent environment, with the Triton env's libraries and ``bin`` first.

        ``PYTHONPATH``/``PYTHONHOME`` are dropped so the backend stub sees only the env.
        """
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        libs = [str(self.env.site_packages / "nvidia_pytriton.libs"), str(self.env.libdir)]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["PATH"] = os.pathsep.join([str(self.env.root / "bin"), env.get("PATH", "")])
        return env

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                raise RunnerError(
                    f"tritonserver exited with status {code} while starting on "
                    f"{self.model_repository}; log tail:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 400 while models load
            time.sleep(0.25)
        raise RunnerError(
            f"tritonserver was not ready within {self.start_timeout_s:g} s on "
            f"{self.model_repository}; log tail:\n{self.log_tail()}"
        )


def _free_ports(count: int) -> tuple[int, ...]:
    """``count`` distinct ports free on 127.0.0.1 right now (the OS's ephemeral choice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return tuple(s.getsockname()[1] for s in sockets)
    finally:
        for sock in sockets:
            sock.close()


def python_backend_repository(
    model_dir: str | Path, repository: str | Path, version: int | None = None
) -> Path:
    """Copy an exported model into ``repository`` as a Python-backend Triton model.

    The copy keeps the version folder (``model.onnx``, its card) and the card, adds
    :data:`PYTHON_MODEL` as ``model.py`` and writes a ``backend: "python"`` config with one
    CPU instance and the card's batching, so nvidia-pytriton's server (Python backend only)
    serves the same graph as Triton's onnxruntime backend would.

    Args:
        model_dir: ``<exported repository>/<name>``.
        repository: the folder to add the model to (created if absent).
        version: which version; default the newest.

    Returns:
        ``repository/<name>``.
    """
    model_dir = Path(model_dir)
    version = version or latest_version(model_dir)
    source = model_dir / str(version)
    card = load_card(source if (source / CARD_FILE).is_file() else model_dir)
    target = Path(repository) / model_dir.name
    shutil.copytree(source, target / str(version))
    shutil.copy2(PYTHON_MODEL, target / str(version) / "model.py")
    card.save(target / CARD_FILE)
    write_config(
        model_config(card, backend="python", options=ServingOptions(kind=InstanceKind.CPU)), target
    )
    return target

"""One face for Triton's HTTP and gRPC Python clients (``tritonclient``, the ``serve`` extra).

:func:`connect` returns a :class:`TritonApi` whose calls return plain Python values (the
metadata as JSON-like dicts with int shapes, outputs as numpy arrays) whatever the
protocol, so :mod:`medssl.runners.triton` holds the waiting, checking and retry logic once.
Calls raise the client library's exceptions; :func:`is_transient` says which are worth a
retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["PROTOCOLS", "TritonApi", "connect", "describe", "is_transient"]

PROTOCOLS = ("http", "grpc")


class TritonApi(Protocol):
    """What the runner asks a Triton server, over either protocol."""

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def model_ready(self, name: str, version: str) -> bool: ...

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        """``{"inputs": [...], "outputs": [...]}``, each ``{"name", "datatype", "shape"}``
        with int shapes (``-1`` for the dynamic batch axis)."""
        ...

    def max_batch_size(self, name: str, version: str) -> int:
        """``max_batch_size`` of the loaded model's config (0: no batching)."""
        ...

    def model_states(self) -> list[dict[str, str]]:
        """The server's repository index: ``{"name", "version", "state", "reason"}`` each."""
        ...

    def infer(
        self,
        name: str,
        version: str,
        input_name: str,
        datatype: str,
        batch: np.ndarray,
        output_names: Sequence[str],
    ) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def _clients(protocol: str) -> Any:
    """``tritonclient.http`` or ``tritonclient.grpc``, or a clear error."""
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError for no extra
        raise ImportError(
            f"TritonRunner over {protocol} needs tritonclient[{protocol}]: "
            "pip install 'medssl[serve]'"
        ) from exc
    return module


def connect(url: str, protocol: str, timeout_s: float) -> TritonApi:
    """A client for ``url`` (``host:port``) whose every call gives up after ``timeout_s``.

    Connecting is lazy: an unreachable server shows at the first call.
    """
    if protocol == "http":
        return _HttpApi(url, timeout_s)
    if protocol == "grpc":
        return _GrpcApi(url, timeout_s)
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def is_transient(exc: BaseException) -> bool:
    """A failure a retry may cure: connection refused/reset, gRPC UNAVAILABLE, HTTP 503."""
    if isinstance(exc, ConnectionError):
        return True
    status = _status(exc)
    return status in ("503", "StatusCode.UNAVAILABLE")


def describe(exc: BaseException) -> str:
    """A one-line account of a client exception (the library's reprs are often empty)."""
    status = _status(exc)
    message_of = getattr(exc, "message", None)  # tritonclient's InferenceServerException
    message = message_of() if callable(message_of) else str(exc)
    text = f"{type(exc).__name__}: {message or repr(exc)}"
    return f"{text} (status {status})" if status else text


def _status(exc: BaseException) -> str | None:
    status = getattr(exc, "status", None)
    return status() if callable(status) else None


class _HttpApi:
    def __init__(self, url: str, timeout_s: float) -> None:
        self._module = _clients("http")
        self._client = self._module.InferenceServerClient(
            url, connection_timeout=timeout_s, network_timeout=timeout_s
        )

    def live(self) -> bool:
        return bool(self._client.is_server_live())

    def ready(self) -> bool:
        return bool(self._client.is_server_ready())

    def model_ready(self, name: str, version: str) -> bool:
        return bool(self._client.is_model_ready(name, version))

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        return _normalised(self._client.get_model_metadata(name, version))

    def max_batch_size(self, name: str, version: str) -> int:
        return int(self._client.get_model_config(name, version).get("max_batch_size", 0))

    def model_states(self) -> list[dict[str, str]]:
        return [_state(m) for m in self._client.get_model_repository_index()]

    def infer(
        self,
        name: str,
        version: str,
        input_name: str,
        datatype: str,
        batch: np.ndarray,
        output_names: Sequence[str],
    ) -> dict[str, np.ndarray]:
        request = self._module.InferInput(input_name, list(batch.shape), datatype)
        request.set_data_from_numpy(batch, binary_data=True)
        wanted = [self._module.InferRequestedOutput(n, binary_data=True) for n in output_names]
        result = self._client.infer(name, [request], model_version=version, outputs=wanted)
        return {n: result.as_numpy(n) for n in output_names}

    def close(self) -> None:
        self._client.close()


class _GrpcApi:
    def __init__(self, url: str, timeout_s: float) -> None:
        self._module = _clients("grpc")
        self._client = self._module.InferenceServerClient(url)
        self._timeout = timeout_s

    def live(self) -> bool:
        return bool(self._client.is_server_live(client_timeout=self._timeout))

    def ready(self) -> bool:
        return bool(self._client.is_server_ready(client_timeout=self._timeout))

    def model_ready(self, name: str, version: str) -> bool:
        return bool(self._client.is_model_ready(name, version, client_timeout=self._timeout))

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        return _normalised(
            self._client.get_model_metadata(
                name, version, as_json=True, client_timeout=self._timeout
            )
        )

    def max_batch_size(self, name: str, version: str) -> int:
        config = self._client.get_model_config(
            name, version, as_json=True, client_timeout=self._timeout
        )
        return int(config["config"].get("max_batch_size", 0))

    def model_states(self) -> list[dict[str, str]]:
        index = self._client.get_model_repository_index(as_json=True, client_timeout=self._timeout)
        return [_state(m) for m in index.get("models", [])]

    def infer(
        self,
        name: str,
        version: str,
        input_name: str,
        datatype: str,
        batch: np.ndarray,
        output_names: Sequence[str],
    ) -> dict[str, np.ndarray]:
        request = self._module.InferInput(input_name, list(batch.shape), datatype)
        request.set_data_from_numpy(batch)
        wanted = [self._module.InferRequestedOutput(n) for n in output_names]
        result = self._client.infer(
            name, [request], model_version=version, outputs=wanted, client_timeout=self._timeout
        )
        return {n: result.as_numpy(n) for n in output_names}

    def close(self) -> None:
        self._client.close()


def _normalised(metadata: dict[str, Any]) -> dict[str, Any]:
    """Inputs and outputs with int shapes (gRPC's JSON writes int64 as strings)."""

    def tensors(key: str) -> list[dict[str, Any]]:
        return [
            {
                "name": t["name"],
                "datatype": t["datatype"],
                "shape": [int(d) for d in t.get("shape", [])],
            }
            for t in metadata.get(key, [])
        ]

    return {"inputs": tensors("inputs"), "outputs": tensors("outputs")}


def _state(entry: dict[str, Any]) -> dict[str, str]:
    return {k: str(entry.get(k, "")) for k in ("name", "version", "state", "reason")}

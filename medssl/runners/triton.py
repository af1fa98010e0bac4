"""A model served by a Triton Inference Server, over HTTP or gRPC.

The runner waits for the server and the model at construction, checks the served model's
metadata against the card, and retries transient failures of each inference call with
exponential backoff. Not thread-safe: give each thread its own runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from medssl.errors import RunnerError
from medssl.models.card import ModelCard
from medssl.runners.base import BatchedRunner
from medssl.runners.triton_client import PROTOCOLS, TritonApi, connect, describe, is_transient

__all__ = ["TritonRunner"]

#: Seconds between readiness probes while waiting for the server and the model.
_POLL_S = 0.25
_T = TypeVar("_T")


class TritonRunner(BatchedRunner):
    """The card's model on a Triton server.

    Args:
        url: ``host:port`` of the server's HTTP (default port 8000) or gRPC (8001) endpoint,
            without a scheme.
        card: the model card; the served model is named ``card.name``.
        protocol: ``"http"`` or ``"grpc"``.
        model_version: the version to use; ``""``: the server's choice (its version policy).
        timeout_s: seconds each request may take (connection and network, or gRPC deadline).
        retries: further attempts after a transient failure (connection refused or reset,
            gRPC UNAVAILABLE, HTTP 503).
        backoff_s: wait before the first retry; it doubles on each further retry.
        ready_timeout_s: seconds to wait for the server to be live and ready and the model
            to be ready (plus at most one probe's timeout).

    Attributes:
        card, url, protocol, model_version: as given.

    Raises:
        ValueError: a bad argument (a URL with a scheme, an unknown protocol, ...).
        RunnerError: the server or model is not ready in time (the URL, the model's state
            on the server and what to check are named), or the served model's inputs and
            outputs disagree with the card (every mismatch listed).
    """

    def __init__(
        self,
        url: str,
        card: ModelCard,
        *,
        protocol: str = "http",
        model_version: str = "",
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        ready_timeout_s: float = 30.0,
    ) -> None:
        if "://" in url:
            raise ValueError(f"url must be host:port without a scheme, got {url!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        for name, value in (("timeout_s", timeout_s), ("ready_timeout_s", ready_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries and backoff_s must be >= 0, got {retries}, {backoff_s}")
        self.card = card
        self.url = url
        self.protocol = protocol
        self.model_version = str(model_version)
        self._retries = retries
        self._backoff_s = backoff_s
        probe = connect(url, protocol, min(timeout_s, ready_timeout_s))
        try:
            self._wait_until_ready(probe, ready_timeout_s)
            self._check_metadata(probe)
        finally:
            probe.close()
        self._api: TritonApi | None = connect(url, protocol, timeout_s)

    @property
    def _source(self) -> str:
        return f"model {self.card.name!r} on Triton {self.protocol}://{self.url}"

    def _infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        api = self._api
        if api is None:
            raise RunnerError(f"{self._source}: the runner is closed; open a new one")
        spec = self.card.input
        return self._with_retries(
            lambda: api.infer(
                self.card.name,
                self.model_version,
                spec.name,
                spec.datatype,
                batch,
                self.card.output_names,
            )
        )

    def close(self) -> None:
        """Close the client connection (idempotent)."""
        if self._api is not None:
            self._api.close()
            self._api = None

    def _with_retries(self, call: Callable[[], _T]) -> _T:
        """``call()``, retried with doubling backoff on transient failures."""
        attempt = 0
        while True:
            try:
                return call()
            except Exception as exc:  # the client libraries raise many unrelated types
                if not is_transient(exc):
                    raise RunnerError(
                        f"inference failed on {self._source}: {describe(exc)}; check the server log"
                    ) from exc
                if attempt == self._retries:
                    raise RunnerError(
                        f"inference failed on {self._source} after {attempt + 1} attempts: "
                        f"{describe(exc)}; check that the server is running and reachable"
                    ) from exc
            time.sleep(self._backoff_s * 2**attempt)
            attempt += 1

    def _wait_until_ready(self, api: TritonApi, timeout_s: float) -> None:
        """Poll until the server is live and ready and the model is ready."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                unmet, error = self._unmet(api), ""
            except Exception as exc:  # noqa: BLE001 - client libraries raise many unrelated types
                unmet, error = "reachable", describe(exc)
            if unmet is None:
                return
            if time.monotonic() + _POLL_S > deadline:
                raise RunnerError(self._not_ready_message(api, unmet, error, timeout_s))
            time.sleep(_POLL_S)

    def _unmet(self, api: TritonApi) -> str | None:
        """The first readiness condition not met: ``"live"``, ``"ready"``, ``"model"``, or None."""
        if not api.live():
            return "live"
        if not api.ready():
            return "ready"
        if not api.model_ready(self.card.name, self.model_version):
            return "model"
        return None

    def _not_ready_message(self, api: TritonApi, stage: str, error: str, timeout_s: float) -> str:
        where = f"Triton {self.protocol} endpoint {self.url}"
        waited = f"after {timeout_s:g} s"
        if stage == "reachable":
            default_port = 8000 if self.protocol == "http" else 8001
            return (
                f"{where} is not reachable {waited} ({error}). Check that tritonserver is "
                f"running, that the host and port are right (its {self.protocol} port, "
                f"{default_port} by default) and that protocol={self.protocol!r} matches the port."
            )
        if stage in ("live", "ready"):
            return (
                f"{where} answers but the server is not {stage} {waited}; check the server "
                "log (a model that failed to load keeps it unready)."
            )
        version = self.model_version or "(server's choice)"
        return (
            f"{where} is ready but model {self.card.name!r} version {version} is not {waited}: "
            f"{self._model_state(api)}. Check the model repository the server was started "
            "with and its log."
        )

    def _model_state(self, api: TritonApi) -> str:
        """What the server's repository index says about the model, in words."""
        try:
            states = api.model_states()
        except Exception as exc:  # noqa: BLE001 - client libraries raise many unrelated types
            return f"its repository index is unavailable ({describe(exc)})"
        mine = [s for s in states if s["name"] == self.card.name]
        if not mine:
            names = sorted({s["name"] for s in states})
            return f"the server has no such model (it has {names or 'none'})"
        return "; ".join(
            f"version {s['version'] or '?'} is {s['state'] or 'unknown'}"
            + (f" ({s['reason']})" if s["reason"] else "")
            for s in mine
        )

    def _check_metadata(self, api: TritonApi) -> None:
        """Compare the served model's tensors and batch size with the card."""
        try:
            metadata = api.metadata(self.card.name, self.model_version)
            max_batch = api.max_batch_size(self.card.name, self.model_version)
        except Exception as exc:  # the client libraries raise many unrelated types
            raise RunnerError(
                f"cannot read the metadata of model {self.card.name!r} from Triton "
                f"{self.protocol} endpoint {self.url}: {describe(exc)}"
            ) from exc
        problems = _metadata_problems(metadata, self.card)
        if max_batch < self.card.max_batch_size:
            problems.append(
                f"server max_batch_size {max_batch} is below the card's {self.card.max_batch_size}"
            )
        if problems:
            raise RunnerError(
                f"model {self.card.name!r} on Triton {self.protocol} endpoint {self.url} does "
                f"not match its card (version {self.card.version}): "
                + "; ".join(problems)
                + ". Serve the model exported with this card, or use the card from its "
                "repository."
            )


def _metadata_problems(metadata: Mapping[str, Any], card: ModelCard) -> list[str]:
    """Every difference between Triton's model metadata and the card's tensors."""
    problems = []
    for kind, specs in (("inputs", (card.input,)), ("outputs", card.outputs)):
        served = {t["name"]: t for t in metadata[kind]}
        wanted = {s.name for s in specs}
        if set(served) != wanted:
            problems.append(f"served {kind} {sorted(served)}, card {kind} {sorted(wanted)}")
        for spec in specs:
            tensor = served.get(spec.name)
            if tensor is None:
                continue
            if tensor["datatype"] != spec.datatype:
                problems.append(
                    f"{spec.name!r} is {tensor['datatype']} on the server, {spec.datatype} in "
                    "the card"
                )
            expected = [-1, *spec.shape]
            if list(tensor["shape"]) != expected:
                problems.append(
                    f"{spec.name!r} has shape {list(tensor['shape'])} on the server, card "
                    f"{expected}"
                )
    return problems

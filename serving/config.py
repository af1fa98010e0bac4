"""The gateway's configuration: one YAML file, environment overrides, validation at start.

``medssl-serve --config gateway.yaml`` reads a :class:`GatewayConfig` (``examples/gateway.yaml``
is the documented example). Every key is validated before anything starts; a bad key or value
is a :class:`~medssl.errors.ConfigError` naming its dotted path (``scp.port``), with a
"did you mean" for a misspelt key.

Environment overrides: ``MEDSSL_GATEWAY__<SECTION>__<KEY>=<value>`` sets ``section.key``
(double underscores separate levels, names are lower-cased, the value is parsed as YAML, so
``MEDSSL_GATEWAY__SCP__PORT=11113`` or ``MEDSSL_GATEWAY__MODELS__TRITON_URL=null`` work). The
environment wins over the file, and a command-line option wins over both. A container sets
its ports and paths this way without editing the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from medssl.config import config_to_dict, load_config
from medssl.errors import ConfigError
from medssl.io.limits import GeometryLimits
from medssl.scoring.select import SelectionRules

__all__ = [
    "ENV_PREFIX",
    "AllowedCaller",
    "ApiConfig",
    "ApiTlsConfig",
    "DeliveryConfig",
    "DestinationConfig",
    "GatewayConfig",
    "HttpConfig",
    "ModelsConfig",
    "ProcessingConfig",
    "RouteConfig",
    "ScpConfig",
    "SpoolConfig",
    "TlsConfig",
    "env_overrides",
    "load_gateway_config",
    "redact_url",
]

#: Keys of the ``api`` section that hold secrets (masked where the config is shown).
SECRET_KEYS = ("token", "password")

#: Prefix of environment overrides: ``MEDSSL_GATEWAY__SCP__PORT=11113``.
ENV_PREFIX = "MEDSSL_GATEWAY__"


def _port(value: int, key: str, allow_zero: bool = True) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ValueError(f"{key} must be a TCP port in [{low}, 65535], got {value}")


def _ae_title(value: str, key: str) -> None:
    if not 1 <= len(value.strip()) <= 16 or "\\" in value:
        raise ValueError(f"{key} must be 1-16 characters without a backslash, got {value!r}")


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title the SCP accepts, optionally only from some hosts.

    Attributes:
        ae_title: the calling AE title (compared after stripping spaces).
        hosts: source IP addresses it may call from; empty accepts any host.
    """

    ae_title: str
    hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _ae_title(self.ae_title, "ae_title")


@dataclass(frozen=True)
class TlsConfig:
    """DICOM TLS (PS3.15 B.1) of the SCP.

    Attributes:
        enabled: serve TLS instead of plain TCP.
        certificate: the server's PEM certificate (chain).
        private_key: its PEM private key.
        ca_certificate: PEM CA bundle; when set, callers must present a certificate it signed.
    """

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificate: Path | None = None

    def __post_init__(self) -> None:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("enabled TLS needs certificate and private_key")


@dataclass(frozen=True)
class ScpConfig:
    """The receiving side (a pynetdicom Storage SCP).

    Attributes:
        ae_title: the gateway's AE title (what the PACS calls).
        host: bind address (``0.0.0.0`` all interfaces; ``127.0.0.1`` loopback only).
        port: DICOM port (104 and 11112 are customary; 0 picks a free one, for tests).
        max_associations: concurrent associations; more are rejected (transient).
        allowed_callers: callers let in; an empty list lets nobody in unless ``allow_any``.
        allow_any: accept every calling AE title (a lab setting, never a hospital's).
        other_sop_classes: SOP classes other than CT / Enhanced CT Image Storage:
            ``refuse`` (the presentation context is rejected, the sender sees it refused)
            or ``ignore`` (accepted with success and discarded, so a router that sends a
            whole study does not retry forever).
        tls: DICOM TLS.
        acse_timeout_s / dimse_timeout_s / network_timeout_s: pynetdicom timeouts (s): a
            stalled peer never holds an association forever.
        association_request_timeout_s: total time (s) from the TCP connection to a complete
            A-ASSOCIATE-RQ PDU, TLS handshake included, however slowly its bytes come; a
            connection that has not sent one by then is closed. Until then a connection
            holds no association slot.
        max_associations_per_peer: concurrent associations from one source address; more are
            rejected (transient, local limit exceeded), so one host cannot take every slot.
            The effective value is at most ``max_associations``.
        max_pending_connections: connections still waiting for their A-ASSOCIATE-RQ, in all;
            one more closes the oldest such connection of the host that holds the most.
        max_inflated_bytes: a Deflated Explicit VR Little Endian dataset that inflates past
            this many bytes is refused (0xC210) without inflating the rest (a deflate bomb).
    """

    ae_title: str = "MEDSSL"
    host: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 8
    allowed_callers: tuple[AllowedCaller, ...] = ()
    allow_any: bool = False
    other_sop_classes: Literal["refuse", "ignore"] = "refuse"
    tls: TlsConfig = field(default_factory=TlsConfig)
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    association_request_timeout_s: float = 10.0
    max_associations_per_peer: int = 4
    max_pending_connections: int = 64
    max_inflated_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        _ae_title(self.ae_title, "ae_title")
        _port(self.port, "port")
        for name in (
            "max_associations",
            "max_associations_per_peer",
            "max_pending_connections",
            "max_inflated_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "acse_timeout_s",
            "dimse_timeout_s",
            "network_timeout_s",
            "association_request_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SpoolConfig:
    """Where received instances, the job store and results live (one filesystem).

    Attributes:
        path: the spool directory (created if missing).
        min_free_mb: refuse instances (failure status, not acknowledged) while the spool's
            filesystem has less free space than this.
        study_idle_s: a study is complete this long after its last instance.
        keep_done_h: spooled instances and outputs of done studies are removed after this
            many hours (0 keeps them).
    """

    path: Path = Path("spool")
    min_free_mb: float = 1024.0
    study_idle_s: float = 10.0
    keep_done_h: float = 24.0

    def __post_init__(self) -> None:
        if self.min_free_mb < 0 or self.study_idle_s < 0 or self.keep_done_h < 0:
            raise ValueError("min_free_mb, study_idle_s and keep_done_h must be >= 0")


@dataclass(frozen=True)
class ModelsConfig:
    """Where the models come from.

    Attributes:
        repository: the model repository (Triton layout + ``medssl.json`` cards).
        triton_url: run on this Triton server (``host:port``) instead of the embedded
            onnxruntime; None runs embedded.
        protocol: Triton protocol, ``http`` or ``grpc``.
        runtime: the embedded runtime: ``auto`` (OpenVINO on a CPU when installed, onnxruntime
            when it has a GPU provider or ``providers`` are given), ``onnxruntime`` or
            ``openvino``. The choice is logged when the models load.
        providers: onnxruntime providers for the embedded runner (empty: best available).
        batch_size: windows per inference request.
    """

    repository: Path = Path("model_repository")
    triton_url: str | None = None
    protocol: Literal["http", "grpc"] = "http"
    runtime: Literal["auto", "onnxruntime", "openvino"] = "auto"
    providers: tuple[str, ...] = ()
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class RouteConfig:
    """Which model runs on which series.

    Attributes:
        model: model name in the repository.
        select: series selection rules (as ``medssl-score --select``); a series of the study
            that passes them is run through ``model``.
        version: model version; None takes the newest.
        min_probability: detection: findings below this stay out of the SR and its SEG; None
            (default) takes the model card's operating point, chosen on validation (0.5 for a
            card without one, with a warning at load).
        companion_seg: detection: also send a SEG of the findings (spheres of their
            diameter), tracked like the SR's findings and listed in its evidence.
        seg_type: segmentation: ``binary`` (default), ``labelmap`` or ``labelmap-rle``
            (DICOM 2024c, the latter RLE Lossless compressed; Orthanc 1.10, dcmtk 3.6.7 and
            dciodvfy 2022 do not understand it: only for receivers that do).
        dense_seg: segmentation: send every SEG frame, empty ones too (default: empty
            frames are omitted, a tenth of the size for a multi-organ SEG).
    """

    model: str
    select: SelectionRules = field(default_factory=SelectionRules)
    version: int | None = None
    min_probability: float | None = None
    companion_seg: bool = False
    seg_type: Literal["binary", "labelmap", "labelmap-rle"] = "binary"
    dense_seg: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a model of the repository")
        if self.min_probability is not None and not 0.0 <= self.min_probability <= 1.0:
            raise ValueError(
                f"min_probability must be in [0, 1] (or null: the card's operating point), "
                f"got {self.min_probability}"
            )
        if self.seg_type not in ("binary", "labelmap", "labelmap-rle"):
            raise ValueError(
                f"seg_type must be 'binary', 'labelmap' or 'labelmap-rle', got {self.seg_type!r}"
            )


@dataclass(frozen=True)
class ProcessingConfig:
    """Inference workers.

    Attributes:
        workers: concurrent studies in inference.
        max_attempts: a study whose processing fails (or whose worker dies) this many times
            goes to dead-letter.
        retry_backoff_s: wait before retrying a failed attempt (doubles per attempt).
        geometry: the plausible geometry of a series (:class:`~medssl.io.limits.GeometryLimits`:
            spacing, extent, source and resampled voxel counts), checked from the headers
            before any pixel is read; a series beyond it fails with the value and the limit
            named, and is not retried. The limits bound the memory one series takes; lower
            them on a small host.
    """

    workers: int = 1
    max_attempts: int = 3
    retry_backoff_s: float = 5.0
    geometry: GeometryLimits = field(default_factory=GeometryLimits)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_attempts < 1 or self.retry_backoff_s < 0:
            raise ValueError("workers and max_attempts must be >= 1, retry_backoff_s >= 0")


@dataclass(frozen=True)
class DestinationConfig:
    """Where results are sent.

    Attributes:
        name: a short name (logs, metrics, the job store).
        kind: ``dimse`` (C-STORE SCU) or ``stow`` (DICOMweb STOW-RS).
        ae_title / host / port: the DIMSE peer (``kind: dimse``).
        calling_ae_title: our AE title on outgoing associations (default: the SCP's).
        url: the STOW-RS base URL, e.g. ``http://pacs:8042/dicom-web`` (``kind: stow``).
        timeout_s: connection and DIMSE timeout.
    """

    name: str
    kind: Literal["dimse", "stow"] = "dimse"
    ae_title: str = ""
    host: str = ""
    port: int = 104
    calling_ae_title: str = ""
    url: str = ""
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be non-empty")
        if self.kind == "dimse":
            _ae_title(self.ae_title, "ae_title")
            if not self.host:
                raise ValueError("a dimse destination needs host")
            _port(self.port, "port", allow_zero=False)
        elif not self.url.startswith(("http://", "https://")):
            raise ValueError(f"a stow destination needs an http(s) url, got {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class DeliveryConfig:
    """Retries of sending results.

    Attributes:
        max_attempts: a delivery that fails this many times goes to dead-letter, its last
            error kept.
        backoff_initial_s: wait after the first failure; doubled after each.
        backoff_max_s: the longest wait between attempts.
    """

    max_attempts: int = 12
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_initial_s < 0:
            raise ValueError("max_attempts must be >= 1 and backoff_initial_s >= 0")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")

    def backoff_s(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (>= 1): exponential, capped."""
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(attempts - 1, 0)))


@dataclass(frozen=True)
class HttpConfig:
    """Prometheus ``/metrics``, ``/healthz`` and ``/readyz``.

    Attributes:
        enabled: serve them.
        host / port: bind address and port (0 picks a free one).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9110

    def __post_init__(self) -> None:
        _port(self.port, "port")


@dataclass(frozen=True)
class ApiTlsConfig:
    """HTTPS for the operator API and console.

    Attributes:
        certificate: the server's PEM certificate (chain); with ``private_key``, HTTPS.
        private_key: its PEM private key.
    """

    certificate: Path | None = None
    private_key: Path | None = None

    def __post_init__(self) -> None:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("HTTPS needs both certificate and private_key")

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(frozen=True)
class ApiConfig:
    """The operator REST API (``/api/v1``) and web console (``/``), on a listener of their own.

    Off unless ``enabled``. Every request needs credentials: the bearer ``token``, or HTTP
    basic ``username``/``password`` (both compared in constant time); give secrets by
    environment (``MEDSSL_GATEWAY__API__PASSWORD``, ``MEDSSL_GATEWAY__API__TOKEN``), not in
    the file. Actions are POSTs that carry the page's CSRF token.

    Attributes:
        enabled: serve the API and console.
        host / port: bind address (loopback by default: put a TLS reverse proxy or
            ``tls`` in front before binding elsewhere) and port (0 picks a free one).
        token: bearer token (at least 16 characters).
        username / password: HTTP basic credentials (the browser's login prompt).
        tls: HTTPS certificate and key.
        show_patient_id: show the studies' PatientID to the operators (off: responses and
            pages hold UIDs, accession numbers and series descriptions only).
        refusals_kept: refused associations kept in the job store (newest first).
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9111
    token: str | None = None
    username: str | None = None
    password: str | None = None
    tls: ApiTlsConfig = field(default_factory=ApiTlsConfig)
    show_patient_id: bool = False
    refusals_kept: int = 10000

    def __post_init__(self) -> None:
        _port(self.port, "port")
        if self.enabled and (self.username is None) != (self.password is None):
            raise ValueError(
                "HTTP basic credentials need both username and password (give the password "
                "by environment: MEDSSL_GATEWAY__API__PASSWORD)"
            )
        if self.token is not None and len(self.token) < 16:
            raise ValueError("token must have at least 16 characters")
        if self.password is not None and len(self.password) < 8:
            raise ValueError("password must have at least 8 characters")
        if self.enabled and self.token is None and self.username is None:
            raise ValueError(
                "the API needs credentials: token, or username and password "
                "(e.g. MEDSSL_GATEWAY__API__PASSWORD in the environment)"
            )
        if self.refusals_kept < 1:
            raise ValueError(f"refusals_kept must be >= 1, got {self.refusals_kept}")


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``medssl-serve`` needs (``examples/gateway.yaml`` documents each key).

    Attributes:
        routes: which model runs on which series: a list of sections (``model``, ``select``
            rules, ``min_probability``, ``companion_seg``, ``seg_type``, ...); at least one.
        destinations: where results are sent (DICOM C-STORE or STOW-RS), each with a unique
            ``name``; none keeps results in the spool only.
        log_level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR`` (JSON lines on stderr).
    """

    scp: ScpConfig = field(default_factory=ScpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    routes: tuple[RouteConfig, ...] = ()
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        if not self.routes:
            raise ValueError("routes: at least one route (model + series selection) is needed")
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destinations: names must be unique, got {names}")

    def to_dict(self, *, mask_secrets: bool = False) -> dict[str, Any]:
        """The configuration as plain YAML-able values (what ``--print-config`` shows); with
        ``mask_secrets``, the API's token and password read ``"***"`` (what the console shows)."""
        values = config_to_dict(self)
        if mask_secrets:
            for key in SECRET_KEYS:
                if values["api"].get(key) is not None:
                    values["api"][key] = "***"
            for destination in values["destinations"]:  # a STOW URL may carry user:password@
                destination["url"] = redact_url(destination.get("url") or "")
        return values


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``MEDSSL_GATEWAY__SCP__PORT=11113`` → ``{"scp.port": 11113}`` (values parsed as YAML)."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        dotted = ".".join(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if not dotted or "" in dotted.split("."):
            raise ConfigError(
                f"environment variable {name}: expected {ENV_PREFIX}SECTION__KEY", key=name
            )
        try:
            out[dotted] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"environment variable {name}: not a YAML value: {exc}", key=name
            ) from exc
    return out


def load_gateway_config(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Read and validate the gateway config: file, then environment, then ``overrides``.

    Relative paths in the file (spool, repository, TLS files) are relative to the file's folder.

    Raises:
        ConfigError: the file is missing or invalid; the message names the dotted key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: gateway config not found (see examples/gateway.yaml)")
    merged = {**env_overrides(environ), **(overrides or {})}
    cfg = load_config(GatewayConfig, path, merged)
    base = path.resolve().parent
    tls = cfg.scp.tls
    return replace(
        cfg,
        spool=replace(cfg.spool, path=_under(base, cfg.spool.path)),
        models=replace(cfg.models, repository=_under(base, cfg.models.repository)),
        scp=replace(
            cfg.scp,
            tls=replace(
                tls,
                certificate=_under(base, tls.certificate),
                private_key=_under(base, tls.private_key),
                ca_certificate=_under(base, tls.ca_certificate),
            ),
        ),
        api=replace(
            cfg.api,
            tls=replace(
                cfg.api.tls,
                certificate=_under(base, cfg.api.tls.certificate),
                private_key=_under(base, cfg.api.tls.private_key),
            ),
        ),
    )


def _under(base: Path, path: Path | None) -> Any:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else base / path

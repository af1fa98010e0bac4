"""The gateway's Prometheus metrics (prometheus-client), on a registry of its own.

Every metric is named ``medssl_gateway_*``. The stages of a study's latency histogram:

* ``assemble``: last instance received → study complete (≈ the idle time);
* ``queue``: complete → a worker starts it;
* ``inference``: reading, preprocessing, the models and writing the results;
* ``send``: results written → the last destination acknowledged them;
* ``total``: last instance received → the last destination acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["STAGES", "GatewayMetrics"]

#: Latency stages of ``medssl_gateway_stage_seconds``.
STAGES = ("assemble", "queue", "inference", "send", "total")

_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass
class GatewayMetrics:
    """The gateway's metrics; ``render()`` is the ``/metrics`` body.

    Attributes:
        associations: associations, by ``result`` (``accepted``, ``rejected``, ``dropped``:
            a connection closed before it became one, e.g. no A-ASSOCIATE-RQ in time).
        instances: instances stored and acknowledged, by SOP class name.
        rejected: instances not stored, by ``reason`` (``undecodable``, ``sop-class``,
            ``spool-full``, ``write-failed``, ``missing-uid``).
        studies: studies by ``state`` reached (counted on entering ``queued``, ``running``,
            ``done``, ``failed``, ``dead-letter``).
        deliveries: result deliveries by ``destination`` and ``result`` (``sent``,
            ``retry``, ``dead-letter``).
        queue_depth: jobs waiting (``received`` + ``queued``) and ``running``, by ``state``.
        spool_bytes: bytes held in the spool.
        stage_seconds: latency per stage (see the module docstring).
    """

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.associations = Counter(
            "medssl_gateway_associations", "DICOM associations requested", ["result"], registry=r
        )
        self.instances = Counter(
            "medssl_gateway_instances_received",
            "instances stored durably and acknowledged",
            ["sop_class"],
            registry=r,
        )
        self.rejected = Counter(
            "medssl_gateway_instances_rejected", "instances not stored", ["reason"], registry=r
        )
        self.studies = Counter(
            "medssl_gateway_studies", "studies entering a state", ["state"], registry=r
        )
        self.deliveries = Counter(
            "medssl_gateway_deliveries", "result deliveries", ["destination", "result"], registry=r
        )
        self.queue_depth = Gauge(
            "medssl_gateway_queue_depth", "jobs by state", ["state"], registry=r
        )
        self.spool_bytes = Gauge(
            "medssl_gateway_spool_bytes", "bytes held in the spool", registry=r
        )
        self.stage_seconds = Histogram(
            "medssl_gateway_stage_seconds",
            "study latency by stage",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

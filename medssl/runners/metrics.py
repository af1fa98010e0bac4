"""Read a counter or gauge from a Triton server's Prometheus metrics endpoint."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping

from medssl.errors import RunnerError

__all__ = ["read_metric"]


def read_metric(
    metrics_url: str, name: str, labels: Mapping[str, str] | None = None, timeout_s: float = 10.0
) -> float:
    """The value of counter or gauge ``name`` at ``http://<metrics_url>/metrics``, summed over
    the samples carrying ``labels``.

    Args:
        metrics_url: ``host:port`` of the metrics endpoint (Triton's default port 8002).
        name: the sample name, e.g. ``"nv_inference_request_success"`` (requests, not
            batch items, that completed successfully).
        labels: labels a sample must carry to count, e.g. ``{"model": "nodules",
            "version": "1"}``.
        timeout_s: seconds the request may take.

    Raises:
        RunnerError: the endpoint cannot be read, or no sample has that name and labels (the
            label sets present for the name are listed).
    """
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://{metrics_url}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as exc:
        raise RunnerError(f"cannot read metrics from {url}: {exc}") from exc
    wanted = dict(labels or {})
    base = name.removesuffix("_total")  # the parser names counter samples <family>_total
    named = [
        s
        for family in text_string_to_metric_families(text)
        if family.name == base
        for s in family.samples
        if s.name in (base, f"{base}_total")
    ]
    matching = [s.value for s in named if wanted.items() <= s.labels.items()]
    if not matching:
        present = [dict(s.labels) for s in named]
        found = f"its {name!r} samples have labels {present}" if named else "none has that name"
        raise RunnerError(f"{url} has no sample {name!r} with labels {wanted}; {found}")
    return float(sum(matching))

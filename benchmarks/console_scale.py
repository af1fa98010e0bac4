"""The operator API and console with a month of a busy site in the job store.

A job store is filled with ``--jobs`` finished studies (90 % done, 5 % failed, 4 %
dead-letter, 1 % queued; one delivery per done or dead-lettered study), one every 26 s, as
the gateway's own tables hold them; then the operator API of medssl-serve
(``medssl.serving.api.ApiServer``, in this process, on loopback) answers each page and
endpoint ``--reps`` times, and the median wall time per request is reported (an HTTP client
in the same process: the numbers include the request, the SQLite reads and the rendering).

No peer: Orthanc Explorer and MONAI Deploy Informatics Gateway keep other state (Orthanc
lists instances, not jobs; MIG's REST API has no job history), so there is nothing
comparable to time against; the question here is only whether an operator waits.

    .venv/bin/python benchmarks/console_scale.py [--jobs 100000] [--reps 7]

Writes ``benchmarks/results/console_scale.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from medssl.bench.machine import cpu_device, write_report
from medssl.serving.api import ApiServer
from medssl.serving.config import (
    ApiConfig,
    DestinationConfig,
    GatewayConfig,
    RouteConfig,
    SpoolConfig,
)
from medssl.serving.jobstore import JobStore
from medssl.serving.operations import Operations
from medssl.serving.spool import Spool

OUT = Path(__file__).resolve().parent / "results" / "console_scale"
TOKEN = "benchmark-token-0123456789"
PATHS = [
    "/",
    "/studies",
    "/failures",
    "/deliveries?state=dead-letter",
    "/api/v1/overview",
    "/api/v1/counters",
    "/api/v1/studies",
    "/api/v1/studies?state=dead-letter",
    "/api/v1/studies?uid={accession}",
    "/api/v1/studies?offset={deep}",
    "/api/v1/studies/{job}",
    "/api/v1/destinations",
]
_MIX = ["done"] * 90 + ["failed"] * 5 + ["dead-letter"] * 4 + ["queued"]


def fill(store: JobStore, n: int, now: float) -> None:
    """``n`` jobs, one every 26 s up to ``now``, through SQL (the job store's own tables)."""
    jobs, deliveries = [], []
    for i in range(n):
        t, state = now - (n - i) * 26.0, _MIX[i % len(_MIX)]
        jobs.append(
            (
                f"1.2.826.0.1.3680043.10.{i}",
                state,
                1,
                300,
                t,
                t + 20,
                t + 20,
                t + 30,
                t + 31,
                t + 60,
                None if state == "queued" else t + 62,
                "no series could be processed" if state == "failed" else None,
                f"A{i:07d}",
            )
        )
        if state in ("done", "dead-letter"):
            deliveries.append(
                (
                    i + 1,
                    "pacs",
                    "sent" if state == "done" else "dead-letter",
                    1,
                    t + 62,
                    t + 62 if state == "done" else None,
                )
            )
    with store._tx() as db:  # a benchmark fills the tables directly
        db.executemany(
            "INSERT INTO jobs (study_uid, state, attempts, "
            "n_instances, created_at, last_instance_at, "
            "idle_since, queued_at, started_at, inferred_at, finished_at, error, accession_number) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            jobs,
        )
        db.executemany(
            "INSERT INTO deliveries (job_id, destination, "
            "state, attempts, last_attempt_at, sent_at) "
            "VALUES (?,?,?,?,?,?)",
            deliveries,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="medssl-console-"))
    store = JobStore(root / "jobs.sqlite")
    start = time.perf_counter()
    fill(store, args.jobs, time.time())
    fill_s = time.perf_counter() - start
    cfg = GatewayConfig(
        routes=(RouteConfig(model="m"),),
        spool=SpoolConfig(path=root),
        destinations=(DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=104),),
        api=ApiConfig(enabled=True, port=0, token=TOKEN),
    )
    server = ApiServer(cfg.api, Operations(store, Spool(root), cfg))
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    values = {
        "accession": f"A{args.jobs * 7 // 9:07d}",
        "deep": args.jobs - 100,
        "job": args.jobs * 7 // 9,
    }
    rows = []
    try:
        for template in PATHS:
            path = template.format(**values)
            times, size = [], 0
            for _ in range(args.reps):
                request = urllib.request.Request(
                    base + path, headers={"Authorization": f"Bearer {TOKEN}"}
                )
                t = time.perf_counter()
                with urllib.request.urlopen(request, timeout=60) as response:
                    size = len(response.read())
                times.append(time.perf_counter() - t)
            rows.append(
                {
                    "path": template,
                    "median_ms": round(statistics.median(times) * 1000, 1),
                    "max_ms": round(max(times) * 1000, 1),
                    "bytes": size,
                }
            )
    finally:
        server.stop()
        store.close()
    text = [
        f"# Operator API and console with {args.jobs:,} jobs in the store",
        "",
        f"{cpu_device()}; {args.reps} requests each, "
        f"median and slowest; the store filled in {fill_s:.1f} s.",
        "No peer (see the script's docstring).",
        "",
        "| request | median ms | slowest ms | bytes |",
        "|---|---:|---:|---:|",
    ]
    text += [
        f"| `{r['path']}` | {r['median_ms']:.1f} | {r['max_ms']:.1f} | {r['bytes']:,} |"
        for r in rows
    ]
    write_report(
        OUT,
        {
            "device": cpu_device(),
            "jobs": args.jobs,
            "reps": args.reps,
            "fill_s": round(fill_s, 2),
            "requests": rows,
        },
        "\n".join(text) + "\n",
    )


if __name__ == "__main__":
    main()

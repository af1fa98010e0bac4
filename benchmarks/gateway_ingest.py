"""The DICOM gateway on this CPU: ingest rate vs Orthanc, end-to-end latency, memory.

Acceptance check of ``medssl-serve``, everything in one run, real processes:

* **Ingest.** The same synthetic 300-slice chest CT study (512², 16-bit, ~150 MB) is sent
  with ``storescu`` (dcmtk, one association) to the gateway and to Orthanc (Debian
  package, default storage settings), alternating, ``--reps`` times each; instances/s =
  300 / storescu's wall time; the ratio gateway / Orthanc uses the medians (goal ≥ 1.0).
  The gateway makes every instance durable before acknowledging it (temp file, fsync,
  rename, directory fsync, a job-store row); Orthanc writes its file and its SQLite index.
  For the ingest runs the gateway's study idle time is an hour, so no inference competes
  for the CPU; the study is deleted from Orthanc between its runs (a re-sent instance it
  already holds is not stored again).
* **Latency.** A gateway with the shipped detector (``focalmix-nodules``, embedded
  onnxruntime) and Orthanc as its destination receives the study by ``storescu``; the
  latency is from the last instance acknowledged to the SR stored in Orthanc (polled over
  REST every 50 ms), split by stage from the job store's timestamps: assemble (the idle
  time, ``--idle`` s; the shipped default is 10 s), queue, inference (read, preprocess,
  model, SR), send (C-STORE of the SR).
* **Memory.** Four copies of the study (new UIDs) arrive at once (four ``storescu``
  processes) and are processed; the peak RSS of the gateway's process tree is sampled
  every 0.1 s; the same for Orthanc receiving the four copies.

    .venv/bin/python benchmarks/gateway_ingest.py [--reps 3] [--idle 2] [--data DIR]

Writes ``benchmarks/results/gateway_ingest.json`` and ``.md``. Needs Orthanc
(``/usr/sbin/Orthanc``) and dcmtk (``storescu``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom

from medssl.bench.data import write_scans
from medssl.bench.machine import TreeMemory, cpu_device
from medssl.testing import GatewayProcess, OrthancServer, gateway_config

ROOT = Path(__file__).resolve().parents[1]

RESULTS = Path(__file__).parent / "results"
MODEL = "focalmix-nodules"
GOAL = 1.0
N_CONCURRENT = 4


def _copy_with_new_uids(source: Path, target: Path, tag: str) -> Path:
    """The study of ``source`` under new Study/Series/SOP/FrameOfReference UIDs in ``target``."""
    if target.is_dir() and len(list(target.glob("*.dcm"))) == len(list(source.glob("*.dcm"))):
        return target
    target.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}

    def new(uid: str) -> str:
        return mapping.setdefault(uid, pydicom.uid.generate_uid(entropy_srcs=[tag, uid]))

    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameOfReferenceUID",
        ):
            setattr(ds, keyword, new(str(getattr(ds, keyword))))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def _storescu_command(aet: str, port: int, folder: Path) -> list[str]:
    """storescu sending every ``.dcm`` of ``folder`` in one association."""
    return [
        "storescu",
        "-aet",
        "BENCH",
        "-aec",
        aet,
        "127.0.0.1",
        str(port),
        *map(str, sorted(folder.glob("*.dcm"))),
    ]


def _storescu(aet: str, port: int, folder: Path) -> float:
    """Send every file of ``folder`` in one association; returns the wall seconds."""
    start = time.perf_counter()
    result = subprocess.run(_storescu_command(aet, port, folder), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {aet}@{port} failed: {result.stderr[-2000:]}")
    return time.perf_counter() - start


def _study_uid(folder: Path) -> str:
    return str(
        pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    )


def _delete_study(orthanc: OrthancServer, study_uid: str) -> None:
    for found in orthanc.find_studies(study_uid):
        orthanc.delete(f"/studies/{found}")


def _wait_sr(orthanc: OrthancServer, study_uid: str, timeout_s: float = 600.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if orthanc.instances_of(study_uid, "SR"):
            return time.time()
        time.sleep(0.05)
    raise TimeoutError(f"no SR for {study_uid} in Orthanc after {timeout_s} s")


def _gateway(work: Path, name: str, orthanc: OrthancServer | None, idle_s: float) -> GatewayProcess:
    destinations = (
        []
        if orthanc is None
        else [
            {
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ]
    )
    routes = [{"model": MODEL, "min_probability": 0.5}]
    cfg = gateway_config(
        work / name,
        routes,
        ROOT / "model_repository",
        destinations,
        spool={"study_idle_s": idle_s, "min_free_mb": 256},
    )
    gateway = GatewayProcess(work / name, cfg, env={"OMP_NUM_THREADS": "2"})
    gateway.start()
    return gateway


def ingest(work: Path, study: Path, orthanc: OrthancServer, reps: int) -> dict[str, Any]:
    gateway = _gateway(work, "gw-ingest", None, idle_s=3600.0)
    n = len(list(study.glob("*.dcm")))
    uid = _study_uid(study)
    runs: dict[str, list[float]] = {"gateway": [], "orthanc": []}
    try:
        for rep in range(reps):
            order = ("gateway", "orthanc") if rep % 2 == 0 else ("orthanc", "gateway")
            for side in order:
                if side == "orthanc":
                    _delete_study(orthanc, uid)
                    seconds = _storescu(orthanc.aet, orthanc.dicom_port, study)
                else:
                    shutil.rmtree(gateway.spool / "incoming", ignore_errors=True)
                    seconds = _storescu("MEDSSL", gateway.port, study)
                runs[side].append(n / seconds)
                print(
                    f"ingest rep {rep + 1} {side}: {n / seconds:.1f} instances/s", file=sys.stderr
                )
    finally:
        gateway.stop()
    med = {side: statistics.median(v) for side, v in runs.items()}
    return {
        "instances": n,
        "study_mb": sum(p.stat().st_size for p in study.glob("*.dcm")) / 2**20,
        "instances_per_s": runs,
        "median_instances_per_s": med,
        "ratio_gateway_to_orthanc": med["gateway"] / med["orthanc"],
        "goal": GOAL,
    }


def latency(
    work: Path, study: Path, orthanc: OrthancServer, reps: int, idle_s: float
) -> dict[str, Any]:
    gateway = _gateway(work, "gw-latency", orthanc, idle_s=idle_s)
    uid = _study_uid(study)
    rows = []
    try:
        for rep in range(reps):
            _delete_study(orthanc, uid)
            _storescu("MEDSSL", gateway.port, study)
            acked = time.time()
            stored = _wait_sr(orthanc, uid)
            job = _last_done_job(gateway)
            rows.append(
                {
                    "total_s": stored - acked,
                    "assemble_s": job["queued_at"] - job["last_instance_at"],
                    "queue_s": job["started_at"] - job["queued_at"],
                    "inference_s": job["inferred_at"] - job["started_at"],
                    "send_s": job["finished_at"] - job["inferred_at"],
                }
            )
            print(f"latency rep {rep + 1}: {rows[-1]}", file=sys.stderr)
    finally:
        gateway.stop()
    return {
        "idle_s": idle_s,
        "runs": rows,
        "median": {k: statistics.median(r[k] for r in rows) for k in rows[0]},
    }


def _last_done_job(gateway: GatewayProcess, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = gateway.jobs()
        if jobs and jobs[-1]["state"] == "done" and jobs[-1]["finished_at"]:
            return jobs[-1]
        time.sleep(0.05)
    raise TimeoutError(f"the last job did not finish: {gateway.jobs()[-1:]}")


def memory(work: Path, copies: list[Path], orthanc: OrthancServer, idle_s: float) -> dict[str, Any]:
    gateway = _gateway(work, "gw-memory", orthanc, idle_s=idle_s)
    try:
        assert gateway.process is not None
        idle_monitor = TreeMemory(gateway.process.pid)
        idle_monitor.start()
        time.sleep(1.0)
        idle_monitor.stop()
        monitor = TreeMemory(gateway.process.pid)
        monitor.start()
        start = time.time()
        senders = [
            subprocess.Popen(
                _storescu_command("MEDSSL", gateway.port, c),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for c in copies
        ]
        for s in senders:
            s.wait()
        received = time.time() - start
        for c in copies:
            _wait_sr(orthanc, _study_uid(c))
        processed = time.time() - start
        monitor.stop()
    finally:
        gateway.stop()
    orthanc_monitor = TreeMemory(orthanc.pid)
    for c in copies:
        _delete_study(orthanc, _study_uid(c))
    orthanc_monitor.start()
    senders = [
        subprocess.Popen(
            _storescu_command(orthanc.aet, orthanc.dicom_port, c),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for c in copies
    ]
    for s in senders:
        s.wait()
    orthanc_monitor.stop()
    return {
        "studies": len(copies),
        "gateway_idle_rss_mb": idle_monitor.peak_mb,
        "gateway_peak_rss_mb": monitor.peak_mb,
        "gateway_received_s": received,
        "gateway_all_srs_s": processed,
        "orthanc_peak_rss_mb": orthanc_monitor.peak_mb,
    }


def render(report: dict[str, Any]) -> str:
    ing, lat, mem = report["ingest"], report["latency"], report["memory"]
    med = ing["median_instances_per_s"]
    lines = [
        f"# Gateway ingest, latency and memory ({report['device']})",
        "",
        f"Study: {ing['instances']} instances, {ing['study_mb']:.0f} MB "
        "(synthetic chest CT, 512², uncompressed); storescu, one association; "
        f"medians of {len(ing['instances_per_s']['gateway'])} runs.",
        "",
        "| receiver | instances/s (median) | runs |",
        "|---|---|---|",
    ]
    for side in ("gateway", "orthanc"):
        runs = ", ".join(f"{v:.0f}" for v in ing["instances_per_s"][side])
        lines.append(f"| {side} | {med[side]:.1f} | {runs} |")
    ratio = ing["ratio_gateway_to_orthanc"]
    lines += [
        "",
        f"Gateway / Orthanc: **{ratio:.2f}×** (goal ≥ {GOAL:.1f}×: "
        f"{'met' if ratio >= GOAL else 'NOT met'}).",
        "",
        f"Latency, last instance acknowledged → SR stored in Orthanc (shipped detector, embedded "
        f"onnxruntime, study idle time {lat['idle_s']:g} s), medians of {len(lat['runs'])} runs:",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    for key in ("assemble_s", "queue_s", "inference_s", "send_s", "total_s"):
        lines.append(f"| {key[:-2]} | {lat['median'][key]:.2f} |")
    lines += [
        "",
        f"Memory, {mem['studies']} studies arriving at once and processed: gateway peak "
        f"RSS {mem['gateway_peak_rss_mb']:.0f} MB (idle {mem['gateway_idle_rss_mb']:.0f} "
        f"MB; all received in {mem['gateway_received_s']:.1f} s, all SRs in Orthanc "
        f"after {mem['gateway_all_srs_s']:.1f} s); Orthanc receiving the same: "
        f"{mem['orthanc_peak_rss_mb']:.0f} MB.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--idle", type=float, default=2.0, help="study idle time (s) for the latency runs"
    )
    parser.add_argument("--data", type=Path, default=None, help="keep the generated studies here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        work = Path(tmp)
        data = args.data or work / "data"
        study = write_scans(data, 1, seed=700)[0]
        copies = [
            _copy_with_new_uids(study, data / f"copy{i}", f"copy{i}") for i in range(N_CONCURRENT)
        ]
        orthanc = OrthancServer(work / "orthanc")
        orthanc.start()
        try:
            report = {
                "device": cpu_device(),
                "model": MODEL,
                "ingest": ingest(work, study, orthanc, args.reps),
                "latency": latency(work, study, orthanc, args.reps, args.idle),
                "memory": memory(work, copies, orthanc, args.idle),
            }
        finally:
            orthanc.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gateway_ingest.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    (RESULTS / "gateway_ingest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

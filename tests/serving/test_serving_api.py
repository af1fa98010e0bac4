"""The operator API and console in one process: a real job store, spool and HTTP listener
(``ApiServer``), driven over HTTP as an operator's browser or script would.

The states come from the job store's own transitions (a failed study, a dead-lettered
delivery, a done study, a waiting one), so the API is checked against what the gateway
records, not against hand-written rows. The end-to-end test with a real gateway, Orthanc and
chromium is tests/serving/test_serving_console.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

from medssl.cli.serve import serve
from medssl.errors import ConfigError
from medssl.serving.api import ApiServer
from medssl.serving.config import ApiConfig, ApiTlsConfig, GatewayConfig, load_gateway_config
from medssl.serving.jobstore import JobState, JobStore, Output, SeriesRecord
from medssl.serving.openapi import OPENAPI
from medssl.serving.operations import Operations
from medssl.serving.spool import Spool

USER, PASSWORD, TOKEN = "operator", "correct horse battery", "t0ken-of-sixteen-chars"
#: Planted identifying values: never in any response unless show_patient_id (the ID only).
PATIENT_ID, PATIENT_NAME = "PID-4711-SECRET", "Doe^Jane"
STUDIES = {
    "failed": "1.2.826.0.1.1",
    "dead": "1.2.826.0.1.2",
    "done": "1.2.826.0.1.3",
    "waiting": "1.2.826.0.1.4",
}


def _config(root: Path, **api) -> dict:
    return {
        "scp": {"ae_title": "MEDSSL", "port": 0},
        "spool": {"path": str(root / "spool")},
        "models": {"repository": str(root)},
        "routes": [{"model": "m"}],
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1104},
            {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 1105},
            {
                "name": "web",
                "kind": "stow",
                "url": f"http://stow:{PASSWORD}@127.0.0.1:8042/dicom-web",
            },
        ],
        "api": {
            "enabled": True,
            "port": 0,
            "username": USER,
            "password": PASSWORD,
            "token": TOKEN,
            **api,
        },
    }


def _cfg(root: Path, **api) -> GatewayConfig:
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    path = root / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config(root, **api)))
    return load_gateway_config(path)


def _spool_instance(spool: Spool, study_uid: str) -> None:
    """A spooled instance of the study holding the planted PatientID and PatientName."""
    ds = pydicom.Dataset()
    ds.PatientID, ds.PatientName, ds.StudyInstanceUID = PATIENT_ID, PATIENT_NAME, study_uid
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", study_uid + ".1.1"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    spool.store(buffer.getvalue(), study_uid, study_uid + ".1", ds.SOPInstanceUID)


def _populate(store: JobStore, spool: Spool) -> dict[str, int]:
    """One job per state of interest, made by the store's own transitions."""
    ids = {}
    for name, uid in STUDIES.items():
        ids[name] = store.record_instance(uid, accession_number=f"ACC-{name}").id
        _spool_instance(spool, uid)
    store.assemble(0.0)
    store.cancel(ids["waiting"], "setup")  # so that claim() below never takes it
    for name in ("failed", "dead", "done"):
        job = store.claim()
        assert job is not None and job.id == ids[name]
        series = [
            SeriesRecord(
                f"{STUDIES[name]}.7",
                "m",
                "failed" if name == "failed" else "ok",
                "2 slice(s) missing" if name == "failed" else None,
                None if name == "failed" else 1,
                "CHEST 1.0 B31f",
            )
        ]
        if name == "failed":
            store.fail(job.id, "no series could be processed: 2 slice(s) missing", series=series)
            continue
        out = spool.output_dir(job.id) / "sr.dcm"
        out.write_bytes(b"DICM")
        store.finish_inference(
            job.id, [Output(out, "sr", "m", f"{STUDIES[name]}.99")], ["pacs"], series=series
        )
        delivery = store.deliveries(job.id)[0]
        if name == "dead":
            store.delivery_failed(delivery.id, "cannot connect to PACS@127.0.0.1:1104", 1, 1.0)
        else:
            store.delivery_sent(delivery.id)
    # reopen the waiting one: a fresh study that is queued
    ids["waiting"] = store.record_instance("1.2.826.0.1.5", accession_number="ACC-waiting").id
    _spool_instance(spool, "1.2.826.0.1.5")
    store.assemble(0.0)
    store.record_refusal("INTRUDER", "MEDSSL", "10.1.2.3", "calling AE title not allowed")
    spool.quarantine(
        b"not dicom", "the dataset does not decode (ValueError)", calling_ae="CT01", peer="10.1.2.4"
    )
    return ids


class Gateway:
    """The pieces of a gateway the API serves: store, spool, operations, server."""

    def __init__(self, root: Path, **api) -> None:
        self.cfg = _cfg(root, **api)
        self.store = JobStore(self.cfg.spool.path / "jobs.sqlite")
        self.spool = Spool(self.cfg.spool.path)
        self.ids = _populate(self.store, self.spool)
        self.server = ApiServer(
            self.cfg.api,
            Operations(self.store, self.spool, self.cfg, ready=lambda: (True, "ready")),
        )
        self.server.start()
        self.base = f"{self.server.scheme}://127.0.0.1:{self.server.port}"
        self.context = None

    def request(
        self,
        method: str,
        path: str,
        body: dict | str | None = None,
        *,
        auth: str | None = "basic",
        headers: dict | None = None,
    ) -> tuple[int, dict, str]:
        h = dict(headers or {})
        if auth == "basic":
            h["Authorization"] = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        elif auth == "bearer":
            h["Authorization"] = f"Bearer {TOKEN}"
        elif auth is not None:
            h["Authorization"] = auth
        data = None
        if isinstance(body, dict):
            data, h["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif isinstance(body, str):
            data, h["Content-Type"] = body.encode(), "application/x-www-form-urlencoded"
        req = urllib.request.Request(self.base + path, data=data, headers=h, method=method)
        try:
            with (
                _NoRedirect().open(req, timeout=10)
                if self.context is None
                else urllib.request.urlopen(req, timeout=10, context=self.context) as r
            ):
                return r.status, dict(r.headers), r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    def csrf(self) -> str:
        return json.loads(self.request("GET", "/api/v1/session")[2])["csrf_token"]

    def close(self) -> None:
        self.server.stop()
        self.store.close()


class _NoRedirect:
    """urlopen that returns a 303 instead of following it."""

    def __init__(self) -> None:
        class Keep(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        self.opener = urllib.request.build_opener(Keep)

    def open(self, req, timeout):
        return self.opener.open(req, timeout=timeout)


@pytest.fixture
def gw(tmp_path):
    gateway = Gateway(tmp_path)
    yield gateway
    gateway.close()


READS = [
    "/",
    "/studies",
    "/failures",
    "/deliveries",
    "/quarantine",
    "/refused",
    "/config",
    "/api/v1/studies",
    "/api/v1/deliveries",
    "/api/v1/quarantine",
    "/api/v1/refusals",
    "/api/v1/counters",
    "/api/v1/overview",
    "/api/v1/destinations",
    "/api/v1/actions",
    "/api/v1/config",
    "/api/v1/session",
    "/api/v1/openapi.json",
    "/static/console.css",
    "/static/console.js",
]


def test_every_page_and_endpoint_needs_credentials(gw):
    for path in [*READS, "/studies/1", "/api/v1/studies/1"]:
        status, headers, _ = gw.request("GET", path, auth=None)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic")
    wrong = [
        "Basic " + base64.b64encode(f"{USER}:wrong-password".encode()).decode(),
        "Basic " + base64.b64encode(f"root:{PASSWORD}".encode()).decode(),
        "Bearer t0ken-of-sixteen-charX",
        "Bearer ",
        "Basic !!!not-base64",
        "Digest x",
    ]
    for auth in wrong:
        assert gw.request("GET", "/api/v1/counters", auth=auth)[0] == 401, auth
    assert gw.request("POST", f"/api/v1/studies/{gw.ids['failed']}/retry", {}, auth=None)[0] == 401
    assert gw.store.job(gw.ids["failed"]).state is JobState.FAILED
    for auth in ("basic", "bearer"):
        assert gw.request("GET", "/api/v1/counters", auth=auth)[0] == 200


def test_reads_answer_the_morning_questions(gw):
    status, headers, body = gw.request("GET", "/api/v1/studies?state=failed,dead-letter")
    assert status == 200 and headers["Content-Type"] == "application/json"
    page = json.loads(body)
    assert {j["state"] for j in page["items"]} == {"failed", "dead-letter"} and page["total"] == 2
    failed = json.loads(
        gw.request("GET", f"/api/v1/studies/{STUDIES['failed']}")[2]
    )  # by StudyInstanceUID
    assert failed["id"] == gw.ids["failed"] and "2 slice(s) missing" in failed["error"]
    assert failed["series"] == [
        {
            "series_uid": f"{STUDIES['failed']}.7",
            "model": "m",
            "status": "failed",
            "reason": "2 slice(s) missing",
            "n_findings": None,
            "description": "CHEST 1.0 B31f",
        }
    ]
    dead = json.loads(gw.request("GET", f"/api/v1/studies/{gw.ids['dead']}")[2])
    assert dead["outputs"] == [
        {"kind": "sr", "model": "m", "sop_instance_uid": f"{STUDIES['dead']}.99", "file": "sr.dcm"}
    ]
    assert (
        dead["deliveries"][0]["state"] == "dead-letter"
        and "PACS@127.0.0.1" in dead["deliveries"][0]["last_error"]
    )
    assert set(dead["durations_s"]) == {
        "receive",
        "assemble",
        "queue",
        "inference",
        "send",
        "total",
    }
    by_uid = json.loads(
        gw.request("GET", f"/api/v1/studies?uid={STUDIES['done']}.99")[2]
    )  # a result's UID
    assert [j["id"] for j in by_uid["items"]] == [gw.ids["done"]]
    by_accession = json.loads(gw.request("GET", "/api/v1/studies?uid=ACC-failed")[2])
    assert [j["id"] for j in by_accession["items"]] == [gw.ids["failed"]]
    future = json.loads(gw.request("GET", "/api/v1/studies?since=2999-01-01")[2])
    assert future["total"] == 0
    paged = json.loads(gw.request("GET", "/api/v1/studies?limit=2&offset=1")[2])
    assert len(paged["items"]) == 2 and paged["total"] == 5
    counters = json.loads(gw.request("GET", "/api/v1/counters")[2])
    assert (
        counters["jobs"]["queued"] == 1
        and counters["waiting"] == 1
        and counters["oldest_waiting_s"] >= 0
    )
    destinations = {d["name"]: d for d in json.loads(gw.request("GET", "/api/v1/destinations")[2])}
    assert destinations["pacs"]["status"] == "up"  # its last attempt (the done job's) succeeded
    assert destinations["archive"]["status"] == "unknown"
    refusals = json.loads(gw.request("GET", "/api/v1/refusals")[2])
    assert refusals["items"][0]["calling_ae"] == "INTRUDER" and refusals["total"] == 1
    quarantine = json.loads(gw.request("GET", "/api/v1/quarantine")[2])
    assert quarantine["items"][0]["context"]["calling_ae"] == "CT01"
    overview = json.loads(gw.request("GET", "/api/v1/overview")[2])
    assert len(overview["throughput_per_hour"]) == 24
    assert sum(h["done"] for h in overview["throughput_per_hour"]) == 1
    assert overview["failures_24h"]["total"] == 2
    for bad in (
        "/api/v1/studies?state=lost",
        "/api/v1/studies?limit=0",
        "/api/v1/studies?since=yesterday",
    ):
        assert gw.request("GET", bad)[0] == 400, bad
    assert gw.request("GET", "/api/v1/studies/999")[0] == 404
    assert gw.request("GET", "/api/v1/nothing")[0] == 404


def test_actions_need_post_and_the_csrf_token_and_are_recorded(gw):
    job = gw.ids["failed"]
    assert gw.request("GET", f"/api/v1/studies/{job}/retry")[0] == 405
    assert gw.request("POST", f"/api/v1/studies/{job}/retry", {})[0] == 403  # no token
    assert (
        gw.request("POST", f"/api/v1/studies/{job}/retry", {}, headers={"X-CSRF-Token": "0" * 64})[
            0
        ]
        == 403
    )
    assert gw.request("POST", f"/api/v1/studies/{job}/retry", f"csrf_token={'0' * 64}")[0] == 403
    token = gw.csrf()
    assert (
        gw.request(
            "POST",
            f"/api/v1/studies/{job}/retry",
            {},
            headers={"X-CSRF-Token": token, "Origin": "http://evil.example"},
        )[0]
        == 403
    )
    assert gw.store.job(job).state is JobState.FAILED  # nothing happened
    status, _, body = gw.request(
        "POST",
        f"/api/v1/studies/{job}/retry",
        {"reason": "fixed the series"},
        headers={"X-CSRF-Token": token},
    )
    assert status == 200 and json.loads(body)["state"] == "queued"
    job_now = gw.store.job(job)
    assert (job_now.state, job_now.attempts, job_now.error) == (JobState.QUEUED, 0, None)
    # a second retry is a conflict, recorded too
    status, _, body = gw.request(
        "POST", f"/api/v1/studies/{job}/retry", {}, headers={"X-CSRF-Token": token}
    )
    assert status == 409 and "queued" in json.loads(body)["error"]
    actions = [
        (a.actor, a.action, a.reason, a.outcome.split(":")[0]) for a in gw.store.actions(job)
    ]
    assert actions == [
        (f"{USER} (api)", "retry", None, "refused"),
        (f"{USER} (api)", "retry", "fixed the series", "ok"),
    ]
    # the console's form: the same action, answered by a redirect back to the page
    dead = gw.ids["dead"]
    status, headers, _ = gw.request(
        "POST",
        f"/api/v1/studies/{dead}/retry",
        f"csrf_token={token}&next=/studies/{dead}&reason=PACS+back",
    )
    assert status == 303 and headers["Location"] == f"/studies/{dead}"
    assert gw.store.job(dead).state is JobState.SENDING  # results kept, delivery pending again
    assert (
        gw.store.deliveries(dead)[0].state == "pending"
        and gw.store.deliveries(dead)[0].attempts == 0
    )
    assert gw.store.actions(dead)[0].actor == f"{USER} (console)"
    # the redirect target never leaves the console
    status, headers, _ = gw.request(
        "POST",
        f"/api/v1/studies/{gw.ids['waiting']}/cancel",
        f"csrf_token={token}&next=//evil.example/",
    )
    assert status == 303 and headers["Location"] == "/"
    assert gw.store.job(gw.ids["waiting"]).state is JobState.CANCELLED


def test_redeliver_and_purge(gw):
    token = {"X-CSRF-Token": gw.csrf()}
    done = gw.ids["done"]
    assert (
        gw.request(
            "POST", f"/api/v1/studies/{done}/redeliver", {"destination": "nowhere"}, headers=token
        )[0]
        == 404
    )
    assert gw.request("POST", f"/api/v1/studies/{done}/redeliver", {}, headers=token)[0] == 400
    assert (
        gw.request(
            "POST",
            f"/api/v1/studies/{gw.ids['failed']}/redeliver",
            {"destination": "pacs"},
            headers=token,
        )[0]
        == 409
    )
    bearer = json.loads(gw.request("GET", "/api/v1/session", auth="bearer")[2])["csrf_token"]
    assert bearer != token["X-CSRF-Token"]  # a token per principal
    status, _, body = gw.request(
        "POST",
        f"/api/v1/studies/{done}/redeliver",
        {"destination": "archive"},
        headers={"X-CSRF-Token": bearer},
        auth="bearer",
    )
    assert status == 200 and json.loads(body)["state"] == "sending"
    assert {d.destination: d.state for d in gw.store.deliveries(done)} == {
        "pacs": "sent",
        "archive": "pending",
    }
    assert gw.store.actions(done)[0].actor == "token (api)"
    assert (
        gw.request("POST", "/api/v1/quarantine/purge", {"older_than_days": -1}, headers=token)[0]
        == 400
    )
    status, _, body = gw.request(
        "POST", "/api/v1/quarantine/purge", {"older_than_days": 30}, headers=token
    )
    assert status == 200 and json.loads(body)["removed"] == 0
    status, _, body = gw.request(
        "POST", "/api/v1/quarantine/purge", {"older_than_days": 0}, headers=token
    )
    assert json.loads(body)["removed"] == 1 and gw.spool.quarantined() == []


def test_no_patient_identifying_value_in_any_response(tmp_path):
    for show in (False, True):
        gw = Gateway(tmp_path / str(show), show_patient_id=show)
        try:
            gw.store.record_refusal(
                "<script>x</script>", "MEDSSL", "10.0.0.1", "calling AE title not allowed"
            )
            bodies = [gw.request("GET", p)[2] for p in READS]
            bodies += [gw.request("GET", f"/studies/{i}")[2] for i in gw.ids.values()]
            bodies += [gw.request("GET", f"/api/v1/studies/{i}")[2] for i in gw.ids.values()]
            text = "\n".join(bodies)
            assert (PATIENT_ID in text) is show
            assert PATIENT_NAME not in text  # the job store never holds it
            assert (
                "<script>x</script>" not in gw.request("GET", "/refused")[2]
            )  # escaped, not markup
            assert PASSWORD not in text and TOKEN not in text  # config page: secrets masked
        finally:
            gw.close()


def test_pages_are_html_with_a_strict_content_security_policy(gw):
    for path in [
        "/",
        "/studies",
        f"/studies/{gw.ids['dead']}",
        f"/studies/{gw.ids['done']}",
        "/failures",
        "/deliveries",
        "/quarantine",
        "/refused",
        "/config",
        "/studies?state=failed&uid=ACC-failed",
    ]:
        status, headers, body = gw.request("GET", path)
        assert status == 200 and headers["Content-Type"].startswith("text/html"), path
        assert (
            "default-src 'none'" in headers["Content-Security-Policy"]
            and headers["Cache-Control"] == "no-store"
        )
        assert not re.search(r'(src|href|action)="(https?:)?//', body), (
            path
        )  # nothing from elsewhere
    body = gw.request("GET", f"/studies/{gw.ids['dead']}")[2]
    assert 'data-action="retry"' in body and 'name="csrf_token"' in body
    assert 'data-action="redeliver"' in gw.request("GET", f"/studies/{gw.ids['done']}")[2]
    assert gw.request("GET", "/static/../api.py")[0] == 404
    assert gw.request("GET", "/nowhere", headers={"Accept": "text/html"})[0] == 404


def test_the_openapi_document_describes_every_route(gw):
    paths = set(OPENAPI["paths"])
    for path in paths:
        concrete = path.replace("{ref}", str(gw.ids["done"]))
        method = next(iter(OPENAPI["paths"][path]))
        if method == "get":
            assert gw.request("GET", concrete)[0] == 200, path
        else:
            assert gw.request("GET", concrete)[0] == 405, path  # an action, POST only
    # and every API route the handler serves is described
    assert gw.request("GET", "/api/v1/undocumented")[0] == 404


def test_a_slow_client_does_not_block_the_others(gw):
    slow = socket.create_connection(("127.0.0.1", gw.server.port))
    slow.sendall(b"GET /api/v1/counters HTTP/1.1\r\nHost: x\r\n")  # and never finishes
    try:
        start = time.monotonic()
        assert gw.request("GET", "/api/v1/counters")[0] == 200
        assert time.monotonic() - start < 2
    finally:
        slow.close()


def test_https_when_a_certificate_is_given(tmp_path, certificate):
    cert, key = certificate
    gw = Gateway(tmp_path, tls={"certificate": str(cert), "private_key": str(key)})
    try:
        assert gw.base.startswith("https://")
        gw.context = ssl.create_default_context(cafile=str(cert))
        assert gw.request("GET", "/api/v1/counters")[0] == 200
        with pytest.raises(OSError):  # plain HTTP gets no answer
            urllib.request.urlopen(gw.base.replace("https", "http") + "/api/v1/counters", timeout=5)
        # a client that connects and never says hello holds its own thread, not the listener
        silent = socket.create_connection(("127.0.0.1", gw.server.port))
        try:
            start = time.monotonic()
            assert gw.request("GET", "/api/v1/counters")[0] == 200
            assert time.monotonic() - start < 2
        finally:
            silent.close()
    finally:
        gw.close()


def test_the_api_is_off_by_default_and_refuses_to_start_without_credentials(tmp_path):
    assert GatewayConfig(routes=_cfg(tmp_path).routes).api.enabled is False
    for api in (
        {"username": None, "password": None, "token": None},
        {"token": "short"},
        {"password": "short"},
        {"username": None},
        {"password": None},
    ):
        with pytest.raises(ConfigError):
            _cfg(tmp_path, **api)
    with pytest.raises(ValueError):
        ApiTlsConfig(certificate=Path("c.pem"))
    assert ApiConfig().host == "127.0.0.1"


def test_cli_jobs_on_the_spool_and_through_the_api(tmp_path):
    import yaml

    gw = Gateway(tmp_path)
    try:
        config = tmp_path / "gateway.yaml"
        runner = CliRunner()
        listed = runner.invoke(
            serve,
            [
                "jobs",
                "list",
                "--config",
                str(config),
                "--state",
                "failed",
                "--json",
                "--via",
                "spool",
            ],
        )
        assert listed.exit_code == 0, listed.output
        assert [j["id"] for j in json.loads(listed.output)["items"]] == [gw.ids["failed"]]
        # through the API: the running server (its port in the config)
        values = yaml.safe_load(config.read_text())
        values["api"]["port"] = gw.server.port
        config.write_text(yaml.safe_dump(values))
        retried = runner.invoke(
            serve,
            [
                "jobs",
                "retry",
                STUDIES["failed"],
                "--config",
                str(config),
                "--via",
                "api",
                "--reason",
                "re-sent",
            ],
        )
        assert retried.exit_code == 0, retried.output
        assert f"job {gw.ids['failed']}: queued" in retried.output
        assert gw.store.actions(gw.ids["failed"])[0].actor == "token (api)"
        again = runner.invoke(serve, ["jobs", "retry", STUDIES["failed"], "--config", str(config)])
        assert (
            again.exit_code == 1
            and "409" in again.output
            and "only failed and dead-letter" in again.output
        )
        shown = runner.invoke(
            serve, ["jobs", "show", str(gw.ids["dead"]), "--config", str(config), "--via", "spool"]
        )
        assert json.loads(shown.output)["deliveries"][0]["state"] == "dead-letter"
        cancelled = runner.invoke(
            serve,
            ["jobs", "cancel", str(gw.ids["waiting"]), "--config", str(config), "--via", "spool"],
        )
        assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
        assert gw.store.actions(gw.ids["waiting"])[0].actor.endswith("(cli)")
        missing = runner.invoke(
            serve, ["jobs", "show", "999", "--config", str(config), "--via", "spool"]
        )
        assert missing.exit_code == 1 and "no job 999" in missing.output
    finally:
        gw.close()

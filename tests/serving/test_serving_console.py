"""The operator console in a real browser, against a real gateway and a real PACS.

A ``medssl-serve`` process (the shipped detector, embedded runtime) sends its results to
Orthanc. It receives four synthetic chest CT studies whose PatientName and PatientID are
planted values:

* a good study while Orthanc is up: ``done``;
* a study with two slices missing from its series: ``failed``, the reason named;
* two studies while Orthanc is down: their deliveries exhaust their attempts, ``dead-letter``.

Then Orthanc is started again and Debian's chromium (playwright, nothing resolves beyond
127.0.0.1) signs in with HTTP basic credentials, sees the three states on the overview and the
studies page, retries one dead letter with the keyboard on the Retry button of the failures
page, and watches its study page turn ``done``; ``medssl-serve jobs retry <study>`` retries the
other the same way (through the API). Both SRs arrive in Orthanc. Requests without credentials
get 401, an action without the CSRF token 403, and no planted value appears in any page or API
response. With ``MEDSSL_CONSOLE_FIGURES=1`` the screenshots are written to ``docs/images/``.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

from medssl.testing.gateway import GatewayProcess, gateway_config
from medssl.testing.orthanc import OrthancServer, free_port
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, require_browser, require_tool
from tests.fuzz_corpus import PHI_ID, PHI_NAME, find_phi
from tests.paths import ROOT
from tests.serving.helpers import DETECTOR, storescu

pytestmark = [pytest.mark.integration, pytest.mark.orthanc, pytest.mark.browser]

REPOSITORY = ROOT / "model_repository"
USER, PASSWORD = "pacsadmin", "console-test-password"
FIGURES = ROOT / "docs" / "images"


def _studies(root: Path) -> list[list[Path]]:
    """Four synthetic chest CT studies (96² × 48 slices) with the planted name and ID; the
    second lacks two slices of its series."""
    subprocess.run(
        [
            f"{sys.prefix}/bin/medssl",
            "synth",
            "chest",
            "--cases",
            "4",
            "--format",
            "dicom",
            "--matrix",
            "96",
            "--slices",
            "48",
            "--seed",
            "21",
            str(root),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    by_study: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = PHI_NAME, PHI_ID
        ds.save_as(path)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(path)
    studies = list(by_study.values())
    assert len(studies) == 4
    broken = sorted(
        studies[1],
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    for path in broken[20:22]:
        path.unlink()
    studies[1] = [p for p in studies[1] if p.exists()]
    return studies


def _uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


class Api:
    """The gateway's operator API with credentials (or without, ``auth=None``)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        auth: bool = True,
        headers: dict | None = None,
    ) -> tuple[int, str]:
        h = {**({"Authorization": self.auth} if auth else {}), **(headers or {})}
        data = None
        if body is not None:
            data, h["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(self.base + path, data=data, headers=h, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def get(self, path: str) -> dict:
        status, body = self.call("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def wait_state(
        self,
        study_uid: str,
        states: tuple[str, ...],
        gateway: GatewayProcess,
        timeout_s: float = 240.0,
    ) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status, body = self.call("GET", f"/api/v1/studies/{study_uid}")
            if status == 200 and json.loads(body)["state"] in states:
                return json.loads(body)
            time.sleep(0.3)
        raise AssertionError(
            f"study not {states} after {timeout_s} s: "
            f"{self.call('GET', f'/api/v1/studies/{study_uid}')}"
            f"\n{gateway.log_tail()}"
        )


def test_the_console_shows_failures_and_a_dead_letter_retried_in_the_browser_turns_done(tmp_path):
    require_browser()
    require_tool("Orthanc", "orthanc")
    from playwright.sync_api import sync_playwright

    studies = _studies(tmp_path / "chest")
    uids = [_uid(s) for s in studies]
    api_port = free_port()
    with OrthancServer(tmp_path / "orthanc") as pacs:
        routes = [
            {
                "model": DETECTOR,
                "min_probability": 0.5,
                "select": {"modality": "CT", "min_slices": 32, "body_part": ["CHEST"]},
            }
        ]
        cfg = gateway_config(
            tmp_path / "gw",
            routes,
            REPOSITORY,
            [
                {
                    "name": "orthanc",
                    "ae_title": pacs.aet,
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                    "timeout_s": 3,
                }
            ],
            spool={"study_idle_s": 1.0},
            delivery={"max_attempts": 2, "backoff_initial_s": 0.5, "backoff_max_s": 1.0},
            api={"enabled": True, "host": "127.0.0.1", "port": api_port, "username": USER},
        )
        gateway = GatewayProcess(
            tmp_path / "gw", cfg, env={"MEDSSL_GATEWAY__API__PASSWORD": PASSWORD}
        )
        gateway.start()
        api = Api(f"http://127.0.0.1:{api_port}")
        try:
            storescu(gateway, studies[0])
            assert api.wait_state(uids[0], ("done",), gateway)["state"] == "done"
            storescu(gateway, studies[1])
            failed = api.wait_state(uids[1], ("failed", "dead-letter", "done"), gateway)
            assert failed["state"] == "failed" and "missing" in failed["error"], failed
            pacs.stop()
            storescu(gateway, studies[2])
            storescu(gateway, studies[3])
            for uid in uids[2:]:
                dead = api.wait_state(uid, ("dead-letter", "done", "failed"), gateway)
                assert (
                    dead["state"] == "dead-letter"
                    and dead["deliveries"][0]["state"] == "dead-letter"
                ), dead
            pacs.start()

            # -- security: no credentials, no CSRF token ------------------------------------
            for path in ("/", "/studies", "/api/v1/studies", f"/api/v1/studies/{uids[2]}"):
                assert api.call("GET", path, auth=False)[0] == 401, path
            assert api.call("POST", f"/api/v1/studies/{uids[2]}/retry", {}, auth=False)[0] == 401
            assert (
                api.call("POST", f"/api/v1/studies/{uids[2]}/retry", {})[0] == 403
            )  # no CSRF token
            assert api.get(f"/api/v1/studies/{uids[2]}")["state"] == "dead-letter"

            pages: dict[str, str] = {}
            shots: dict[str, bytes] = {}
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    context = browser.new_context(
                        viewport={"width": 1280, "height": 900},
                        http_credentials={"username": USER, "password": PASSWORD},
                    )
                    page = context.new_page()
                    page.set_default_timeout(20_000)
                    remote: list[str] = []
                    page.on(
                        "requestfinished",
                        lambda r: None if r.url.startswith(api.base) else remote.append(r.url),
                    )
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))

                    page.goto(api.base + "/")
                    failures = page.get_by_role("region", name="Failures in the last 24 h (3)")
                    assert failures.get_by_text("failed", exact=True).count() == 1
                    assert failures.get_by_text("dead-letter", exact=True).count() == 2
                    assert page.locator("[data-counter=done]").inner_text() == "1"
                    pages["overview"], shots["overview"] = (
                        page.content(),
                        page.screenshot(full_page=True),
                    )

                    page.goto(api.base + "/studies")
                    table = page.get_by_role("region", name="Studies (4)")
                    for state, n in (("done", 1), ("failed", 1), ("dead-letter", 2)):
                        assert table.locator(f".state-{state}").count() == n, state
                    pages["studies"], shots["studies"] = (
                        page.content(),
                        page.screenshot(full_page=True),
                    )

                    failed_id = api.get(f"/api/v1/studies/{uids[1]}")["id"]
                    page.goto(f"{api.base}/studies/{failed_id}")
                    assert (
                        "missing" in page.get_by_role("region", name="Routed series").inner_text()
                    )
                    pages["failed"], shots["failed"] = (
                        page.content(),
                        page.screenshot(full_page=True),
                    )

                    # retry the first dead letter by keyboard: focus its button, press Enter
                    dead_id = api.get(f"/api/v1/studies/{uids[2]}")["id"]
                    page.goto(api.base + "/failures")
                    pages["failures"], shots["failures"] = (
                        page.content(),
                        page.screenshot(full_page=True),
                    )
                    button = page.locator(f'button[data-action="retry"][data-job="{dead_id}"]')
                    button.focus()
                    with page.expect_navigation():
                        page.keyboard.press("Enter")
                    assert page.url.endswith("/failures")
                    page.goto(f"{api.base}/studies/{dead_id}")
                    deadline = time.monotonic() + 120
                    while page.locator(".facts .state").inner_text() != "done":
                        assert time.monotonic() < deadline, (
                            f"not done: {api.get(f'/api/v1/studies/{dead_id}')}"
                        )
                        time.sleep(1)
                        page.reload()
                    assert (
                        "retry" in page.get_by_role("region", name="Operator actions").inner_text()
                    )
                    assert (
                        f"{USER} (console)"
                        in page.get_by_role("region", name="Operator actions").inner_text()
                    )
                    pages["done"], shots["done"] = page.content(), page.screenshot(full_page=True)

                    for path, name in (
                        ("/deliveries", "deliveries"),
                        ("/quarantine", "quarantine"),
                        ("/refused", "refused"),
                        ("/config", "config"),
                    ):
                        page.goto(api.base + path)
                        pages[name] = page.content()
                    # a narrow window: nothing wider than the window but the tables' own boxes
                    page.set_viewport_size({"width": 380, "height": 800})
                    page.goto(api.base + "/studies")
                    assert page.evaluate(
                        "document.documentElement.scrollWidth <= window.innerWidth + 1"
                    )
                    shots["narrow"] = page.screenshot(full_page=True)
                    assert remote == [] and errors == [], (remote, errors)
                finally:
                    browser.close()

            # -- the CLI retries the other dead letter, through the running gateway's API -------
            retried = subprocess.run(
                [
                    f"{sys.prefix}/bin/medssl-serve",
                    "jobs",
                    "retry",
                    uids[3],
                    "--config",
                    str(gateway.path),
                    "--reason",
                    "PACS back",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={**os.environ, "MEDSSL_GATEWAY__API__PASSWORD": PASSWORD},
            )
            assert retried.returncode == 0, retried.stdout + retried.stderr
            assert "sending" in retried.stdout or "done" in retried.stdout
            cli_job = api.wait_state(uids[3], ("done",), gateway)
            assert (
                cli_job["actions"][0]["actor"] == f"{USER} (api)"
                and cli_job["actions"][0]["reason"] == "PACS back"
            )
            for uid in uids[2:]:  # both SRs are in the PACS now
                assert pacs.instances_of(uid, "SR"), uid

            # -- nothing identifying anywhere -------------------------------------------------
            responses = [
                api.call("GET", p)[1]
                for p in (
                    "/api/v1/studies",
                    "/api/v1/overview",
                    "/api/v1/deliveries",
                    "/api/v1/quarantine",
                    "/api/v1/refusals",
                    "/api/v1/actions",
                    "/api/v1/config",
                    "/api/v1/counters",
                )
            ]
            responses += [api.call("GET", f"/api/v1/studies/{uid}")[1] for uid in uids]
            leaks = {
                where: find_phi(text)
                for where, text in [*pages.items(), *enumerate(responses)]
                if find_phi(text)
            }
            assert not leaks, leaks
        finally:
            gateway.stop()
    if os.environ.get("MEDSSL_CONSOLE_FIGURES"):
        FIGURES.mkdir(parents=True, exist_ok=True)
        for name, png in shots.items():
            (FIGURES / f"console-{name}.png").write_bytes(png)

"""``medssl-serve``: the DICOM gateway (C-STORE in, DICOM SEG / TID 1500 SR out)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click
import yaml

from medssl.cli.errors import MedsslGroup
from medssl.config import parse_overrides

__all__ = ["serve"]

_CONFIG_ENV = "MEDSSL_GATEWAY_CONFIG"


@click.group(cls=MedsslGroup, invoke_without_command=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Gateway YAML config (see examples/gateway.yaml). Required to run the gateway.",
)
@click.option(
    "--triton-url",
    default=None,
    help="Run the models on this Triton server (host:port) [default: models.triton_url; "
    "none: embedded onnxruntime].",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set scp.port=11113 (repeatable; wins over the "
    "file and MEDSSL_GATEWAY__* environment variables).",
)
@click.option("--check", is_flag=True, help="Validate the config and load the models, then exit.")
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the effective config (file + environment + --set) and exit.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    config_path: Path | None,
    triton_url: str | None,
    overrides: tuple[str, ...],
    check: bool,
    print_config: bool,
) -> None:
    """Run the DICOM gateway until SIGTERM / Ctrl-C (``medssl-serve --config gateway.yaml``);
    ``medssl-serve jobs ...`` looks after its jobs.

    A PACS sends CT studies by C-STORE to the gateway's AE title; every instance is made
    durable in the spool before it is acknowledged. A study is complete after
    spool.study_idle_s without new instances; the routed models run on the series their
    rules select, and the results (SR for detectors, SEG for segmenters) are sent to every
    destination, retried with backoff until they are stored. Metrics: /metrics, health:
    /healthz and /readyz on the http port; the operator API and console (api.enabled) on
    the api port.
    """
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("Missing option '--config' (the gateway's YAML config).")
    from medssl.serving.config import load_gateway_config
    from medssl.serving.logs import capture_stray_output, configure_logging

    values = parse_overrides(overrides)
    if triton_url is not None:
        values["models.triton_url"] = triton_url
    cfg = load_gateway_config(config_path, values)
    if print_config:
        click.echo(yaml.safe_dump(cfg.to_dict(mask_secrets=True), sort_keys=False))
        return
    if check:
        from medssl.serving.process import ModelSet

        m = cfg.models
        models = ModelSet(
            m.repository,
            cfg.routes,
            triton_url=m.triton_url,
            protocol=m.protocol,
            providers=m.providers,
            batch_size=m.batch_size,
            runtime=m.runtime,
        )
        models.close()
        click.echo(f"{config_path}: valid; models loaded: {', '.join(r.model for r in cfg.routes)}")
        return
    # every line on stderr is a JSON log record: what libraries print or warn is withheld
    configure_logging(cfg.log_level, stream=capture_stray_output())
    from medssl.serving.gateway import Gateway

    gateway = Gateway(cfg)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=gateway.stop, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gateway.run()
    sys.exit(0)


# --- medssl-serve jobs ------------------------------------------------------------------------

_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=_CONFIG_ENV,
    required=True,
    help=f"The gateway's YAML config [env {_CONFIG_ENV}].",
)
_via_option = click.option(
    "--via",
    type=click.Choice(["auto", "api", "spool"]),
    default="auto",
    show_default=True,
    help="auto: the running gateway's API when it answers, else the spool directly.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def _open(config_path: Path, via: str):  # returns a serving.client.Jobs
    from medssl.serving.client import open_jobs
    from medssl.serving.config import load_gateway_config

    return open_jobs(load_gateway_config(config_path), via)


def _echo_job(job: dict, as_json: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps(job, indent=1))
        return
    click.echo(
        f"job {job['id']}: {job['state']} (attempts {job['attempts']})  study {job['study_uid']}"
    )
    if job.get("error"):
        click.echo(f"  {job['error']}")


@serve.group(cls=MedsslGroup)
def jobs() -> None:
    """List, inspect, retry, re-deliver or cancel the gateway's jobs: through its operator
    API when it runs with one, else on its spool directly. A job is named by its id or its
    study's StudyInstanceUID (the newest job of the study)."""


@jobs.command("list")
@_config_option
@_via_option
@_json_option
@click.option("--state", "states", multiple=True, help="Keep jobs in this state (repeatable).")
@click.option("--since", default=None, help="Received at or after (ISO 8601 or epoch seconds).")
@click.option("--until", default=None, help="Received before (ISO 8601 or epoch seconds).")
@click.option(
    "--uid",
    default=None,
    help="A StudyInstanceUID, SeriesInstanceUID, result UID or accession number.",
)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
def jobs_list(
    config_path: Path,
    via: str,
    as_json: bool,
    states: tuple[str, ...],
    since: str | None,
    until: str | None,
    uid: str | None,
    limit: int,
    offset: int,
) -> None:
    """Jobs newest first."""
    import json

    from medssl.serving.httpquery import time_param

    client = _open(config_path, via)
    try:
        page = client.studies(
            states=list(states),
            since=time_param({"since": [since]} if since else {}, "since"),
            until=time_param({"until": [until]} if until else {}, "until"),
            uid=uid,
            limit=limit,
            offset=offset,
        )
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(page, indent=1))
        return
    click.echo(
        f"{page['total']} jobs ({client.where}); showing {len(page['items'])} from {page['offset']}"
    )
    for j in page["items"]:
        error = (j["error"] or "")[:80]
        click.echo(
            f"{j['id']:>6}  {j['state']:<11}  "
            f"{j['received_at'] or '':<20}  {j['study_uid']}  {error}"
        )


@jobs.command("show")
@_config_option
@_via_option
@click.argument("job")
def jobs_show(config_path: Path, via: str, job: str) -> None:
    """One job in full (JSON): stages, routed series, results, deliveries, actions."""
    import json

    client = _open(config_path, via)
    try:
        click.echo(json.dumps(client.study(job), indent=1))
    finally:
        client.close()


@jobs.command("retry")
@_config_option
@_via_option
@_json_option
@click.option("--reason", default=None, help="Why (recorded with the action).")
@click.argument("job")
def jobs_retry(config_path: Path, via: str, as_json: bool, reason: str | None, job: str) -> None:
    """Retry a failed or dead-lettered job (the console's Retry button)."""
    client = _open(config_path, via)
    try:
        _echo_job(client.retry(job, reason), as_json)
    finally:
        client.close()


@jobs.command("redeliver")
@_config_option
@_via_option
@_json_option
@click.option(
    "--to", "destination", required=True, help="The destination's name (config destinations)."
)
@click.option("--reason", default=None, help="Why (recorded with the action).")
@click.argument("job")
def jobs_redeliver(
    config_path: Path, via: str, as_json: bool, destination: str, reason: str | None, job: str
) -> None:
    """Send a done job's results to a destination again."""
    client = _open(config_path, via)
    try:
        _echo_job(client.redeliver(job, destination, reason), as_json)
    finally:
        client.close()


@jobs.command("cancel")
@_config_option
@_via_option
@_json_option
@click.option("--reason", default=None, help="Why (recorded with the action).")
@click.argument("job")
def jobs_cancel(config_path: Path, via: str, as_json: bool, reason: str | None, job: str) -> None:
    """Cancel a received or queued job."""
    client = _open(config_path, via)
    try:
        _echo_job(client.cancel(job, reason), as_json)
    finally:
        client.close()

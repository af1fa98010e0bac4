"""``medssl-serve``: the DICOM gateway (C-STORE in, DICOM SEG / TID 1500 SR out)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click
import yaml

from medssl.cli.errors import MedsslCommand
from medssl.config import parse_overrides

__all__ = ["serve"]


@click.command(cls=MedsslCommand)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Gateway YAML config (see examples/gateway.yaml).")
@click.option("--triton-url", default=None,
              help="Run the models on this Triton server (host:port) [default: models.triton_url; "
                   "none: embedded onnxruntime].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set scp.port=11113 (repeatable; wins over the "
                   "file and MEDSSL_GATEWAY__* environment variables).")
@click.option("--check", is_flag=True, help="Validate the config and load the models, then exit.")
@click.option("--print-config", is_flag=True, help="Print the effective config (file + environment + --set) and exit.")
def serve(config_path: Path, triton_url: str | None, overrides: tuple[str, ...], check: bool,
          print_config: bool) -> None:
    """Run the DICOM gateway until SIGTERM / Ctrl-C.

    A PACS sends CT studies by C-STORE to the gateway's AE title; every instance is made
    durable in the spool before it is acknowledged. A study is complete after
    spool.study_idle_s without new instances; the routed models run on the series their
    rules select, and the results (SR for detectors, SEG for segmenters) are sent to every
    destination, retried with backoff until they are stored. Metrics: /metrics, health:
    /healthz and /readyz on the http port.
    """
    from medssl.serving.config import load_gateway_config
    from medssl.serving.logs import capture_stray_output, configure_logging

    values = parse_overrides(overrides)
    if triton_url is not None:
        values["models.triton_url"] = triton_url
    cfg = load_gateway_config(config_path, values)
    if print_config:
        click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return
    if check:
        from medssl.serving.process import ModelSet

        m = cfg.models
        models = ModelSet(m.repository, cfg.routes, triton_url=m.triton_url, protocol=m.protocol,
                          providers=m.providers, batch_size=m.batch_size, runtime=m.runtime)
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

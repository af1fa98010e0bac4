"""``medssl-export``: checkpoints into a Triton model repository, and repository checks.

medssl-export CHECKPOINT --repository model_repository/ --name NAME [options]
medssl-export check model_repository/ [more repositories...]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from medssl.cli.errors import MedsslGroup
from medssl.errors import ConfigError

__all__ = ["export"]


class _ExportGroup(MedsslGroup):
    """``medssl-export CHECKPOINT ...`` runs the ``model`` command; ``medssl-export check ...``
    checks."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["model", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ExportGroup)
def export() -> None:
    """Export medssl checkpoints to ONNX (and TensorRT) in a Triton model repository.

    \b
    medssl-export CHECKPOINT --repository model_repository/ --name NAME   export one model
    medssl-export check model_repository/                                 check a repository
    """


@export.command("model")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--repository",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Triton model repository to write into (created if absent).",
)
@click.option("--name", required=True, help="Model name: the folder under the repository.")
@click.option(
    "--version", type=int, default=None, help="Version folder to write [default: next free]."
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16"]),
    default="fp32",
    show_default=True,
    help="Weights and arithmetic of the ONNX graph (inputs/outputs stay fp32).",
)
@click.option("--max-batch", type=int, default=8, show_default=True, help="Triton max_batch_size.")
@click.option(
    "--instances", type=int, default=1, show_default=True, help="Model instances per device."
)
@click.option(
    "--kind",
    type=click.Choice(["gpu", "cpu"]),
    default="gpu",
    show_default=True,
    help="Triton instance_group kind.",
)
@click.option(
    "--warmup/--no-warmup",
    default=False,
    show_default=True,
    help="Add a model_warmup request to config.pbtxt.",
)
@click.option(
    "--trt-accelerator/--no-trt-accelerator",
    default=False,
    show_default=True,
    help="Ask Triton's onnxruntime backend for its TensorRT accelerator (FP16, GPU kind).",
)
@click.option(
    "--tensorrt", is_flag=True, help="Also build a TensorRT model.plan (needs a CUDA GPU)."
)
@click.option("--intended-use", default=None, help="The card's intended-use statement.")
@click.option(
    "--select",
    "select_rules",
    default=None,
    help="The series the model is for, as medssl-score --select rules (key=value pairs or a "
    "YAML/JSON file), e.g. min_slices=16,max_thickness_mm=5 for a segmenter trained on "
    "2.5-5 mm slices. Written to the card's 'selection'; medssl-score starts from it "
    "[default: none, the defaults: thin-slice axial CT].",
)
@click.option(
    "--op-rule",
    type=click.Choice(["fp_per_scan", "sensitivity"]),
    default="fp_per_scan",
    show_default=True,
    help="Detectors: how the card's operating point is chosen on the run's validation scans "
    "(the exported model in onnxruntime): the lowest threshold with at most --op-target FP "
    "per scan, or the highest one reaching sensitivity --op-target.",
)
@click.option(
    "--op-target",
    type=float,
    default=None,
    help="The rule's target [default: 1.0 FP per scan; required with --op-rule sensitivity].",
)
@click.option(
    "--op-data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Detectors: choose the operating point on every scan of this LUNA16 folder instead of the "
    "run's validation scans: scans of the geometry the model will score (whole chests, where "
    "the run validated on what it trained on), never the test set.",
)
@click.option(
    "--operating-point-from-run",
    "op_from_run",
    is_flag=True,
    help="Detectors: take the operating point medssl-train "
    "chose (RUN/validation/operating_point.json) instead of "
    "measuring it again (when the training data is gone).",
)
@click.option(
    "--no-operating-point",
    "no_op",
    is_flag=True,
    help="Detectors: write a card without an operating "
    "point (scoring reports from 0.5, with a warning).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def export_model(
    checkpoint: Path,
    repository: Path,
    name: str,
    version: int | None,
    precision: str,
    max_batch: int,
    instances: int,
    kind: str,
    warmup: bool,
    trt_accelerator: bool,
    tensorrt: bool,
    intended_use: str | None,
    select_rules: str | None,
    op_rule: str,
    op_target: float | None,
    op_data: Path | None,
    op_from_run: bool,
    no_op: bool,
    as_json: bool,
) -> None:
    """Export CHECKPOINT (a .pt file or a medssl-train run folder) as model NAME.

    A detector's card gets an operating point: the threshold chosen on the run's validation
    scans (split.json, and the data folder of the checkpoint's provenance) with the exported
    model; DICOM outputs of medssl-score and the gateway hold the findings at or above it.
    """
    from medssl.export import ExportOptions, export_checkpoint  # torch loads here, not for `check`
    from medssl.models.triton_config import ServingOptions

    try:
        serving = ServingOptions(
            instances=instances, kind=kind, warmup=warmup, tensorrt_accelerator=trt_accelerator
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if op_from_run and no_op:
        raise click.UsageError(
            "--operating-point-from-run and --no-operating-point exclude each other"
        )
    if (op_from_run or no_op) and (
        op_target is not None or op_rule != "fp_per_scan" or op_data is not None
    ):
        raise click.UsageError(
            "--op-rule/--op-target/--op-data choose a new operating point: they do not go with "
            "--operating-point-from-run or --no-operating-point"
        )
    if op_rule == "sensitivity" and op_target is None:
        raise click.UsageError(
            "--op-rule sensitivity needs --op-target, the sensitivity to reach (e.g. 0.9)"
        )
    from medssl.scoring.select import parse_rules, rules_to_mapping

    extra: dict[str, Any] = {"intended_use": intended_use} if intended_use else {}
    if select_rules:
        try:
            extra["selection"] = rules_to_mapping(parse_rules(select_rules))
        except ConfigError as exc:
            raise click.UsageError(f"--select: {exc}") from None
    options = ExportOptions(
        version=version,
        precision=precision,
        max_batch_size=max_batch,  # type: ignore[arg-type]
        serving=serving,
        tensorrt=tensorrt,
        operating_point="run" if op_from_run else "none" if no_op else "validation",
        op_rule=op_rule,
        op_target=1.0 if op_target is None else op_target,
        op_data=op_data,
        **extra,
    )
    result = export_checkpoint(checkpoint, repository, name, options)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "model_dir": str(result.model_dir),
                    "version": result.version,
                    "onnx": str(result.onnx_path),
                    "parity": result.parity.to_json(),
                    "operating_point": result.card.operating_point.to_json()
                    if result.card.operating_point
                    else None,
                    "tensorrt_dir": str(result.tensorrt_dir) if result.tensorrt_dir else None,
                    "tensorrt_parity": result.tensorrt_parity.to_json()
                    if result.tensorrt_parity
                    else None,
                },
                indent=2,
            )
        )
    else:
        click.echo(result.summary())


@export.command("check")
@click.argument("repositories", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per model.")
def check(repositories: tuple[Path, ...], as_json: bool) -> None:
    """Validate every model of each REPOSITORY: configs, cards, ONNX files. Exit 1 on any
    problem."""
    from medssl.models.repository import check_repository

    reports = [report for repository in repositories for report in check_repository(repository)]
    if as_json:
        click.echo(json.dumps([r.to_json() for r in reports], indent=2))
    else:
        for report in reports:
            state = "ok" if report.ok else f"{len(report.problems)} problem(s)"
            click.echo(f"{report.name}: versions {report.versions or 'none'}: {state}")
            for problem in report.problems:
                click.echo(f"  problem: {problem}")
            for note in report.notes:
                click.echo(f"  note: {note}")
    if not all(r.ok for r in reports):
        raise SystemExit(1)

"""``medssl-export``: a checkpoint becomes a versioned, parity-checked model in a Triton repository.

Steps, for ``export_checkpoint(ckpt, repo, name)``:

1. read the checkpoint and build its graph (:mod:`medssl.export.models`);
2. export ONNX (opset 18, dynamic batch, decoding in the graph), optionally fp16;
3. compare onnxruntime (CPU) with PyTorch on random patches and a synthetic CT patch; a
   parity failure stops the export;
4. optionally build a TensorRT ``model.plan`` (its own model ``<name>_trt``) with its own check;
5. a detector: its decoding takes the run's validation calibration, and the card's operating
   point is chosen with the exported graph on the run's validation scans
   (:mod:`medssl.export.operating`), or taken from the run, or left out;
6. write the version folder (staged, then renamed into place: a crash leaves no half
   version), the card ``medssl.json`` (also in the version folder) and ``config.pbtxt``,
   which is parsed back into Triton's ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import torch

from medssl.atomic import fsync_dir
from medssl.errors import ExportError
from medssl.metrics.operating_point import check_rule
from medssl.models.card import CARD_FILE, ModelCard, Task
from medssl.models.repository import next_version
from medssl.models.triton_config import Backend, ServingOptions, model_config, write_config
from medssl.training.checkpoint import load_checkpoint

from . import tensorrt as trt_export
from .models import Exportable, exportable
from .onnx_export import OPSET, convert_fp16, export_onnx
from .operating import (
    operating_point_from_run,
    operating_point_on_validation,
    run_calibration,
    validation_inputs,
)
from .parity import ParityReport, compare

__all__ = ["ExportOptions", "ExportResult", "export_checkpoint", "resolve_checkpoint"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STAGING = re.compile(r"staging-\d+-(\d+)")  # .staging-<version>-<pid>[.fp32.onnx]
DEFAULT_INTENDED_USE = (
    "Research use only; not for clinical use. Validate on your own data "
    "before drawing any conclusion from its output."
)


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    Attributes:
        version: version folder to write; None picks the next free one.
        precision: ``fp32``, or ``fp16`` weights and arithmetic (inputs/outputs stay fp32).
        max_batch_size: largest batch Triton may send (the graph's batch axis is dynamic).
        serving: instances, batching, warmup and accelerator settings of ``config.pbtxt``.
        tensorrt: also build a TensorRT engine (needs a CUDA GPU and the tensorrt package).
        intended_use: the card's statement of what the model is for.
        parity_seed: seed of the random parity patches and the synthetic scan.
        operating_point: detectors: ``"validation"`` (default) chooses the card's operating
            point with the exported graph on the run's validation scans
            (:func:`~medssl.export.operating.operating_point_on_validation`); ``"run"`` takes
            the one medssl-train chose (``<run>/validation/operating_point.json``);
            ``"none"`` writes a card without one (scoring reports from 0.5, with a warning).
            Ignored for segmenters.
        op_rule: ``"fp_per_scan"`` or ``"sensitivity"``
            (:class:`~medssl.metrics.operating_point.OperatingRule`), with ``"validation"``.
        op_target: the rule's target: FP per scan (default 1.0) or a sensitivity in (0, 1].
        op_data: with ``"validation"``, a LUNA16 folder whose every scan validates the operating
            point instead of the run's validation split: scans of the geometry the model will
            score (:func:`~medssl.export.operating.operating_point_on_validation`).
        selection: the card's ``selection``: the series the model is for, as selection rules
            that differ from the defaults (:func:`medssl.scoring.select.rules_to_mapping`).
    """

    version: int | None = None
    precision: Literal["fp32", "fp16"] = "fp32"
    max_batch_size: int = 8
    serving: ServingOptions = field(default_factory=ServingOptions)
    tensorrt: bool = False
    intended_use: str = DEFAULT_INTENDED_USE
    parity_seed: int = 0
    operating_point: Literal["validation", "run", "none"] = "validation"
    op_rule: str = "fp_per_scan"
    op_target: float = 1.0
    op_data: Path | None = None
    selection: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.operating_point not in ("validation", "run", "none"):
            raise ExportError(
                "operating_point must be 'validation', 'run' or 'none', "
                f"got {self.operating_point!r}"
            )
        try:
            check_rule(self.op_rule, self.op_target)
        except ValueError as exc:
            raise ExportError(f"operating point: {exc}") from None
        if self.op_data is not None and self.operating_point != "validation":
            raise ExportError(
                "op_data chooses a new operating point: it needs operating_point='validation'"
            )
        if self.precision not in ("fp32", "fp16"):
            raise ExportError(f"precision must be 'fp32' or 'fp16', got {self.precision!r}")
        if self.max_batch_size < 1:
            raise ExportError(f"max batch size must be >= 1, got {self.max_batch_size}")
        if self.version is not None and self.version < 1:
            raise ExportError(f"version must be >= 1, got {self.version}")


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        repository: the model repository.
        model_dir: ``repository/<name>``.
        version: the version written.
        onnx_path: ``model_dir/<version>/model.onnx``.
        card: the model card written.
        parity: onnxruntime vs PyTorch.
        tensorrt_dir: the TensorRT model's folder, when built.
        tensorrt_parity: TensorRT vs PyTorch, when built.
    """

    repository: Path
    model_dir: Path
    version: int
    onnx_path: Path
    card: ModelCard
    parity: ParityReport
    tensorrt_dir: Path | None = None
    tensorrt_parity: ParityReport | None = None

    def summary(self) -> str:
        lines = [
            f"exported {self.card.name} version {self.version} → {self.onnx_path}",
            f"parity: {self.parity.summary()}",
        ]
        if self.card.task is Task.DETECTION:
            op = self.card.operating_point
            lines.append(
                f"operating point: {op.describe()}"
                if op
                else "operating point: none (scoring reports from 0.5, with a warning)"
            )
        if self.tensorrt_parity is not None:
            lines += [
                f"TensorRT model: {self.tensorrt_dir}",
                f"parity: {self.tensorrt_parity.summary()}",
            ]
        return "\n".join(lines)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's ``checkpoints/best.pt`` (else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt"):
            if candidate.is_file():
                return candidate
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _code_version() -> dict[str, Any]:
    """medssl's version, and the git commit when running from a checkout."""
    version: dict[str, Any] = {"medssl": importlib.metadata.version("medssl")}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        version["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        version["git_commit"] = None  # an installed wheel: the package version is the record
    return version


def _test_metrics(checkpoint: Path) -> dict[str, Any]:
    """``{"test_metrics": ...}`` from the run folder's test report (medssl-train writes it after
    the run: ``test/cpm.json`` for detectors, ``test/metrics.json`` for segmenters), when the
    checkpoint sits in ``<run>/checkpoints/``; else ``{}``."""
    if checkpoint.parent.name != "checkpoints":
        return {}
    test = checkpoint.parent.parent / "test"
    if (test / "cpm.json").is_file():
        report = test / "cpm.json"
        data = json.loads(report.read_text(encoding="utf-8"))
        keys = ("cpm", "cpm_ci", "fp_rates", "sensitivities", "n_scans", "n_nodules")
        return {
            "test_metrics": {
                "source": str(report.resolve()),
                **{k: data[k] for k in keys if k in data},
            }
        }
    if (test / "metrics.json").is_file():
        report = test / "metrics.json"
        data = json.loads(report.read_text(encoding="utf-8"))
        return {
            "test_metrics": {
                "source": str(report.resolve()),
                "n_cases": data.get("n_cases"),
                "mean": data.get("mean"),
                "classes": data.get("classes"),
            }
        }
    return {}


def _parity_inputs(ex: Exportable, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = ex.input.shape
    return {
        f"random normal, batch 2, {shape}": rng.standard_normal((2, *shape), dtype=np.float32),
        f"random uniform [-1, 1], batch 1, {shape}": rng.uniform(-1, 1, (1, *shape)).astype(
            np.float32
        ),
        f"{ex.sample_name}, batch 1": ex.synthetic_patch(seed),
    }


def _onnx_parity(
    ex: Exportable, onnx_path: Path, precision: str, inputs: dict[str, np.ndarray]
) -> ParityReport:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in ex.outputs]
    return compare(
        ex.module,
        lambda x: session.run(names, {ex.input.name: x}),
        inputs,
        names,
        "onnxruntime (CPUExecutionProvider)",
        precision,
    )


def _card(
    ex: Exportable, name: str, version: int, options: ExportOptions, provenance: dict[str, Any]
) -> ModelCard:
    return ModelCard(
        name=name,
        version=version,
        task=ex.task,
        input=ex.input,
        outputs=ex.outputs,
        max_batch_size=options.max_batch_size,
        input_spacing=ex.input_spacing,
        normalisation=ex.normalisation,
        overlap=ex.overlap,
        labels=ex.labels,
        decoding=ex.decoding,
        precision=options.precision,
        intended_use=options.intended_use,
        selection=options.selection,
        provenance=provenance,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_abandoned_staging(model_dir: Path) -> None:
    """Delete staging folders (and their fp32 copies) of exports whose process is gone:
    what a killed export leaves behind. Triton and :func:`check_model` ignore them anyway."""
    for leftover in model_dir.glob(".*staging-*"):
        owner = _STAGING.search(leftover.name)
        if owner and not _pid_alive(int(owner.group(1))):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _install(
    staging: Path,
    model_dir: Path,
    version: int,
    card: ModelCard,
    backend: Backend,
    serving: ServingOptions,
) -> Path:
    """Move a staged version folder into place, then write the card and config.pbtxt."""
    card.save(staging / CARD_FILE)
    target = model_dir / str(version)
    os.replace(staging, target)
    fsync_dir(model_dir)
    card.save(model_dir / CARD_FILE)
    write_config(model_config(card, backend, serving), model_dir)
    return target


def export_checkpoint(
    checkpoint: str | Path, repository: str | Path, name: str, options: ExportOptions | None = None
) -> ExportResult:
    """Export a medssl checkpoint into ``repository/<name>/<version>/``.

    Args:
        checkpoint: a ``.pt`` written by medssl-train, or a run folder.
        repository: the Triton model repository (created if absent).
        name: the model's name (letters, digits, ``_ . -``).
        options: see :class:`ExportOptions`.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable or its weights are broken.
        ExportError: unknown model type, a taken version, TensorRT asked for where it cannot
            run, or an exporter failure.
        ParityError: the exported model disagrees with PyTorch beyond the tolerance; nothing
            is written to the repository.
        ExportError: also, a detector's operating point cannot be chosen (no run folder,
            split or data; the target unreachable) or read from the run; nothing is written.
    """
    options = options or ExportOptions()
    if not _NAME.match(name):
        raise ExportError(f"model name {name!r} must be letters, digits, '_', '.' or '-'")
    if options.tensorrt and (reason := trt_export.unavailable_reason()):
        raise ExportError(f"--tensorrt: {reason}")
    path = resolve_checkpoint(checkpoint)
    ex = exportable(load_checkpoint(path), path)
    if (
        ex.task is Task.DETECTION
        and ex.decoding is not None
        and (calibration := run_calibration(path))
    ):
        ex = dataclasses.replace(
            ex, decoding=dataclasses.replace(ex.decoding, calibration=calibration)
        )
    run_point = None  # what the operating point needs is checked before anything is exported
    if ex.task is Task.DETECTION and options.operating_point == "run":
        run_point = operating_point_from_run(path)
    elif ex.task is Task.DETECTION and options.operating_point == "validation":
        validation_inputs(path, ex.provenance, options.op_data)
    repository = Path(repository)
    model_dir = repository / name
    version = options.version or next_version(model_dir)
    if (model_dir / str(version)).exists():
        raise ExportError(
            f"{model_dir / str(version)} already exists; omit --version to take the "
            f"next free one ({next_version(model_dir)})"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(model_dir)
    staging = model_dir / f".staging-{version}-{os.getpid()}"
    staging.mkdir()
    try:
        onnx_path = export_onnx(
            ex.module,
            torch.from_numpy(ex.synthetic_patch(options.parity_seed)),
            staging / "model.onnx",
            input_name=ex.input.name,
            output_names=[o.name for o in ex.outputs],
            max_batch_size=options.max_batch_size,
        )
        fp32_copy = staging.parent / f".{staging.name}.fp32.onnx"
        if options.tensorrt:
            shutil.copyfile(onnx_path, fp32_copy)  # TensorRT builds its own fp16 from fp32
        if options.precision == "fp16":
            convert_fp16(onnx_path)
        inputs = _parity_inputs(ex, options.parity_seed)
        parity = _onnx_parity(ex, onnx_path, options.precision, inputs)
        provenance = {
            **ex.provenance,
            **_test_metrics(path),
            "checkpoint": {"path": str(path.resolve()), "sha256": _sha256(path)},
            "code_version": _code_version(),
            "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "export": {
                "format": "onnx",
                "opset": OPSET,
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "precision": options.precision,
            },
            "parity": parity.to_json(),
        }
        card = _card(ex, name, version, options, provenance)
        if card.task is Task.DETECTION and options.operating_point == "validation":
            card = dataclasses.replace(
                card,
                operating_point=operating_point_on_validation(
                    onnx_path,
                    card,
                    path,
                    ex.provenance,
                    rule=options.op_rule,
                    target=options.op_target,
                    data=options.op_data,
                ),
            )
        elif card.task is Task.DETECTION:
            card = dataclasses.replace(card, operating_point=run_point)
        trt_dir, trt_parity = None, None
        if options.tensorrt:
            trt_dir, trt_parity = _export_tensorrt(ex, fp32_copy, repository, card, options, inputs)
            fp32_copy.unlink()
        target = _install(staging, model_dir, version, card, Backend.ONNXRUNTIME, options.serving)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for stray in model_dir.glob(f".{staging.name}.*"):
            stray.unlink()
    return ExportResult(
        repository, model_dir, version, target / "model.onnx", card, parity, trt_dir, trt_parity
    )


def _export_tensorrt(
    ex: Exportable,
    onnx_fp32: Path,
    repository: Path,
    card: ModelCard,
    options: ExportOptions,
    inputs: dict[str, np.ndarray],
) -> tuple[Path, ParityReport]:
    """Build ``<name>_trt/<version>/model.plan`` (platform tensorrt_plan) and check it."""
    name = f"{card.name}_trt"
    model_dir = repository / name
    version = next_version(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".staging-{version}-{os.getpid()}"
    staging.mkdir()
    try:
        plan = trt_export.build_engine(
            onnx_fp32,
            staging / "model.plan",
            input_name=ex.input.name,
            input_shape=ex.input.shape,
            max_batch_size=options.max_batch_size,
            fp16=options.precision == "fp16",
            workspace_bytes=options.serving.workspace_bytes,
        )
        runner = trt_export.TensorRTRunner(plan, ex.input.name, [o.name for o in ex.outputs])
        module = ex.module.cuda()
        parity = compare(
            _OnDevice(module),
            runner,
            inputs,
            [o.name for o in ex.outputs],
            "tensorrt",
            options.precision,
        )
        ex.module.cpu()
        trt_card = dataclasses.replace(
            card,
            name=name,
            version=version,
            provenance={
                **card.provenance,
                "parity": parity.to_json(),
                "export": {**card.provenance["export"], "format": "tensorrt_plan"},
            },
        )
        gpu = dataclasses.replace(options.serving, kind="gpu", tensorrt_accelerator=False)
        _install(staging, model_dir, version, trt_card, Backend.TENSORRT, gpu)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir, parity


class _OnDevice(torch.nn.Module):
    """Feed CPU tensors to a CUDA module and bring its outputs back (for :func:`compare`)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.float().cpu() for t in self.module(x.cuda()))

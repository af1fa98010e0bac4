"""medssl-export: checkpoints → ONNX with parity, model cards, Triton configs, repository checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medssl.cli.export import export
from medssl.errors import (
    CheckpointError,
    ExportError,
    ModelCardError,
    ModelRepositoryError,
    ParityError,
)
from medssl.export import ExportOptions, export_checkpoint
from medssl.export.parity import compare
from medssl.models import NODULE_LABEL, ModelCard, load_card
from medssl.models.card import Task
from medssl.models.repository import check_model, check_repository, next_version, versions
from medssl.models.triton_config import ServingOptions, model_config, read_config, write_config
from tests.paths import MODEL_REPOSITORY

pytestmark = [pytest.mark.slow]


@pytest.fixture
def repo_copy(tmp_path, exported_detector) -> Path:
    """A private copy of the exported repository, safe to break."""
    dest = tmp_path / "repo"
    shutil.copytree(exported_detector.repository, dest)
    return dest


def test_export_writes_a_repository_that_passes_the_check(exported_detector):
    result = exported_detector
    assert result.version == 1 and result.onnx_path == result.model_dir / "1" / "model.onnx"
    assert result.parity.passed and result.parity.max_abs < 1e-4
    assert len(result.parity.inputs) == 3 and "synthetic chest CT" in result.parity.inputs[-1]
    [report] = check_repository(result.repository)
    assert report.ok, report.problems
    assert report.versions == [1]


def test_the_card_holds_what_serving_needs(exported_detector):
    card = load_card(exported_detector.model_dir)
    assert card == load_card(exported_detector.model_dir / "1") == exported_detector.card
    assert card.task.value == "detection" and card.patch_size == (32, 32, 32)
    assert card.input_spacing == (1.0, 1.0, 1.0) and card.overlap == 0.25
    assert card.output_names == ("boxes", "scores") and card.outputs[0].shape == (4680, 4)
    params = card.detection_params(batch_size=3)
    assert params.window == (32, 32, 32) and params.divisor == 16 and params.batch_size == 3
    assert params.normalisation.hu_min == -1200 and params.nms_iou == 0.1
    assert card.labels == (NODULE_LABEL,)
    data = json.loads((exported_detector.model_dir / "medssl.json").read_text())
    [label] = data["labels"]
    assert label["type"] == {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
    assert label["anatomic_region"]["value"] == "39607008"
    prov = data["provenance"]
    assert prov["method"] == "focalmix" and prov["n_labeled"] == 10 and prov["n_unlabeled"] == 20
    assert prov["validation_metrics"] == {"cpm": 0.5} and prov["step"] == 500
    assert prov["parity"]["passed"] is True and prov["export"]["opset"] >= 17
    assert len(prov["checkpoint"]["sha256"]) == 64 and prov["code_version"]["medssl"]
    assert prov["exported_at"].endswith("+00:00")
    assert "not for clinical use" in data["intended_use"]


def test_config_pbtxt_parses_into_tritons_model_config(exported_detector):
    config = read_config(exported_detector.model_dir)
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 4
    assert [t.name for t in config.input] == ["patches"] and list(config.input[0].dims) == [
        1,
        32,
        32,
        32,
    ]
    assert [t.name for t in config.output] == ["boxes", "scores"]
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4]
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU


def test_optional_warmup_and_tensorrt_accelerator(tmp_path, exported_detector):
    options = ServingOptions(
        instances=2,
        warmup=True,
        tensorrt_accelerator=True,
        tensorrt_fp16=True,
        workspace_bytes=1 << 28,
        preferred_batch_sizes=(2, 4),
    )
    config = model_config(exported_detector.card, "onnxruntime", options)
    write_config(config, tmp_path)
    parsed = read_config(tmp_path)
    assert (
        parsed.instance_group[0].count == 2
        and parsed.instance_group[0].kind == parsed.instance_group[0].KIND_GPU
    )
    [accel] = parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    assert accel.parameters["max_workspace_size_bytes"] == str(1 << 28)
    [warmup] = parsed.model_warmup
    assert warmup.batch_size == 1 and warmup.inputs["patches"].random_data
    assert list(parsed.dynamic_batching.preferred_batch_size) == [2, 4]
    with pytest.raises(ValueError, match="GPU instances"):
        ServingOptions(kind="cpu", tensorrt_accelerator=True)
    with pytest.raises(ValueError, match="exceed max_batch_size"):
        model_config(
            exported_detector.card, "onnxruntime", ServingOptions(preferred_batch_sizes=(8,))
        )


def test_versions_count_up_and_a_taken_version_is_refused(tmp_path, detector_checkpoint):
    repo = tmp_path / "repo"
    options = ExportOptions(
        max_batch_size=2, serving=ServingOptions(kind="cpu"), operating_point="none"
    )
    first = export_checkpoint(detector_checkpoint, repo, "nodules", options)
    second = export_checkpoint(detector_checkpoint, repo, "nodules", options)
    assert (first.version, second.version) == (1, 2)
    assert versions(repo / "nodules") == [1, 2] and next_version(repo / "nodules") == 3
    assert (
        load_card(repo / "nodules").version == 2 and load_card(repo / "nodules" / "1").version == 1
    )
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(
            detector_checkpoint, repo, "nodules", ExportOptions(version=1, operating_point="none")
        )
    assert not list((repo / "nodules").glob(".staging*"))
    assert all(r.ok for r in check_repository(repo))


def test_fp16_export_meets_the_looser_tolerance(tmp_path, detector_checkpoint):
    result = export_checkpoint(
        detector_checkpoint,
        tmp_path,
        "nodules16",
        ExportOptions(precision="fp16", max_batch_size=2, operating_point="none"),
    )
    assert result.card.precision == "fp16" and result.parity.precision == "fp16"
    assert result.parity.passed and 1e-6 < result.parity.max_abs < 0.1  # it is really fp16
    assert result.parity.tolerance.rtol > 1e-4
    assert check_model(result.model_dir).ok


def test_parity_failure_raises_with_the_measured_error():
    module = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1)).eval()
    patches = np.random.default_rng(0).standard_normal((1, 1, 4, 4, 4), dtype=np.float32)

    def close(x):
        with torch.no_grad():
            return [module(torch.from_numpy(x)).numpy() + 1e-7]

    report = compare(module, close, {"random": patches}, ["y"], "test runtime", "fp32")
    assert report.passed and report.max_abs < 1e-6
    with pytest.raises(ParityError, match="parity check failed") as info:
        compare(
            module,
            lambda x: [close(x)[0] + 1e-2],
            {"random": patches},
            ["y"],
            "test runtime",
            "fp32",
        )
    assert info.value.report.max_abs == pytest.approx(1e-2, rel=1e-3)
    assert not info.value.report.passed


def test_a_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "nope.pt", tmp_path / "repo", "m")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        export_checkpoint(bad, tmp_path / "repo", "m")
    result = CliRunner().invoke(
        export, [str(tmp_path / "nope.pt"), "--repository", str(tmp_path / "r"), "--name", "m"]
    )
    assert result.exit_code == 1 and "does not exist" in result.output
    assert "Traceback" not in result.output


def test_an_unknown_model_type_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {}, "kind": "someone.else"}, path)
    with pytest.raises(ExportError, match="unknown model type 'someone.else'.*medssl.detector"):
        export_checkpoint(path, tmp_path / "repo", "m")
    torch.save({"model": {}}, path)
    with pytest.raises(ExportError, match="not a medssl checkpoint"):
        export_checkpoint(path, tmp_path / "repo", "m")
    assert not (tmp_path / "repo").exists()


def test_tensorrt_without_a_gpu_exits_with_a_message(tmp_path, detector_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(
        export,
        [
            str(detector_checkpoint),
            "--repository",
            str(tmp_path / "r"),
            "--name",
            "m",
            "--tensorrt",
        ],
    )
    assert (
        result.exit_code == 1
        and "no CUDA GPU" in result.output
        and "Traceback" not in result.output
    )
    assert not (tmp_path / "r").exists()


def test_check_reports_a_broken_config_per_model(repo_copy):
    (repo_copy / "nodules" / "config.pbtxt").write_text(
        'name: "nodules"\nplatfrm: "onnxruntime_onnx"\n'
    )
    [report] = check_repository(repo_copy)
    assert not report.ok and 'no field named "platfrm"' in report.problems[0]
    with pytest.raises(ModelRepositoryError, match="not a valid Triton ModelConfig"):
        read_config(repo_copy / "nodules")
    result = CliRunner().invoke(export, ["check", str(repo_copy)])
    assert result.exit_code == 1 and "nodules: versions [1]: 1 problem(s)" in result.output


def test_check_finds_disagreements_between_config_card_and_graph(repo_copy):
    model = repo_copy / "nodules"
    text = (model / "config.pbtxt").read_text().replace("dims: 4680", "dims: 4681", 1)
    (model / "config.pbtxt").write_text(text)
    card = json.loads((model / "1" / "medssl.json").read_text())
    card["outputs"][1]["shape"] = [99]
    (model / "1" / "medssl.json").write_text(json.dumps(card))
    shutil.copytree(model / "1", model / "2")
    (model / "2" / "model.onnx").write_bytes(b"garbage")
    problems = "\n".join(check_model(model).problems)
    assert "declares 'boxes' as ('FP32', (4681, 4))" in problems
    assert "'scores' axis 1 is 4680 in the graph, 99 in the card" in problems  # version 1's card
    assert "describes version 1, the newest is 2" in problems
    assert "onnxruntime cannot load it" in problems


def test_check_of_a_missing_repository_or_card(tmp_path, repo_copy):
    with pytest.raises(ModelRepositoryError, match="does not exist"):
        check_repository(tmp_path / "absent")
    (repo_copy / "nodules" / "medssl.json").unlink()
    [report] = check_repository(repo_copy)
    assert "no model card" in report.problems[0]


def test_card_errors_name_the_key(exported_detector, tmp_path):
    data = exported_detector.card.to_json()
    assert ModelCard.from_json(json.loads(json.dumps(data))) == exported_detector.card
    bad = json.loads(json.dumps(data))
    bad["decoding"]["nms_iuo"] = 0.2
    with pytest.raises(ValueError, match="'decoding'.*nms_iuo"):
        ModelCard.from_json(bad)
    bad = json.loads(json.dumps(data))
    bad["overlap"] = 1.5
    with pytest.raises(ValueError, match="overlap must be in"):
        ModelCard.from_json(bad)
    (tmp_path / "medssl.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="not readable JSON"):
        load_card(tmp_path)


def test_cli_exports_and_checks(tmp_path, detector_checkpoint):
    repo = tmp_path / "repo"
    exe = Path(sys.prefix) / "bin" / "medssl-export"
    run = subprocess.run(
        [
            str(exe),
            str(detector_checkpoint),
            "--repository",
            str(repo),
            "--name",
            "fm",
            "--kind",
            "cpu",
            "--max-batch",
            "2",
            "--warmup",
            "--no-operating-point",
            "--select",
            "min_slices=48,per_study=thinnest,max_thickness_mm=2.5",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["version"] == 1 and out["parity"]["passed"] and out["parity"]["max_rel"] < 1e-3
    # the series the model is for: only what differs from the defaults (2.5 mm is the default)
    card = json.loads((repo / "fm" / "1" / "medssl.json").read_text())
    assert card["selection"] == {"min_slices": 48, "per_study": "thinnest"}
    checked = subprocess.run([str(exe), "check", str(repo)], capture_output=True, text=True)
    assert checked.returncode == 0 and "fm: versions [1]: ok" in checked.stdout


def test_repository_check_does_not_import_torch(exported_detector):
    code = (
        "import sys; from medssl.models.repository import check_repository; "
        f"assert all(r.ok for r in check_repository({str(exported_detector.repository)!r})); "
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_shipped_repository_passes_the_check_and_says_it_is_synthetic():
    repository = MODEL_REPOSITORY
    reports = check_repository(repository)
    # every shipped model must pass (the detector and the organ segmenter).
    names = [r.name for r in reports]
    assert {"focalmix-nodules", "abdomen-organs"} <= set(names) and all(r.ok for r in reports)
    organs = load_card(repository / "abdomen-organs")
    assert organs.task is Task.SEGMENTATION and len(organs.labels) == 11
    for label in organs.labels:  # what a viewer needs to name and colour each segment
        assert label.category.scheme == label.type.scheme == "SCT" and label.colour is not None
    assert "synthetic" in organs.intended_use and "Not for clinical use" in organs.intended_use
    assert organs.selection == {"min_slices": 16, "max_thickness_mm": 5.0}
    assert organs.provenance["method"] == "supervised-seg"
    # its validation and test Dice, in the card
    assert 0.5 < organs.provenance["validation_metrics"]["dice"] <= 1.0
    assert 0.5 < organs.provenance["test_metrics"]["mean"]["dice"]["mean"] <= 1.0
    card = load_card(repository / "focalmix-nodules")
    assert "synthetic" in card.intended_use and "Not for clinical use" in card.intended_use
    assert card.provenance["method"] == "supervised-det" and card.provenance["n_labeled"] == 70
    # a detector's card carries the operating point chosen on validation, and the calibration
    assert card.operating_point is not None and card.operating_point.rule == "fp_per_scan"
    assert 0 < card.operating_point.threshold < 1 and card.operating_point.n_scans == 20
    assert card.detection_params().lung_mask and not card.detection_params().calibration.is_identity
    assert card.provenance["parity"]["passed"]


def test_a_run_folder_exports_its_best_checkpoint_with_the_test_report(
    tmp_path, detector_checkpoint
):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "test").mkdir()
    shutil.copy(detector_checkpoint, run / "checkpoints" / "best.pt")
    (run / "test" / "cpm.json").write_text(
        json.dumps({"cpm": 0.61, "cpm_ci": [0.4, 0.8], "n_scans": 8})
    )
    result = export_checkpoint(
        run, tmp_path / "repo", "nodules", ExportOptions(max_batch_size=2, operating_point="none")
    )
    assert result.card.provenance["checkpoint"]["path"] == str(
        (run / "checkpoints" / "best.pt").resolve()
    )
    assert result.card.provenance["test_metrics"]["cpm"] == 0.61
    assert result.card.provenance["test_metrics"]["n_scans"] == 8


def test_parity_is_relative_to_each_outputs_scale_and_nan_fails():
    module = torch.nn.Identity()
    patches = np.array([[3.4, 900.0]], dtype=np.float32)  # a box near the origin, a large one
    shifted = compare(
        module,
        lambda x: [x + np.array([2.5e-4, 0.0], dtype=np.float32)],
        {"boxes": patches},
        ["boxes"],
        "test runtime",
        "fp32",
    )
    assert shifted.passed and shifted.per_output["boxes"]["scale"] == pytest.approx(900.0)
    assert shifted.max_rel == pytest.approx(2.5e-4 / 900, rel=1e-2)
    with pytest.raises(ParityError):
        compare(
            module,
            lambda x: [np.where(x > 100, np.nan, x)],
            {"boxes": patches},
            ["boxes"],
            "test runtime",
            "fp32",
        )


def test_an_export_killed_mid_way_leaves_no_version_and_the_next_one_cleans_up(
    tmp_path, detector_checkpoint
):
    import os
    import signal
    import time

    repo = tmp_path / "repo"
    exe = Path(sys.prefix) / "bin" / "medssl-export"
    proc = subprocess.Popen(
        [
            str(exe),
            str(detector_checkpoint),
            "--repository",
            str(repo),
            "--name",
            "m",
            "--kind",
            "cpu",
            "--no-operating-point",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((repo / "m").glob(".staging-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((repo / "m").glob(".staging-*")), "the export never started staging"
    assert versions(repo / "m") == [] and not (repo / "m" / "config.pbtxt").exists()
    result = export_checkpoint(
        detector_checkpoint,
        repo,
        "m",
        ExportOptions(serving=ServingOptions(kind="cpu"), operating_point="none"),
    )
    assert result.version == 1 and not list((repo / "m").glob(".*staging*"))
    assert check_model(repo / "m").ok


def test_a_failed_parity_check_writes_nothing(tmp_path, detector_checkpoint, monkeypatch):
    import medssl.export.exporter as exporter

    def failing(*args, **kwargs):
        raise ParityError("parity check failed: injected", None)

    monkeypatch.setattr(exporter, "_onnx_parity", failing)
    with pytest.raises(ParityError, match="injected"):
        export_checkpoint(detector_checkpoint, tmp_path, "m", ExportOptions(operating_point="none"))
    assert list((tmp_path / "m").iterdir()) == []

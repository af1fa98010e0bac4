"""`medssl-train focalmix` / `supervised-det` end to end on a tiny synthetic LUNA16 folder.

The runs are a few steps of the CPU-sized network on 32^3 patches: they check the
machinery (splits, cache, checkpoints, resume, logs, submission, CPM report, errors),
not detection quality; that is benchmarks/focalmix_ssl.py's job.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from medssl.cli.train import (
    train,
)
from medssl.errors import ConfigError, MedsslError
from medssl.training.detection.trainer import train_detector
from medssl.training.loop import TrainingDivergedError
from medssl.training.methods import supervised_det as supervised_det_method
from tests.training.detection.helpers import TINY, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_supervised_run_writes_checkpoints_logs_submission_and_report(luna, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        train,
        [
            "supervised-det",
            "--config",
            "focalmix-cpu",
            "--data",
            str(luna),
            "--labeled",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
            *[a for s in TINY for a in ("--set", s)],
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["test"]["cpm"] == pytest.approx(
        json.loads((out / "test" / "cpm.json").read_text())["cpm"]
    )
    assert {p.name for p in (out / "checkpoints").iterdir()} >= {
        "best.pt",
        "last.pt",
        "step_00000002.pt",
        "step_00000004.pt",
        "index.json",
    }
    assert list((out / "tensorboard").iterdir()), "no TensorBoard event file"
    assert "val/cpm" in (out / "log.jsonl").read_text()
    with open(out / "test" / "submission.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    test_uids = (out / "test" / "seriesuids.csv").read_text().split()
    assert len(test_uids) == 1 and {r["seriesuid"] for r in rows} <= set(test_uids)
    report = json.loads((out / "test" / "cpm.json").read_text())
    assert len(report["sensitivities"]) == 7 and len(report["cpm_ci"]) == 2
    assert (out / "test" / "froc.png").stat().st_size > 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["labeled"]) == 4 and not set(split["labeled"]) & set(test_uids)
    checkpoint = torch.load(out / "checkpoints" / "best.pt", weights_only=False)
    assert (
        checkpoint["config"]["method"] == "supervised-det"
        and checkpoint["config"]["data"]["patch"] == 32
    )
    assert (
        checkpoint["provenance"]["n_labeled"] == 4 and checkpoint["provenance"]["n_unlabeled"] == 0
    )
    assert "cpm" in checkpoint["metrics"]  # model cards carry the validation metrics


def test_focalmix_run_trains_on_labeled_and_unlabeled_patches(luna, tmp_path):
    """Also: a corrupt unlabeled scan is skipped with a warning naming it; the run goes on."""
    bad = tmp_path / "archive"
    bad.mkdir()
    (bad / "broken.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 10 10 10\n"
        "ElementType = MET_SHORT\nElementDataFile = broken.raw\n"
    )
    (bad / "broken.raw").write_bytes(b"\0" * 100)
    cfg = tiny_config(
        "focalmix",
        "optim.steps=3",
        "eval.every=3",
        "focalmix.k=2",
        "data.workers=1",
        "focalmix.object_threshold=0.0",
        f"data.unlabeled_dirs=[{bad}]",
    )
    with pytest.warns(UserWarning, match="skipping unlabeled scan broken"):
        run = train_detector(cfg, luna, tmp_path / "fm", n_labeled=4, n_unlabeled=3, device="cpu")
    logged = [json.loads(line) for line in (tmp_path / "fm" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "unlabeled" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["unlabeled"] > 0 for r in steps)
    assert steps[0]["weight"] < steps[-1]["weight"]  # the unlabeled weight ramps up
    assert run.test_report is not None and run.best_checkpoint.is_file()


def test_nan_loss_stops_with_the_last_good_checkpoint_and_resume_reproduces_the_run(
    luna, tmp_path, monkeypatch
):
    cfg = tiny_config("supervised-det")
    train_detector(cfg, luna, tmp_path / "straight", n_labeled=4, device="cpu")

    real_step = supervised_det_method.supervised_step
    calls = {"n": 0}

    def poisoned(model, batch, config):
        calls["n"] += 1
        losses = real_step(model, batch, config)
        if calls["n"] == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(supervised_det_method, "supervised_step", poisoned)
    with pytest.raises(
        TrainingDivergedError, match=r"loss became nan at step 2.*step_00000002\.pt|last\.pt"
    ):
        train_detector(cfg, luna, tmp_path / "broken", n_labeled=4, device="cpu")
    index = json.loads((tmp_path / "broken" / "checkpoints" / "index.json").read_text())
    assert index["last_step"] == 2
    monkeypatch.setattr(supervised_det_method, "supervised_step", real_step)
    train_detector(cfg, luna, tmp_path / "broken", n_labeled=4, resume=True, device="cpu")
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, msg=f"{name} differs after resume")


def test_a_bad_config_key_or_value_stops_at_start_naming_the_key(luna, tmp_path):
    runner = CliRunner()
    args = [
        "focalmix",
        "--data",
        str(luna),
        "--labeled",
        "2",
        "--unlabeled",
        "1",
        "--out",
        str(tmp_path / "x"),
    ]
    result = runner.invoke(train, [*args, "--set", "focalmix.kk=3"])
    assert (
        result.exit_code == 1 and "focalmix.kk" in result.output and "did you mean" in result.output
    )
    result = runner.invoke(train, [*args, "--set", "focalmix.k=60"])
    assert result.exit_code == 1 and "focalmix" in result.output and "1..48" in result.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="model"):
        tiny_config("focalmix", "data.patch=40")  # not divisible by the largest stride 16


def test_inference_windows_default_to_the_training_patch():
    """Larger windows than the training patch gave a 32^3-trained model p = 1.0 on soft tissue."""
    assert tiny_config("focalmix").window == 32
    assert tiny_config("focalmix", "eval.window=64").window == 64


def test_focalmix_without_unlabeled_scans_is_refused(luna, tmp_path):
    with pytest.raises(MedsslError, match="unlabeled"):
        train_detector(
            tiny_config("focalmix"), luna, tmp_path / "r", n_labeled=2, n_unlabeled=0, device="cpu"
        )


def test_too_many_labeled_scans_names_the_pool_size(luna, tmp_path):
    with pytest.raises(MedsslError, match="training pool .* has 9"):
        train_detector(
            tiny_config("supervised-det"), luna, tmp_path / "r", n_labeled=20, device="cpu"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_with_torchrun(luna, tmp_path):
    """DistributedDataParallel through torchrun: 2 CPU processes, gloo, a few steps."""
    out = tmp_path / "ddp"
    overrides = [a for s in [*TINY, "optim.steps=2", "eval.every=2"] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "medssl.cli.train",
            "supervised-det",
            "--config",
            "focalmix-cpu",
            "--data",
            str(luna),
            "--labeled",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "test" / "cpm.json").is_file()
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert index["last_step"] == 2

"""`medssl-train ad` / `supervised-seg` / `mean-teacher` / `bcp` end to end on tiny synthetic
organs.

Four domains (CT A and B, the UDA pair ct and mr) of 5 training + 1 test case on 32x48x48
grids; runs are 4 steps of a width-4 network on 16^3 (or 16x32x32) crops. They check the
machinery (settings and their splits, cache, checkpoints, resume, logs, test predictions and
metrics, errors), not segmentation quality: that is benchmarks/ad_settings.py's job.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from medssl.cli.main import cli
from medssl.cli.train import resolve_config, train
from medssl.config import load_config, parse_overrides
from medssl.io.nifti import read_nifti
from medssl.synth.datasets import write_organ_dataset
from medssl.synth.organ_scene import LABELS
from medssl.synth.organs import generate_organ_phantom
from medssl.training.methods import bcp as bcp_method
from medssl.training.networks.segmenter import build_segmenter
from medssl.training.segmentation import trainer as seg_trainer
from medssl.training.segmentation.config import SegmentationExperiment
from medssl.training.segmentation.trainer import train_segmenter

DOMAINS = ("A", "B", "ct", "mr")
TINY = [
    "optim.steps=4",
    "eval.every=2",
    "data.patch=[16,16,16]",
    "data.workers=0",
    "model.width=4",
    "ad.diffusion_process.sample_steps=2",
]
METRICS = {"dice", "jaccard", "hd95_mm", "asd_mm"}
#: step function -> its method module under medssl.training.methods


from tests.training.segmentation.helpers import checkpoint, train_interrupted_then_resumed, weights

pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]


@pytest.fixture(scope="session")
def organs(tmp_path_factory) -> Path:
    """DATA/<domain>/ for A, B, ct, mr: 5 training and 1 test case each, distinct subjects."""
    root = tmp_path_factory.mktemp("organs")
    for k, domain in enumerate(DOMAINS):
        write_organ_dataset(
            root / domain, cases=5, n_test=1, domain=domain, seed=6 * k, shape=(32, 48, 48)
        )
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path_factory.getbasetemp() / "seg-cache"))


def sets(*overrides: str) -> list[str]:
    return [a for s in [*TINY, *overrides] for a in ("--set", s)]


def run_cli(method: str, setting: str, data: Path, out: Path, *overrides: str):
    return CliRunner().invoke(
        train,
        [
            method,
            "--setting",
            setting,
            "--profile",
            "cpu",
            "--data",
            str(data),
            "--out",
            str(out),
            "--device",
            "cpu",
            *sets(*overrides),
        ],
    )


def tiny_config(method: str, setting: str, *overrides: str) -> SegmentationExperiment:
    return load_config(
        SegmentationExperiment,
        resolve_config(f"seg-{setting}-cpu"),
        {**parse_overrides([*TINY, *overrides]), "method": method},
    )


def test_ad_run_writes_config_split_checkpoints_logs_and_test_predictions(organs, tmp_path):
    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    result = CliRunner().invoke(
        train,
        [
            "ad",
            "--setting",
            "ssl",
            "--profile",
            "cpu",
            "--data",
            str(organs),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--set",
            "optim.steps=4",
            "--set",
            "eval.every=2",
            "--set",
            "data.patch=[16,32,32]",
            "--set",
            "data.workers=0",
            "--set",
            f"data.cache_dir={cache_dir}",
            "--set",
            "model.width=4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "config.yaml").is_file() and "patch" in (out / "config.yaml").read_text()
    assert any(cache_dir.rglob("*")), "data.cache_dir was not used"
    split = json.loads((out / "split.json").read_text())
    assert len(split["validation"]) == 2 and split["labeled"] and split["unlabeled"]
    assert split["test"] == ["A__organs_0005"]
    labeled, unlabeled, validation = (set(split[k]) for k in ("labeled", "unlabeled", "validation"))
    assert not labeled & unlabeled and not labeled & validation and not unlabeled & validation
    assert {p.name for p in (out / "checkpoints").iterdir()} >= {
        "best.pt",
        "last.pt",
        "step_00000002.pt",
        "step_00000004.pt",
    }
    assert list((out / "tensorboard").iterdir()), "no TensorBoard event file"
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"deno", "diff", "unsup", "mu", "lr"} <= set(r) for r in steps)
    assert steps[0]["mu"] < steps[-1]["mu"]
    assert any("val/dice" in r for r in logged)

    metrics = json.loads((out / "test" / "metrics.json").read_text())
    assert metrics["classes_named"] == {"1": "liver"}
    assert set(metrics["classes"]["1"]) >= METRICS
    assert json.loads(result.stdout)["test"] == metrics
    state = checkpoint(out)
    assert state["kind"] == "medssl.segmenter" and state["classes"] == {
        "0": "background",
        "1": "liver",
    }
    assert list(state["config"]["data"]["patch"]) == [16, 32, 32]
    assert state["provenance"]["n_labeled"] == len(split["labeled"])
    assert state["method"]["drs"] is not None

    source = read_nifti(organs / "A" / "imagesTs" / "organs_0005.nii.gz")
    predicted = read_nifti(out / "test" / "predictions" / "A__organs_0005.nii.gz", label=True)
    assert predicted.shape == source.shape
    np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-4)
    assert set(np.unique(predicted.array)) <= {0, 1}


@pytest.mark.parametrize(
    "setting, extra",
    [
        ("imbssl", []),
        ("uda", []),
        ("semidg", ["data.domains=[A,B]", "data.test_domains=[ct]"]),
    ],
)
def test_each_setting_runs_end_to_end_with_its_split(organs, tmp_path, setting, extra):
    out = tmp_path / setting
    result = run_cli("ad", setting, organs, out, *extra)
    assert result.exit_code == 0, result.output
    split = json.loads((out / "split.json").read_text())
    domain = {name: {key.split("__")[0] for key in keys} for name, keys in split.items()}
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    if setting == "imbssl":  # every organ of the phantom, of very different sizes
        assert len(metrics["classes"]) == len(LABELS)
        assert domain["test"] == {"A"}
    if setting == "uda":
        assert domain["labeled"] == domain["validation"] == {"ct"}  # no target case carries a label
        assert "mr" in domain["unlabeled"] and domain["test"] == {"mr"}
        assert len(split["labeled"]) == 3  # labeled_fraction 1.0: every source case but validation
    if setting == "semidg":
        seen = domain["labeled"] | domain["unlabeled"] | domain["validation"]
        assert seen == {"A", "B"} and domain["test"] == {"ct"}
        assert domain["labeled"] == {"A", "B"}  # a few labels from every training domain
    assert set(metrics["classes"][next(iter(metrics["classes"]))]) >= METRICS


def test_supervised_baseline_trains_on_labeled_cases_only(organs, tmp_path):
    out = tmp_path / "sup"
    result = run_cli("supervised-seg", "ssl", organs, out)
    assert result.exit_code == 0, result.output
    state = checkpoint(out, "best.pt")
    assert state["config"]["method"] == "supervised-seg" and state["provenance"]["n_unlabeled"] == 0
    assert "teacher" not in state["method"] and "drs" not in state["method"]
    assert not any(
        ".time." in k or k.startswith("decoder_") for k in state["model"]
    )  # a plain VNet
    assert (out / "test" / "metrics.json").is_file()


def test_mean_teacher_keeps_an_ema_teacher_and_logs_the_consistency(organs, tmp_path):
    out = tmp_path / "mt"
    result = run_cli("mean-teacher", "uda", organs, out)
    assert result.exit_code == 0, result.output
    state = checkpoint(out)
    assert state["method"]["teacher"] is not None
    student, teacher = state["model"], state["method"]["teacher"]
    weight = next(k for k in student if k.endswith("conv.weight"))
    assert not torch.equal(student[weight], teacher[weight])
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("consistency" in r for r in logged if "loss" in r)


def test_an_interrupted_run_resumes_to_the_same_weights(organs, tmp_path, monkeypatch):
    """4 straight steps == 2 steps, an interruption at step 3, then --resume (exact RNG restore)."""
    cfg = tiny_config("ad", "ssl", "data.n_validation=1")
    train_segmenter(cfg, organs, tmp_path / "straight", device="cpu")

    train_interrupted_then_resumed(cfg, organs, tmp_path / "resumed", monkeypatch, "ad_step")

    straight, resumed = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert resumed["step"] == 4 and resumed["classes"] == straight["classes"]
    assert (
        set(resumed["method"]["drs"])
        and resumed["method"]["drs"].keys() == straight["method"]["drs"].keys()
    )
    for name, value in straight["model"].items():
        torch.testing.assert_close(
            resumed["model"][name],
            value,
            rtol=0,
            atol=1e-6,
            msg=lambda m, name=name: f"{name} differs after resume: {m}",
        )
    for key, value in straight["method"]["drs"].items():
        torch.testing.assert_close(
            torch.as_tensor(resumed["method"]["drs"][key]), torch.as_tensor(value), msg=key
        )


def test_an_interrupted_mean_teacher_run_resumes_to_the_same_student_and_teacher(
    organs, tmp_path, monkeypatch
):
    """4 straight steps == 2 steps, an interruption at step 3, then --resume: student and EMA
    teacher both restored (the teacher lives in the checkpoint, not rebuilt from the student)."""
    cfg = tiny_config("mean-teacher", "ssl", "data.n_validation=1")
    train_segmenter(cfg, organs, tmp_path / "straight", device="cpu")

    train_interrupted_then_resumed(
        cfg, organs, tmp_path / "resumed", monkeypatch, "mean_teacher_step"
    )

    straight, resumed = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert resumed["step"] == 4
    for part in ("model", "teacher"):
        for name, value in weights(straight, part).items():
            torch.testing.assert_close(
                weights(resumed, part)[name],
                value,
                rtol=0,
                atol=1e-6,
                msg=lambda m, name=name, part=part: f"{part} {name} differs: {m}",
            )


def test_resume_without_a_checkpoint_is_refused(organs, tmp_path):
    result = CliRunner().invoke(
        train,
        [
            "ad",
            "--setting",
            "ssl",
            "--profile",
            "cpu",
            "--data",
            str(organs),
            "--out",
            str(tmp_path / "nothing"),
            "--resume",
            *sets(),
        ],
    )
    assert result.exit_code == 1 and "nothing to resume" in result.output


def test_a_missing_domain_folder_names_it_and_the_synth_command(organs, tmp_path):
    result = run_cli("ad", "ssl", organs, tmp_path / "x", "data.domains=[C]")
    assert result.exit_code == 1
    assert str(organs / "C") in result.output and "medssl synth organs" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_mean_teacher_without_unlabeled_cases_is_refused(organs, tmp_path):
    result = run_cli("mean-teacher", "ssl", organs, tmp_path / "x", "data.labeled_fraction=1.0")
    assert result.exit_code == 1 and "needs unlabeled cases" in result.output
    assert not (tmp_path / "x").exists()


def test_synth_organs_writes_one_dataset_per_domain_with_distinct_subjects(tmp_path):
    out = tmp_path / "data"
    result = CliRunner().invoke(
        cli,
        [
            "synth",
            "organs",
            "--cases",
            "1",
            "--domain",
            "A",
            "--domain",
            "mr",
            "--shape",
            "16",
            "24",
            "24",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "A" / "dataset.json").is_file() and (out / "mr" / "dataset.json").is_file()
    a_label = read_nifti(out / "A" / "labelsTr" / "organs_0000.nii.gz", label=True)
    mr_label = read_nifti(out / "mr" / "labelsTr" / "organs_0001.nii.gz", label=True)
    assert a_label.shape == mr_label.shape == (16, 24, 24)
    # mr's case is subject 1, not A's subject 0 seen by another scanner
    np.testing.assert_array_equal(
        mr_label.array, generate_organ_phantom(1, "mr", shape=(16, 24, 24)).label.array
    )
    assert not np.array_equal(
        mr_label.array, generate_organ_phantom(0, "mr", shape=(16, 24, 24)).label.array
    )


# ---------------------------------------------------------------- BCP

BCP = (
    "bcp.pretrain_steps=2",
    "data.patch=[16,32,32]",
)  # B/2 = 1 mixed crop: BatchNorm needs > 1 value


def logged_steps(run: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def test_bcp_pretrains_then_self_trains_and_exports_and_scores_like_ad(organs, tmp_path):
    from medssl.export import ExportOptions, export_checkpoint
    from medssl.metrics.segmentation import dice
    from medssl.models.card import load_card
    from medssl.scoring import RunnerSpec, ScoreOptions, score

    out = tmp_path / "bcp"
    result = run_cli("bcp", "ssl", organs, out, *BCP)
    assert result.exit_code == 0, result.output
    rows = logged_steps(out)
    for step in (1, 2):  # copy-paste pre-training at the constant lr
        assert {"loss", "pretrain/dice", "pretrain/ce"} <= set(rows[step]) and rows[step][
            "lr"
        ] == 0.01
    for step in (3, 4):  # self-training: both mixes, each with its Dice and CE
        assert {"loss", "in/loss", "in/dice", "in/ce", "out/loss", "out/dice", "out/ce"} <= set(
            rows[step]
        )
        assert not {"pretrain/dice"} & set(rows[step])
    assert "val/pretrain_dice" in rows[2] and "val/dice" not in rows[2] and "val/dice" in rows[4]
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert index["best_step"] == 4  # best.pt is a self-trained student, never a pre-trained one
    pretrained, final = checkpoint(out, "step_00000002.pt"), checkpoint(out)
    assert (
        pretrained["method"]["bcp"]["best_model"] is not None
        and pretrained["method"]["bcp"]["best_step"] == 2
    )
    assert final["method"]["bcp"]["best_model"] is None and final["method"]["bcp"]["best_step"] == 2
    weight = next(k for k in final["model"] if k.endswith("conv.weight"))
    assert not torch.equal(final["model"][weight], final["method"]["teacher"][weight])
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    assert set(metrics["classes"]["1"]) >= METRICS
    assert (out / "test" / "predictions" / "A__organs_0005.nii.gz").is_file()

    exported = export_checkpoint(
        out, tmp_path / "repository", "bcp-liver", ExportOptions(max_batch_size=2)
    )
    card = load_card(exported.model_dir)
    assert card.provenance["method"] == "bcp" and exported.parity.passed
    assert [label.name for label in card.labels] == ["liver"]
    summary = score(
        organs / "A",
        tmp_path / "scores",
        RunnerSpec(exported.repository, "bcp-liver"),
        options=ScoreOptions(workers=0),
    )
    assert summary.counts == {"ok": 1}
    pred = read_nifti(tmp_path / "scores" / "labels" / "organs_0005.nii.gz", label=True)
    truth = read_nifti(organs / "A" / "labelsTs" / "organs_0005.nii.gz", label=True)
    assert (
        abs(dice(pred.array == 1, truth.array == 1) - metrics["classes"]["1"]["dice"]["mean"])
        < 0.01
    )


def test_bcp_self_training_starts_from_the_best_pretrained_checkpoint(
    organs, tmp_path, monkeypatch
):
    """Validation Dice 0.9 after step 1, 0.1 after step 2: student and teacher start step 3 from
    step 1's weights, so teacher_3 = 0.99·w_1 + 0.01·student_3 (one EMA update)."""
    scripted = iter([0.9, 0.1, 0.5])
    monkeypatch.setattr(seg_trainer, "validate_segmenter", lambda *a, **k: {"dice": next(scripted)})
    cfg = tiny_config("bcp", "ssl", *BCP, "optim.steps=3", "eval.every=1")
    train_segmenter(cfg, organs, tmp_path / "run", device="cpu")
    first, last = (
        checkpoint(tmp_path / "run", "step_00000001.pt"),
        checkpoint(tmp_path / "run", "step_00000003.pt"),
    )
    assert (last["method"]["bcp"]["best_step"], last["method"]["bcp"]["best_dice"]) == (1, 0.9)
    assert last["metrics"] == {"dice": 0.5} and first["metrics"] == {"pretrain_dice": 0.9}
    for name, _ in build_segmenter(cfg, 2).named_parameters():  # the EMA skips BatchNorm buffers
        expected = 0.99 * first["model"][name] + 0.01 * last["model"][name]
        torch.testing.assert_close(
            last["method"]["teacher"][name], expected, rtol=0, atol=1e-6, msg=name
        )


def test_an_interrupted_bcp_run_resumes_to_the_same_student_and_teacher_in_either_phase(
    organs, tmp_path, monkeypatch
):
    """6 straight steps (2 pre-training) == a run stopped in the first self-training step (resumed
    from
    the pre-training checkpoint at step 2), stopped again at step 5 (resumed from step 4),
    finished."""
    cfg = tiny_config("bcp", "ssl", *BCP, "optim.steps=6", "data.n_validation=1")
    train_segmenter(cfg, organs, tmp_path / "straight", device="cpu")

    real_step = bcp_method.bcp_self_train_step

    def stop_at(call: int):
        calls = {"n": 0}

        def step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt
            return real_step(*args, **kwargs)

        return step

    run = tmp_path / "resumed"
    monkeypatch.setattr(bcp_method, "bcp_self_train_step", stop_at(1))
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(cfg, organs, run, device="cpu")
    assert json.loads((run / "checkpoints" / "index.json").read_text())["last_step"] == 2
    monkeypatch.setattr(bcp_method, "bcp_self_train_step", stop_at(3))
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(cfg, organs, run, resume=True, device="cpu")
    assert json.loads((run / "checkpoints" / "index.json").read_text())["last_step"] == 4
    monkeypatch.setattr(bcp_method, "bcp_self_train_step", real_step)
    train_segmenter(cfg, organs, run, resume=True, device="cpu")

    straight, resumed = checkpoint(tmp_path / "straight"), checkpoint(run)
    assert (
        resumed["step"] == 6
        and resumed["method"]["bcp"]["best_step"] == straight["method"]["bcp"]["best_step"]
    )
    for key in ("model", "teacher"):
        for name, value in weights(straight, key).items():
            torch.testing.assert_close(
                weights(resumed, key)[name],
                value,
                rtol=0,
                atol=1e-6,
                msg=lambda m, key=key, name=name: f"{key}.{name} differs after resume: {m}",
            )
    assert (
        resumed["optimizer"]["param_groups"][0]["lr"]
        == straight["optimizer"]["param_groups"][0]["lr"]
    )

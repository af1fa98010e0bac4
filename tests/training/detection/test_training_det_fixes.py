"""Issue 18 item 5, in the detector trainer: the checkpoints carry BatchNorm statistics
re-estimated on inference windows of the labeled scans; one split for every seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn

from medssl.detection import AnchorGrid, AnchorSpec
from medssl.pipeline import Intensity
from medssl.pipeline.windows import plan_windows
from medssl.training.batchnorm import inference_windows, reestimate_batchnorm
from medssl.training.detection import trainer as det_trainer
from medssl.training.detection.scans import split_luna16
from medssl.training.detection.trainer import train_detector
from medssl.training.loop import TrainingDivergedError
from medssl.training.methods import focalmix as focalmix_method
from medssl.training.networks.detector import FPNDetector
from tests.training.detection.helpers import checkpoint, noise_scans, tiny_config

pytestmark = [pytest.mark.slow]

SHORT = ("optim.steps=2", "eval.every=2", "data.test_subsets=[]")


def is_statistic(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_checkpoints_carry_batchnorm_statistics_of_the_labeled_scans_inference_windows(
    luna, tmp_path
):
    """Same seed with and without re-estimation: the same weights (running statistics never
    shape training), and the re-estimating run's statistics are exactly those that
    :func:`reestimate_batchnorm` gives the plain run's weights on the chosen windows."""
    plain = train_detector(
        tiny_config("supervised-det", *SHORT, "eval.bn_windows=0"),
        luna,
        tmp_path / "plain",
        n_labeled=4,
        device="cpu",
    )
    cfg = tiny_config("supervised-det", *SHORT, "eval.bn_windows=8")
    train_detector(cfg, luna, tmp_path / "bn", n_labeled=4, device="cpu")
    a, b = checkpoint(plain.out)["model"], checkpoint(tmp_path / "bn")["model"]
    for name in a:
        if not is_statistic(name):
            torch.testing.assert_close(b[name], a[name], msg=f"{name} differs")
    assert any(not torch.equal(a[n], b[n]) for n in a if n.endswith("running_mean"))

    split = json.loads((tmp_path / "bn" / "split.json").read_text())
    cache_ = det_trainer._cache(cfg)
    pool = split_luna16(
        luna, 4, 0, cfg.data.test_subsets, cfg.data.n_validation, cfg.data.split_seed
    )
    arrays = [cache_.get(u, pool.source(u).load).array for u in split["labeled"]]
    windows = inference_windows(
        [x.shape for x in arrays],
        window=cfg.window,
        overlap=cfg.eval.overlap,
        count=8,
        seed=cfg.seed,
    )
    net = FPNDetector(cfg.model, cfg.anchors)
    net.load_state_dict(a)
    pad = Intensity(cfg.data.hu_min, cfg.data.hu_max).pad_value
    reestimate_batchnorm(
        net, arrays, windows, window=cfg.window, pad_value=pad, batch_size=cfg.optim.batch_size
    )
    expected = net.state_dict()
    for name in a:
        if is_statistic(name):
            torch.testing.assert_close(
                b[name], expected[name], msg=f"{name} is not the re-estimated statistic"
            )
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())


def test_every_seed_trains_on_the_same_split(luna, tmp_path):
    """``data.split_seed`` is a constant (default 0), not the training seed: seeds change the
    training noise only (issue 18 item 5)."""
    for seed in (0, 3):
        train_detector(
            tiny_config(
                "supervised-det",
                "optim.steps=1",
                "eval.every=1",
                "data.test_subsets=[]",
                "eval.bn_windows=0",
                f"seed={seed}",
            ),
            luna,
            tmp_path / f"s{seed}",
            n_labeled=4,
            device="cpu",
        )
    splits = [json.loads((tmp_path / f"s{seed}" / "split.json").read_text()) for seed in (0, 3)]
    assert splits[0] == splits[1]
    assert tiny_config("supervised-det", "seed=5").data.split_seed == 0


# --- hard negatives (item 2 / 5d) and candidate-centred unlabeled crops (5e) -------------------


def _crop_holds(start: np.ndarray, centre: np.ndarray, patch: int, margin: float) -> bool:
    return bool(
        np.all(centre - start >= margin - 1) and np.all(start + patch - 1 - centre >= margin - 1)
    )


def test_labeled_crops_centre_on_hard_negatives_as_a_pure_function_of_seed_index_and_list():
    from medssl.training.detection.data import LabeledPatches

    grid = AnchorGrid.build(AnchorSpec(), (32, 32, 32))
    scans = noise_scans()
    negatives = [np.array([[10.0, 50.0, 12.0]], np.float32), np.zeros((0, 3), np.float32)]
    plain = LabeledPatches(scans, grid, 0.5, False, -1.0, 7)
    off = LabeledPatches(
        scans, grid, 0.5, False, -1.0, 7, hard_negatives=negatives, hard_negative_fraction=0.0
    )
    mined = LabeledPatches(
        scans, grid, 0.5, False, -1.0, 7, hard_negatives=negatives, hard_negative_fraction=0.3
    )
    again = LabeledPatches(
        scans,
        grid,
        0.5,
        False,
        -1.0,
        7,
        hard_negatives=[n.copy() for n in negatives],
        hard_negative_fraction=0.3,
    )
    negative = scans[0].volume.array[5:15, 45:55, 7:17]  # voxels around the negative
    on_negative = 0
    for index in range(200):
        a, b = plain[index], mined[index]
        torch.testing.assert_close(off[index]["image"], a["image"])  # fraction 0 = the plain stream
        torch.testing.assert_close(again[index]["image"], b["image"])  # same (seed, index, list)
        image = b["image"][0].numpy()
        hits = [
            (z, y, x)
            for z in range(33 - 10)
            for y in range(33 - 10)
            for x in range(33 - 10)
            if np.array_equal(image[z : z + 10, y : y + 10, x : x + 10], negative)
        ]
        on_negative += bool(hits)
    # 30 % centred on the negative (plus the few random crops that happen to hold it)
    assert 0.2 < on_negative / 200 < 0.45
    with pytest.raises(ValueError, match="hard_negative_fraction"):
        LabeledPatches(scans, grid, 0.8, hard_negatives=negatives, hard_negative_fraction=0.3)


def test_unlabeled_crops_centre_on_candidates_with_jitter():
    from medssl.training.detection.data import UnlabeledPatches

    volumes = [s.volume for s in noise_scans(3)]
    candidates = [
        np.zeros((0, 3), np.float32),
        np.array([[20.0, 40.0, 25.0]], np.float32),
        np.zeros((0, 3), np.float32),
    ]
    plain = UnlabeledPatches(volumes, 32, -1.0, 3)
    centred = UnlabeledPatches(volumes, 32, -1.0, 3, candidates=candidates, candidate_fraction=0.5)
    on, starts = 0, set()
    for index in range(200):
        item = centred[index]
        assert torch.equal(item["image"], centred[index]["image"])
        start = item["start"].numpy()
        if int(item["case"]) == 1 and _crop_holds(start, candidates[1][0], 32, 8):
            on += 1
            starts.add(tuple(start))
    assert 0.45 < on / 200 < 0.75  # half centred, plus random crops of scan 1 that hold it
    assert len(starts) > 10  # jittered, not one fixed crop
    assert torch.equal(
        UnlabeledPatches(volumes, 32, -1.0, 3, candidates=candidates, candidate_fraction=0.0)[5][
            "image"
        ],
        plain[5]["image"],
    )


def test_hard_negatives_keep_away_from_nodules_and_excluded_findings():
    from medssl.training.detection.mining import hard_negatives, refresh_scans

    candidates = np.array(
        [[10, 10, 10, 0.9], [30, 30, 30, 0.8], [50, 50, 50, 0.7], [12, 40, 40, 0.6]], np.float32
    )
    nodules = np.array([[10, 12, 10, 6]], np.float32)  # 2 mm from the first candidate
    excluded = np.array([[30, 30, 45, 20]], np.float32)  # 15 mm from the second, diameter 20 mm
    kept = hard_negatives(candidates, nodules, excluded, spacing_mm=1.0)
    np.testing.assert_array_equal(kept, candidates[2:, :3])
    assert refresh_scans(5, 2, 0) == [0, 1] and refresh_scans(5, 2, 2) == [4, 0]
    assert refresh_scans(5, 0, 3) == list(range(5)) and refresh_scans(3, 8, 1) == [0, 1, 2]


def test_pseudo_precision_counts_guessed_objects_on_true_nodules():
    from medssl.training.detection.mining import NoduleTruth

    truth = NoduleTruth([np.array([[10, 10, 10, 8]], np.float32), None])
    assert truth.hits(0, np.array([[12, 10, 10], [20, 10, 10]])).tolist() == [True, False]
    assert truth.precision({0: np.array([[12, 10, 10], [20, 10, 10]]), 1: np.zeros((3, 3))}) == (
        1,
        2,
    )
    with pytest.raises(ValueError, match="unknown"):
        truth.hits(1, np.zeros((1, 3)))


def test_mining_runs_logs_checkpoints_its_lists_and_resume_continues_the_same_stream(
    luna,
    tmp_path,
    monkeypatch,
):
    """FocalMix with hard negatives and candidate-centred unlabeled crops: mined at step 2,
    saved in the checkpoint; a run stopped at step 3 and resumed ends with the same weights."""
    extra = (
        "optim.steps=4",
        "eval.every=2",
        "data.test_subsets=[]",
        "focalmix.k=2",
        "eval.bn_windows=8",
        "data.hard_negative_fraction=0.5",
        "focalmix.candidate_fraction=0.5",
        "eval.score_threshold=0.0",
        "focalmix.object_threshold=0.0",
    )
    cfg = tiny_config("focalmix", *extra)
    train_detector(cfg, luna, tmp_path / "straight", n_labeled=3, n_unlabeled=2, device="cpu")
    state = torch.load(
        tmp_path / "straight" / "checkpoints" / "step_00000002.pt", weights_only=False
    )
    assert state["data"]["hard_negatives"]["version"] == 1
    assert state["data"]["unlabeled_candidates"]["version"] == 1
    assert sum(len(c) for c in state["data"]["unlabeled_candidates"]["centres"]) > 0
    assert sum(len(c) for c in state["data"]["hard_negatives"]["centres"]) > 0
    logged = [
        json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    ]
    assert any(
        "mining/candidate_precision" in r for r in logged
    )  # the synthetic pool's hidden truth
    assert any("pseudo_objects" in r for r in logged)

    real = focalmix_method.focalmix_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses = real(*args, **kwargs)
        if calls["n"] == 4:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(focalmix_method, "focalmix_step", poisoned)
    with pytest.raises(TrainingDivergedError):
        train_detector(cfg, luna, tmp_path / "resumed", n_labeled=3, n_unlabeled=2, device="cpu")
    monkeypatch.setattr(focalmix_method, "focalmix_step", real)
    train_detector(
        cfg, luna, tmp_path / "resumed", n_labeled=3, n_unlabeled=2, resume=True, device="cpu"
    )
    straight, resumed = (
        checkpoint(tmp_path / "straight")["model"],
        checkpoint(tmp_path / "resumed")["model"],
    )
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, msg=f"{name} differs after resume")


def test_batchnorm_windows_touch_the_lung_mask_when_inference_uses_it(monkeypatch):
    """With ``eval.lung_mask`` inference runs only windows touching the lung mask, so the
    statistics are estimated on those only; a scan without lung is run (and drawn) whole."""
    scans = noise_scans(2, shape=(40, 96, 96))
    lungs = np.zeros((40, 96, 96), dtype=bool)
    lungs[5:10, 70:80, 70:80] = True
    masks = {
        float(scans[0].volume.array[0, 0, 0]): lungs,
        float(scans[1].volume.array[0, 0, 0]): np.zeros_like(lungs),
    }
    monkeypatch.setattr(
        det_trainer,
        "prepared_lung_mask",
        lambda volume, params: masks[float(volume.array[0, 0, 0])],
    )
    cfg = tiny_config("supervised-det", "eval.lung_mask=true", "eval.bn_windows=1000")
    windows = det_trainer._statistics_windows(scans, cfg)
    first = [s for i, s in windows if i == 0]
    every_first = plan_windows((40, 96, 96), (32, 32, 32), cfg.eval.overlap)
    assert first and len(first) < len(every_first)
    assert all(lungs[s[0] : s[0] + 32, s[1] : s[1] + 32, s[2] : s[2] + 32].any() for s in first)
    assert len([s for i, s in windows if i == 1]) == len(every_first)
    assert len(
        det_trainer._statistics_windows(
            scans, tiny_config("supervised-det", "eval.bn_windows=1000")
        )
    ) == 2 * len(every_first)

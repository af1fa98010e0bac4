"""Shared fixtures: small volumes, DICOM series made by code, and the dciodvfy validator."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medssl import Volume, affine_from_geometry
from medssl.io import SeriesInfo, write_dicom_series


@pytest.fixture(scope="session", autouse=True)
def _no_openvino_beside_torch():
    """Keep OpenVINO's runtime out of the test process, which also runs torch: the two in one
    process crashed the suite (a thread's stack overflow in the dynamic linker, in a torch test
    after OpenVINO had been loaded). Production never mixes them (scoring and the gateway never
    import torch; export's parity check uses onnxruntime). In this process ``runtime="auto"``
    therefore picks onnxruntime; the subprocesses tests start (``medssl-score``, gateways) use the
    real default, and ``tests/medssl/runners/test_runners_openvino.py`` runs OpenVINO in a child
    process."""
    import medssl.runners

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(medssl.runners, "openvino_available", lambda: False)
        yield


def oblique_direction(degrees: float = 20.0) -> np.ndarray:
    """A rotation about the S axis: columns are the LPS directions of index z, y, x."""
    a = np.radians(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    axial = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    return rot @ axial


def ramp_volume(
    shape=(6, 20, 24), spacing=(2.5, 0.7, 0.8), origin=(-90.0, -110.0, -250.0), direction=None
) -> Volume:
    """A CT-like volume whose every voxel value differs (to catch flips and shifts)."""
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 3000 - 1000
    return Volume(values, affine_from_geometry(origin, spacing, direction))


def assert_same_in_world(ours: Volume, theirs: Volume) -> None:
    """Same voxels at the same LPS positions (index order may differ, e.g. a flipped z)."""
    assert sorted(ours.spacing.round(5)) == sorted(theirs.spacing.round(5))
    corners = np.array([[0, 0, 0], [ours.shape[0] - 1, ours.shape[1] - 1, ours.shape[2] - 1]])
    mapped = theirs.world_to_index(ours.index_to_world(corners))
    assert np.allclose(mapped, np.round(mapped), atol=1e-3)
    zz, yy, xx = np.indices(ours.shape).reshape(3, -1)
    idx = np.round(theirs.world_to_index(ours.index_to_world(np.stack([zz, yy, xx], 1)))).astype(
        int
    )
    assert np.array_equal(ours.array[zz, yy, xx], theirs.array[idx[:, 0], idx[:, 1], idx[:, 2]])


@pytest.fixture
def volume() -> Volume:
    return ramp_volume()


@pytest.fixture
def dicom_series(tmp_path: Path, volume: Volume) -> Path:
    """A 6-slice axial CT series in ``tmp_path/series``."""
    folder = tmp_path / "series"
    write_dicom_series(volume, folder, SeriesInfo(uid_seed="fixture"))
    return folder


def require_tool(name: str, package: str, installer: str = "apt-get install") -> str:
    """Path of a command-line tool: on PATH, else beside this interpreter (where pip puts the
    tools of packages such as dcmqi; PATH first, since pynetdicom's apps there are also named
    storescu, echoscu, ...); skip without it, except under CI, where .ci/run installs it."""
    exe = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run should install {package}")
        pytest.skip(f"{name} not installed ({installer} {package})")
    return exe


@pytest.fixture(scope="session")
def dciodvfy():
    """Run dicom3tools' validator on a file; returns the list of error lines.

    Skipped where dciodvfy is not installed, except under CI, where .ci/run
    installs it and its absence is a failure.
    """
    exe = require_tool("dciodvfy", "dicom3tools")

    def run(path: Path) -> list[str]:
        result = subprocess.run([exe, str(path)], capture_output=True, text=True, check=False)
        return [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")
        ]

    return run


@pytest.fixture(scope="session")
def detector_checkpoint(tmp_path_factory) -> Path:
    """A FocalMix checkpoint as medssl-train writes it: the bundled CPU config (32³ windows,
    8-block network), seeded random weights with trained-looking batch-norm statistics."""
    import torch

    from medssl.cli.train import resolve_config
    from medssl.config import config_to_dict, load_config
    from medssl.training.detection.config import DetectionExperiment
    from medssl.training.networks.detector import FPNDetector

    cfg = load_config(DetectionExperiment, resolve_config("focalmix-cpu"))
    torch.manual_seed(0)
    net = FPNDetector(cfg.model, cfg.anchors)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("checkpoint") / "best.pt"
    torch.save(
        {
            "model": net.state_dict(),
            "config": config_to_dict(cfg),
            "step": 500,
            "kind": "medssl.detector",
            "metrics": {"cpm": 0.5},
            "provenance": {
                "method": "focalmix",
                "data": "synthetic LUNA16 (medssl synth chest)",
                "n_labeled": 10,
                "n_unlabeled": 20,
                "n_validation": 4,
            },
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def exported_detector(tmp_path_factory, detector_checkpoint):
    """``detector_checkpoint`` exported as model ``nodules`` (fp32, CPU instances, max batch 4);
    a bare checkpoint has no run to choose an operating point on: its card has none."""
    from medssl.export import ExportOptions, export_checkpoint
    from medssl.models.triton_config import ServingOptions

    repository = tmp_path_factory.mktemp("model_repository")
    return export_checkpoint(
        detector_checkpoint,
        repository,
        "nodules",
        ExportOptions(max_batch_size=4, serving=ServingOptions(kind="cpu"), operating_point="none"),
    )


@pytest.fixture
def mismatched_card(exported_detector):
    """The exported card with three faults: input renamed to ``image``, one box too many,
    scores declared FP16."""
    import dataclasses

    card = exported_detector.card
    boxes, scores = card.outputs
    return dataclasses.replace(
        card,
        input=dataclasses.replace(card.input, name="image"),
        outputs=(
            dataclasses.replace(boxes, shape=(boxes.shape[0] + 1, 4)),
            dataclasses.replace(scores, datatype="FP16"),
        ),
    )


@pytest.fixture(scope="session")
def detector_patches(exported_detector):
    """Six random patches in [-1, 1] and one synthetic chest CT patch centred on a nodule,
    ``(7, 1, 32, 32, 32)`` float32: what the exported detector's runners are fed."""
    from medssl.synth.patches import chest_patch

    card = exported_detector.card
    noise = np.random.default_rng(0).uniform(-1, 1, (6, *card.input.shape)).astype(np.float32)
    ct = chest_patch(card.patch_size, card.input_spacing, card.normalisation, seed=3)
    return np.concatenate([noise, ct])


@pytest.fixture(scope="session")
def scoring_archive(tmp_path_factory) -> Path:
    """An NLST-like DICOM archive: 20 intact chest CT studies and 3 broken ones (truncated
    file, missing slice, displaced slice), each with a localizer; small grids (64² × 36)."""
    from medssl.synth.archive import write_archive

    root = tmp_path_factory.mktemp("archive")
    write_archive(root, 20, broken=3, seed=40, matrix=64, n_slices=36)
    return root


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny convolutions on a loaded 2-core machine: one torch thread is many times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Grid of the phantom cases ``seg_run`` trains on.
ORGAN_SHAPE = (32, 48, 48)


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory) -> Path:
    """A 4-step A&D run in the imbssl setting (11 organs) on a small phantom dataset."""
    from medssl.cli.train import resolve_config
    from medssl.config import load_config
    from medssl.synth.datasets import write_organ_dataset
    from medssl.training.segmentation.config import SegmentationExperiment
    from medssl.training.segmentation.trainer import train_segmenter

    root = tmp_path_factory.mktemp("organs")
    write_organ_dataset(root / "A", cases=5, n_test=2, domain="A", shape=ORGAN_SHAPE)
    cfg = load_config(
        SegmentationExperiment,
        resolve_config("seg-imbssl-cpu"),
        {
            "method": "ad",
            "optim.steps": 4,
            "eval.every": 2,
            "data.patch": [16, 32, 32],
            "data.workers": 0,
            "data.cache_dir": str(root / "cache"),
            "data.labeled_fraction": 0.5,
        },
    )
    return train_segmenter(cfg, root, root / "run", device="cpu").out


@pytest.fixture(scope="session")
def exported_segmenter(seg_run, tmp_path_factory):
    """``seg_run`` exported as model ``organs`` (max batch 2)."""
    from medssl.export import ExportOptions, export_checkpoint

    repository = tmp_path_factory.mktemp("seg_repository")
    return export_checkpoint(seg_run, repository, "organs", ExportOptions(max_batch_size=2))


@pytest.fixture(scope="session")
def triton_env() -> Path:
    """The Triton env (``make triton-env``): skipped without it, except under CI."""
    from medssl.errors import RunnerError
    from medssl.testing import find_triton_env

    try:
        return find_triton_env()
    except RunnerError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}. CI must run the Triton tests: `make setup-test` builds the env")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key, made with openssl."""
    openssl = require_tool("openssl", "openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


#: Debian's chromium, the real browser of the viewer and console tests (driven by playwright).
CHROMIUM = "/usr/bin/chromium"
#: Chromium flags for tests: no sandbox (root in CI), software GL, and no name resolves to
#: anything but 127.0.0.1 (nothing may be fetched from elsewhere).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--enable-unsafe-swiftshader",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def require_browser(*more: tuple[str, bool]) -> None:
    """Chromium and playwright (and the ``(what, present)`` pairs in ``more``): skip without
    them, except as root (CI, where ``make setup-test`` installs them) or under ``CI``, where
    their absence is a failure."""
    must = os.geteuid() == 0 or bool(os.environ.get("CI"))
    try:
        import playwright.sync_api  # noqa: F401

        has_playwright = True
    except ImportError:
        has_playwright = False
    missing = [
        what
        for what, ok in (
            ("chromium (apt-get install chromium)", Path(CHROMIUM).is_file()),
            ("playwright (pip install playwright)", has_playwright),
            *more,
        )
        if not ok
    ]
    if missing:
        (pytest.fail if must else pytest.skip)("not installed: " + ", ".join(missing))

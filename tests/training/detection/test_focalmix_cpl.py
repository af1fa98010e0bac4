"""FlexMatch CPL as FocalMix's object choice (``focalmix.object_policy: flexmatch``):
anchor → memory cell mapping, per-cell verdicts, thresholds as the memory fills, and the
objects they select. Expected values are computed by hand in the comments."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medssl.cli.train import resolve_config
from medssl.config import load_config
from medssl.detection import AnchorGrid, AnchorSpec
from medssl.errors import ConfigError
from medssl.pipeline.windows import extract_window
from medssl.training.detection.config import DetectionExperiment, FocalMixConfig
from medssl.training.detection.data import UnlabeledPatches
from medssl.training.detection.focalmix import (
    CPLObjectSelection,
    anchor_cell_ids,
    cell_probabilities,
    nodule_probabilities,
    objects_from_mask,
    objects_from_targets,
)
from medssl.training.methods.focalmix import focalmix_step
from medssl.training.threshold import VoxelMemoryLayout

#: Two levels on an 8^3 crop: stride 2 (4^3 anchors of edge 4, reference voxel 2i) and
#: stride 4 (2^3 anchors of edge 8, centre 4j + 1.5, reference voxel 4j + 1).
SMALL = AnchorSpec(strides=(2, 4), sizes=(4.0, 8.0))


def small_grid() -> AnchorGrid:
    return AnchorGrid.build(SMALL, (8, 8, 8))


def test_nodule_probabilities_are_background_then_nodule():
    p = torch.tensor([[0.25, 0.9]])
    torch.testing.assert_close(nodule_probabilities(p), torch.tensor([[[0.75, 0.1], [0.25, 0.9]]]))


def test_anchor_cells_follow_the_crop_corner_in_the_scan():
    # cells of 4 voxels: case 0 (8, 8, 8) → 2x2x2 cells (ids 0..7), case 1 (12, 8, 8) → 3x2x2 (ids
    # 8..19)
    layout = VoxelMemoryLayout([(8, 8, 8), (12, 8, 8)], stride=4)
    grid = small_grid()
    ids = anchor_cell_ids(layout, grid, torch.tensor([1, 0]), torch.tensor([[4, 0, 0], [4, 0, 0]]))
    assert ids.shape == (2, 64 + 8) and ids.dtype == torch.int64
    level2 = ids[:, :64].reshape(2, 4, 4, 4)
    # case 1, stride-2 anchor (0, 0, 0): voxel (4, 0, 0) → cell (1, 0, 0) → 8 + (1·2 + 0)·2 + 0 = 12
    assert level2[0, 0, 0, 0] == 12
    # anchor (3, 3, 3): voxel (10, 6, 6) → cell (2, 1, 1) → 8 + (2·2 + 1)·2 + 1 = 19
    assert level2[0, 3, 3, 3] == 19
    # two stride-2 anchors per cell edge: anchors 0 and 1 along z share cell z = 1
    assert level2[0, 1, 0, 0] == 12 and level2[0, 2, 0, 0] == 16
    # case 1, stride-4 anchor (1, 1, 1): voxel (4 + 5, 5, 5) → cell (2, 1, 1) → 19
    assert ids[0, 64 + 7] == 19
    # case 0 is 8 deep: z = 4 + 2i is outside for i >= 2 → no cell
    assert (level2[1, 2:] == -1).all() and (level2[1, :2] >= 0).all() and (level2[1, :2] < 8).all()


def test_a_cell_takes_the_verdict_of_its_most_nodule_like_anchor():
    ids = torch.tensor([[3, 3, 5, -1], [5, 7, -1, -1]])
    p = torch.tensor([[0.9, 0.1, 0.3, 0.99], [0.2, 0.05, 0.7, 0.7]])
    probs, cells = cell_probabilities(p, ids)
    assert cells.tolist() == [3, 5, 7]  # -1 (and its 0.99, 0.7) has no cell
    torch.testing.assert_close(probs, torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.95, 0.05]]))


def whole_case_batch(
    selection: CPLObjectSelection, cell_p: dict[int, float], rest: float
) -> torch.Tensor:
    """Guessed probabilities of one 8^3 crop at (0, 0, 0) whose every anchor in cell c has
    ``cell_p[c]`` (``rest`` elsewhere)."""
    ids = anchor_cell_ids(
        selection.layout, small_grid(), torch.tensor([0]), torch.zeros(1, 3, dtype=torch.int64)
    )
    p = torch.full(ids.shape, rest)
    for cell, value in cell_p.items():
        p[ids == cell] = value
    return p


def update(selection: CPLObjectSelection, p: torch.Tensor) -> None:
    selection.update(p, small_grid(), torch.tensor([0]), torch.zeros(1, 3, dtype=torch.int64))


def test_cpl_thresholds_move_as_the_memory_fills():
    # one 8^3 case, cells of 4 voxels: N = 8 memory entries; τ = 0.8, warm-up, convex M(x) = x/(2 −
    # x)
    selection = CPLObjectSelection([(8, 8, 8)], tau=0.8, memory_stride=4)
    assert selection.layout.n_samples == 8
    assert selection.nodule_threshold() == 0.0  # t = 0: every β is 0

    # cell 0 confidently nodule (0.9 ≥ τ), cells 1, 2 confidently background (0.1 ≤ 1 − τ),
    # the other 5 uncertain (0.5): σ = (bg 2, nodule 1), 5 unused
    update(selection, whole_case_batch(selection, {0: 0.9, 1: 0.1, 2: 0.1}, rest=0.5))
    assert selection.learning_effect() == (2, 1)
    # warm-up: β = σ / max(2, 1, 5) = (0.4, 0.2); T = M(β)·τ = (0.25·0.8, (1/9)·0.8)
    torch.testing.assert_close(
        selection.policy.thresholds(), torch.tensor([0.2, 0.8 / 9], dtype=torch.float64)
    )

    # every other cell becomes background: σ = (7, 1), none unused: β = (1, 1/7),
    # T(nodule) = M(1/7)·0.8 = (1/13)·0.8
    update(selection, whole_case_batch(selection, {0: 0.9}, rest=0.1))
    assert selection.learning_effect() == (7, 1)
    assert selection.nodule_threshold() == pytest.approx(0.8 / 13)

    # the latest confident verdict wins; an uncertain one (0.5) leaves the memory alone
    update(selection, whole_case_batch(selection, {0: 0.05, 1: 0.5}, rest=0.5))
    assert selection.learning_effect() == (8, 0)
    assert selection.nodule_threshold() == 0.0


def test_cpl_selects_anchors_more_likely_nodule_than_background_while_nodules_are_rare():
    selection = CPLObjectSelection([(8, 8, 8)], tau=0.8, memory_stride=4)
    p = torch.tensor([[0.95, 0.6, 0.51, 0.5, 0.3, 0.05]])
    # t = 0: thresholds (0, 0): kept where argmax is "nodule": p > 0.5 (0.5 ties to background)
    assert selection.select(p).tolist() == [[True, True, True, False, False, False]]
    # 7 background cells, 1 nodule cell: T(nodule) = 0.8/13 ≈ 0.06 < 0.5: the same choice
    update(selection, whole_case_batch(selection, {0: 0.9}, rest=0.1))
    assert selection.select(p).tolist() == [[True, True, True, False, False, False]]
    # only when nodule cells outnumber background ones does T(nodule) pass 0.5: 7 nodule,
    # 1 background cell: β = (1/7, 1), T(nodule) = τ = 0.8 (FocalMix's fixed choice)
    update(selection, whole_case_batch(selection, {0: 0.1}, rest=0.9))
    assert selection.nodule_threshold() == pytest.approx(0.8)
    assert selection.select(p).tolist() == [[True, False, False, False, False, False]]


def test_cpl_objects_after_nms_against_the_fixed_threshold():
    grid = AnchorGrid.build(AnchorSpec(), (32, 32, 32))
    p = torch.zeros(1, grid.n_anchors)
    far = [0, 16**3 - 1, 16**3 + 7]  # cubes at (0.5,)*3, (30.5,)*3 and (1.5, 1.5, 29.5): disjoint
    p[0, far] = torch.tensor([0.95, 0.7, 0.55])
    selection = CPLObjectSelection([(32, 32, 32)], tau=0.8)
    cpl = objects_from_mask(p, selection.select(p), grid)[0]
    fixed = objects_from_targets(p, grid, threshold=0.8)[0]
    np.testing.assert_array_equal(fixed[:, :3], grid.centres[[0]])
    assert len(cpl) == 3
    np.testing.assert_array_equal(cpl[:, :3], grid.centres[far])  # NMS order: by probability


def test_fixed_objects_are_those_above_the_threshold_in_float32():
    grid = AnchorGrid.build(AnchorSpec(), (32, 32, 32))
    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.random((3, grid.n_anchors)).astype(np.float32) ** 8)
    p[0, 5] = 0.8  # float32(0.8) ≥ 0.8 compared in float32
    for row, objects in zip(p.numpy(), objects_from_targets(p, grid, 0.8)):
        chosen = row >= np.float32(0.8)
        assert 1 <= len(objects) <= 8
        assert set(map(tuple, objects[:, :3])) <= set(map(tuple, grid.centres[chosen]))


def test_cpl_memory_round_trips_and_refuses_another_tau():
    selection = CPLObjectSelection([(8, 8, 8)], tau=0.8, memory_stride=4)
    update(selection, whole_case_batch(selection, {0: 0.9}, rest=0.1))
    restored = CPLObjectSelection([(8, 8, 8)], tau=0.8, memory_stride=4)
    restored.load_state_dict(selection.state_dict())
    assert restored.learning_effect() == (7, 1)
    assert torch.equal(restored.policy.memory, selection.policy.memory)
    with pytest.raises(ValueError, match="tau"):
        CPLObjectSelection([(8, 8, 8)], tau=0.95, memory_stride=4).load_state_dict(
            selection.state_dict()
        )


def test_config_defaults_to_the_fixed_threshold_and_validates_cpl():
    assert FocalMixConfig().object_policy == "fixed"
    assert FocalMixConfig(object_policy="flexmatch").object_memory_stride == 8
    with pytest.raises(ValueError, match="object_mixup"):
        FocalMixConfig(object_policy="flexmatch", object_mixup=False)
    with pytest.raises(ValueError, match="tau"):
        FocalMixConfig(object_policy="flexmatch", object_threshold=0.0)
    with pytest.raises(ConfigError, match="object_policy"):
        load_config(
            DetectionExperiment, resolve_config("focalmix-cpu"), {"focalmix.object_policy": "cpl"}
        )


def test_unlabeled_patches_name_the_crop_they_return():
    rng = np.random.default_rng(3)
    scans = [
        SimpleNamespace(array=rng.random(shape).astype(np.float32))
        for shape in [(20, 24, 24), (12, 40, 16)]
    ]
    patches = UnlabeledPatches(scans, 16, -1.0, seed=7)
    cases = set()
    for index in range(6):
        item = patches[index]
        cases.add(int(item["case"]))
        window = extract_window(
            scans[int(item["case"])].array, tuple(item["start"].tolist()), (16,) * 3, -1.0
        )
        np.testing.assert_array_equal(item["image"][0].numpy(), window)
    assert cases == {0, 1}


def test_the_step_needs_a_cpl_selection_exactly_when_the_config_asks_for_one():
    cfg = DetectionExperiment(focalmix=FocalMixConfig(object_policy="flexmatch"))
    with pytest.raises(ValueError, match="flexmatch"):
        focalmix_step(None, None, {}, {}, small_grid(), 0, cfg, np.random.default_rng(0))

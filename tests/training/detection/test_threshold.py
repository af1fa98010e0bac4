"""Threshold policies against hand-computed values: the CPL mapping, FixMatch's fixed threshold,
FlexMatch's warm-up at t = 0, class thresholds moving as classes are learned, the official
mask-then-update order, checkpoint round trips and the segmentation voxel memory layout.

References: TorchSSL/TorchSSL ``models/flexmatch/flexmatch.py`` + ``flexmatch_utils.py``;
microsoft/Semi-supervised-learning ``semilearn/algorithms/flexmatch/utils.py``.
"""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

from medssl.training.threshold import (
    FixedThreshold,
    FlexMatchThreshold,
    VoxelMemoryLayout,
    cpl_mapping,
    memory_dtype,
)

TAU = 0.95
EXACT = {"rtol": 0.0, "atol": 1e-12}


def probs(*rows: tuple[int, float], n_classes: int = 3) -> torch.Tensor:
    """``(N, C)`` float32 rows: class ``c`` gets ``p``, the others share ``1 − p`` equally."""
    out = torch.empty(len(rows), n_classes)
    for i, (c, p) in enumerate(rows):
        out[i] = (1.0 - p) / (n_classes - 1)
        out[i, c] = p
    return out


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def assert_values(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), **EXACT)


# -- mapping -------------------------------------------------------------------------------


def test_convex_mapping_is_x_over_2_minus_x() -> None:
    beta = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert_values(cpl_mapping(beta, "convex"), [0.0, 1 / 3, 1.0])


def test_linear_mapping_is_the_identity() -> None:
    beta = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert_values(cpl_mapping(beta, "linear"), [0.0, 0.5, 1.0])


def test_unknown_mapping_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="concave"):
        FlexMatchThreshold(3, 10, mapping="concave")


# -- FixedThreshold ------------------------------------------------------------------------


def test_fixed_threshold_keeps_max_probability_at_or_above_tau() -> None:
    policy = FixedThreshold(0.95)
    p = probs((0, 0.95), (1, 0.96), (2, 0.94), (1, 0.5))
    labels, keep = policy.mask(p)
    assert labels.tolist() == [0, 1, 2, 1]
    assert keep.tolist() == [True, True, False, False]  # 0.95 itself passes (≥, as `ge`)


def test_fixed_threshold_on_a_3d_segmentation_batch() -> None:
    p = torch.zeros(1, 2, 1, 2, 2)
    p[0, 0] = torch.tensor([[[0.99, 0.2], [0.6, 0.5]]])
    p[0, 1] = 1 - p[0, 0]
    labels, keep = FixedThreshold(0.75).pseudo_label(p)
    assert labels.shape == keep.shape == (1, 1, 2, 2)
    assert labels[0, 0].tolist() == [[0, 1], [0, 0]]  # the tie 0.5/0.5 goes to class 0
    assert keep[0, 0].tolist() == [[True, True], [False, False]]


def test_fixed_threshold_state_round_trip_and_mismatch() -> None:
    state = FixedThreshold(0.9).state_dict()
    FixedThreshold(0.9).load_state_dict(state)
    with pytest.raises(ValueError, match="tau"):
        FixedThreshold(0.95).load_state_dict(state)


# -- FlexMatch: t = 0 ----------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [True, False])
def test_at_start_every_sample_is_unused_and_every_threshold_is_zero(warmup: bool) -> None:
    # σ = (0, 0, 0). Warm-up: β = 0 / max(0, N − 0) = 0 / 10 = 0. Without: 0 / 0, which the
    # official code never evaluates (guard `max(counter) < N`), keeping its initial zeros.
    # T = M(0)·τ = 0 / 2 · 0.95 = 0: every pseudo-label passes, even a uniform prediction.
    policy = FlexMatchThreshold(3, 10, tau=TAU, warmup=warmup)
    assert policy.memory.tolist() == [-1] * 10
    assert policy.learning_effect().tolist() == [0, 0, 0]
    assert_values(policy.normalised_effect(), [0.0, 0.0, 0.0])
    assert_values(policy.thresholds(), [0.0, 0.0, 0.0])
    p = torch.cat([probs((0, 0.4), (1, 0.9), (2, 0.99)), torch.full((1, 3), 1 / 3)])
    labels, keep = policy.mask(p)
    assert labels.tolist() == [0, 1, 2, 0]
    assert keep.all()


# -- FlexMatch: thresholds follow the learning effects -------------------------------------


def learn_three_steps(policy: FlexMatchThreshold) -> list[list[int]]:
    """A hand-made sequence of updates on N = 10 samples; returns σ after each step."""
    sigmas = []
    # step 1: samples 0, 1 → class 0 and 2 → class 1 (≥ τ);
    # 3 → class 2 at 0.90 < τ: not stored
    policy.update(probs((0, 0.97), (0, 0.96), (1, 0.99), (2, 0.90)), ids(0, 1, 2, 3))
    sigmas.append(policy.learning_effect().tolist())
    # step 2: 4, 5, 6 → class 0; 7 → class 1; 8 at 0.5 not stored; 2 changes class 1 → 0
    policy.update(
        probs((0, 0.98), (0, 0.99), (0, 0.95), (1, 0.97), (0, 0.5), (0, 0.99)),
        ids(4, 5, 6, 7, 8, 2),
    )
    sigmas.append(policy.learning_effect().tolist())
    # step 3: 9 and 3 → class 2; 8 → class 1: every sample used
    policy.update(probs((2, 0.99), (2, 0.96), (1, 0.97)), ids(9, 3, 8))
    sigmas.append(policy.learning_effect().tolist())
    return sigmas


def test_warmup_thresholds_rise_as_classes_are_learned() -> None:
    policy = FlexMatchThreshold(3, 10, tau=TAU, warmup=True)

    policy.update(probs((0, 0.97), (0, 0.96), (1, 0.99), (2, 0.90)), ids(0, 1, 2, 3))
    assert policy.memory.tolist() == [0, 0, 1, -1, -1, -1, -1, -1, -1, -1]
    # σ = (2, 1, 0), unused 7: β = σ / max(2, 7) = (2/7, 1/7, 0)
    # M(2/7) = (2/7)/(12/7) = 1/6, M(1/7) = (1/7)/(13/7) = 1/13
    assert policy.learning_effect().tolist() == [2, 1, 0]
    assert_values(policy.normalised_effect(), [2 / 7, 1 / 7, 0.0])
    assert_values(policy.thresholds(), [TAU / 6, TAU / 13, 0.0])

    policy.update(
        probs((0, 0.98), (0, 0.99), (0, 0.95), (1, 0.97), (0, 0.5), (0, 0.99)),
        ids(4, 5, 6, 7, 8, 2),
    )
    assert policy.memory.tolist() == [0, 0, 0, -1, 0, 0, 0, 1, -1, -1]
    # σ = (6, 1, 0), unused 3: β = σ / max(6, 3) = (1, 1/6, 0); M(1/6) = (1/6)/(11/6) = 1/11
    assert policy.learning_effect().tolist() == [6, 1, 0]
    assert_values(policy.normalised_effect(), [1.0, 1 / 6, 0.0])
    assert_values(policy.thresholds(), [TAU, TAU / 11, 0.0])
    # class 0 is learned: its threshold is back at τ; class 1's is low
    labels, keep = policy.mask(probs((0, 0.9), (0, 0.96), (1, 0.5), (2, 0.34)))
    assert labels.tolist() == [0, 0, 1, 2]
    assert keep.tolist() == [False, True, True, True]

    policy.update(probs((2, 0.99), (2, 0.96), (1, 0.97)), ids(9, 3, 8))
    assert policy.memory.tolist() == [0, 0, 0, 2, 0, 0, 0, 1, 1, 2]
    # σ = (6, 2, 2), unused 0: β = (1, 1/3, 1/3); M(1/3) = (1/3)/(5/3) = 1/5
    assert policy.learning_effect().tolist() == [6, 2, 2]
    assert_values(policy.normalised_effect(), [1.0, 1 / 3, 1 / 3])
    assert_values(policy.thresholds(), [TAU, TAU / 5, TAU / 5])


def test_without_warmup_the_best_learned_class_sets_the_scale_at_once() -> None:
    policy = FlexMatchThreshold(3, 10, tau=TAU, warmup=False)
    sigmas = learn_three_steps(policy)
    assert sigmas == [[2, 1, 0], [6, 1, 0], [6, 2, 2]]
    # after the three steps: β = σ / 6 = (1, 1/3, 1/3), as with warm-up (no sample unused)
    assert_values(policy.normalised_effect(), [1.0, 1 / 3, 1 / 3])
    fresh = FlexMatchThreshold(3, 10, tau=TAU, warmup=False)
    fresh.update(probs((0, 0.97), (0, 0.96), (1, 0.99), (2, 0.90)), ids(0, 1, 2, 3))
    # σ = (2, 1, 0): β = σ / 2 = (1, 1/2, 0) → T = (τ, τ/3, 0), ignoring the 7 unused samples
    assert_values(fresh.normalised_effect(), [1.0, 0.5, 0.0])
    assert_values(fresh.thresholds(), [TAU, TAU / 3, 0.0])


def test_linear_mapping_thresholds_are_beta_times_tau() -> None:
    policy = FlexMatchThreshold(3, 10, tau=TAU, mapping="linear")
    policy.update(probs((0, 0.97), (0, 0.96), (1, 0.99), (2, 0.90)), ids(0, 1, 2, 3))
    assert_values(policy.thresholds(), [TAU * 2 / 7, TAU * 1 / 7, 0.0])


def test_one_class_holding_every_entry_follows_the_formula() -> None:
    # the official guard would keep the previous β here; we apply β = σ / max(N, 0) = (1, 0)
    policy = FlexMatchThreshold(2, 3, tau=TAU)
    policy.update(probs((0, 0.99), (0, 0.99), (0, 0.99), n_classes=2), ids(0, 1, 2))
    assert_values(policy.normalised_effect(), [1.0, 0.0])
    assert_values(policy.thresholds(), [TAU, 0.0])


# -- FlexMatch: order, memory writes -------------------------------------------------------


def test_a_batch_is_masked_with_the_thresholds_from_before_it() -> None:
    # N = 4, a fresh memory: T = 0, so all four pass, including sample 3 at 0.90 < τ.
    # Updating first would give σ = (3, 0, 0), unused 1, β(0) = 1, T(0) = τ and drop sample 3.
    policy = FlexMatchThreshold(3, 4, tau=TAU)
    labels, keep = policy.pseudo_label(
        probs((0, 0.99), (0, 0.99), (0, 0.99), (0, 0.90)), ids(0, 1, 2, 3)
    )
    assert labels.tolist() == [0, 0, 0, 0]
    assert keep.tolist() == [True, True, True, True]
    assert policy.memory.tolist() == [0, 0, 0, -1]
    assert_values(policy.thresholds(), [TAU, 0.0, 0.0])
    # the next batch sees the updated thresholds
    _, keep = policy.pseudo_label(probs((0, 0.90), (1, 0.4)), ids(3, 3))
    assert keep.tolist() == [False, True]


def test_memory_writes_need_max_probability_at_least_tau() -> None:
    policy = FlexMatchThreshold(3, 5, tau=TAU)
    p = probs((1, 0.95), (2, 0.9499), (0, 1.0))
    assert p[0, 1].item() == pytest.approx(0.95)  # float32(0.95) ≥ 0.95 (`ge`, in float32)
    policy.update(p, ids(0, 1, 2))
    assert policy.memory.tolist() == [1, -1, 0, -1, -1]


def test_ids_of_minus_one_have_no_memory_entry() -> None:
    policy = FlexMatchThreshold(3, 5, tau=TAU)
    policy.update(probs((1, 0.99), (2, 0.99)), ids(-1, 4))
    assert policy.memory.tolist() == [-1, -1, -1, -1, 2]
    assert policy.learning_effect().tolist() == [0, 0, 1]


def test_an_id_twice_in_a_batch_keeps_its_last_prediction_and_counts_stay_exact() -> None:
    policy = FlexMatchThreshold(3, 4, tau=TAU)
    policy.update(probs((0, 0.99), (0, 0.99)), ids(0, 1))
    policy.update(probs((1, 0.99), (2, 0.99), (2, 0.99), (1, 0.5)), ids(0, 0, 1, 1))
    assert policy.memory.tolist() == [2, 2, -1, -1]
    assert policy.learning_effect().tolist() == [0, 0, 2]


def test_inputs_are_validated_with_the_bad_value_named() -> None:
    policy = FlexMatchThreshold(3, 4)
    with pytest.raises(ValueError, match="2 classes"):
        policy.mask(torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        policy.update(probs((0, 0.99)), ids(4))
    with pytest.raises(ValueError, match="shape"):
        policy.update(probs((0, 0.99), (0, 0.99)), ids(0))
    with pytest.raises(ValueError, match="sample_ids"):
        policy.update(probs((0, 0.99)), None)
    with pytest.raises(TypeError, match="softmax"):
        policy.mask(torch.ones(1, 3, dtype=torch.int64))


# -- checkpointing -------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_exactly() -> None:
    policy = FlexMatchThreshold(3, 10, tau=TAU)
    learn_three_steps(policy)
    buffer = io.BytesIO()
    torch.save(policy.state_dict(), buffer)
    buffer.seek(0)
    restored = FlexMatchThreshold(3, 10, tau=TAU)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.memory.tolist() == policy.memory.tolist()
    assert restored.memory.dtype == torch.int8
    assert restored.learning_effect().tolist() == [6, 2, 2]
    torch.testing.assert_close(restored.thresholds(), policy.thresholds(), **EXACT)
    batch, batch_ids = probs((1, 0.99), (2, 0.3), (0, 0.96)), ids(0, 1, 5)
    for a, b in zip(policy.pseudo_label(batch, batch_ids), restored.pseudo_label(batch, batch_ids)):
        assert torch.equal(a, b)
    assert restored.memory.tolist() == policy.memory.tolist()


def test_state_of_another_configuration_is_refused() -> None:
    state = FlexMatchThreshold(3, 10, tau=TAU).state_dict()
    with pytest.raises(ValueError, match="n_samples"):
        FlexMatchThreshold(3, 11, tau=TAU).load_state_dict(state)
    with pytest.raises(ValueError, match="warmup"):
        FlexMatchThreshold(3, 10, tau=TAU, warmup=False).load_state_dict(state)
    with pytest.raises(ValueError, match="policy"):
        FlexMatchThreshold(3, 10).load_state_dict(FixedThreshold().state_dict())


# -- segmentation memory -------------------------------------------------------------------


def test_memory_storage_is_one_byte_per_entry_for_up_to_127_classes() -> None:
    layout = VoxelMemoryLayout([(64, 128, 128)] * 100, stride=4)
    assert layout.n_samples == 100 * 16 * 32 * 32 == 1_638_400
    policy = FlexMatchThreshold(14, layout.n_samples)
    assert policy.memory.dtype == torch.int8
    assert policy.memory_bytes == 1_638_400
    assert memory_dtype(127) == torch.int8
    assert memory_dtype(128) == torch.int16


def test_layout_offsets_follow_each_case_grid() -> None:
    layout = VoxelMemoryLayout([(5, 6, 7), (4, 4, 4)], stride=2)
    assert layout.grid_shapes == [(3, 3, 4), (2, 2, 2)]
    assert layout.offsets == [0, 36, 44]
    assert layout.n_samples == 44


def test_a_crop_maps_to_the_memory_indices_of_its_grid_voxels() -> None:
    layout = VoxelMemoryLayout([(5, 6, 7), (4, 4, 4)], stride=2)
    # case 0, crop z ∈ [1, 4), y ∈ [2, 5), x ∈ [-1, 2) (one padded column):
    # grid voxels z = 2 (gz 1); y = 2, 4 (gy 1, 2); x = 0 (gx 0)
    # indices (1·3 + 1)·4 + 0 = 16 and (1·3 + 2)·4 + 0 = 20; positions = voxel − corner
    indices, positions = layout.crop_indices(0, (1, 2, -1), (3, 3, 3))
    assert indices.tolist() == [16, 20]
    assert positions.tolist() == [[1, 0, 1], [1, 2, 1]]
    id_map = layout.crop_id_map(0, (1, 2, -1), (3, 3, 3))
    assert id_map.shape == (3, 3, 3)
    assert id_map[1, 0, 1] == 16 and id_map[1, 2, 1] == 20
    assert (id_map >= 0).sum() == 2
    # case 1, the whole volume: its 8 entries after case 0's 36, at even positions
    indices, positions = layout.crop_indices(1, (0, 0, 0), (4, 4, 4))
    assert indices.tolist() == list(range(36, 44))
    assert positions.tolist() == [[z, y, x] for z in (0, 2) for y in (0, 2) for x in (0, 2)]
    # a crop entirely in the padding has no entries
    indices, positions = layout.crop_indices(1, (4, 0, 0), (2, 2, 2))
    assert indices.numel() == 0 and positions.shape == (0, 3)


def test_anisotropic_stride() -> None:
    layout = VoxelMemoryLayout([(3, 4, 9)], stride=(1, 2, 3))
    assert layout.grid_shapes == [(3, 2, 3)]
    # crop corner (1, 1, 2), shape (1, 3, 5): z = 1 (gz 1); y = 2 (gy 1); x = 3, 6 (gx 1, 2)
    indices, positions = layout.crop_indices(0, (1, 1, 2), (1, 3, 5))
    assert indices.tolist() == [(1 * 2 + 1) * 3 + 1, (1 * 2 + 1) * 3 + 2]
    assert positions.tolist() == [[0, 1, 1], [0, 1, 4]]


def test_a_segmentation_batch_updates_its_cases_grid_voxels() -> None:
    layout = VoxelMemoryLayout([(4, 4, 4), (4, 4, 4)], stride=2)
    policy = FlexMatchThreshold(2, layout.n_samples, tau=TAU)
    p = torch.zeros(2, 2, 4, 4, 4)
    p[:, 0] = 0.99
    p[1, 0, 2, 2, 2] = 0.01  # case 1's grid voxel (1, 1, 1): class 1
    p[1, 0, 0, 0, 0] = 0.6  # case 1's grid voxel (0, 0, 0): not confident
    p[:, 1] = 1 - p[:, 0]
    sample_ids = torch.stack(
        [layout.crop_id_map(0, (0, 0, 0), (4, 4, 4)), layout.crop_id_map(1, (0, 0, 0), (4, 4, 4))]
    )
    labels, keep = policy.pseudo_label(p, sample_ids)
    assert labels.shape == keep.shape == (2, 4, 4, 4) and keep.all()  # t = 0
    assert policy.memory.tolist() == [0] * 8 + [-1, 0, 0, 0, 0, 0, 0, 1]
    # σ = (14, 1), unused 1: β = (1, 1/14); T(1) = M(1/14)·τ = (1/14)/(27/14)·τ = τ/27
    assert_values(policy.thresholds(), [TAU, TAU / 27])

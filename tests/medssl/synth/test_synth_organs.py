"""The synthetic multi-organ phantom: determinism, anatomy shared across domains,
class imbalance, distinct-but-learnable domains, MR contrast inversion."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from scipy import ndimage

from medssl.synth.organ_anatomy import sample_anatomy
from medssl.synth.organ_raster import rasterise
from medssl.synth.organ_scene import Tissue
from medssl.synth.organs import (
    DOMAINS,
    LABELS,
    OrganCase,
    generate_organ_phantom,
    organ_grid,
)
from medssl.synth.shapes import Canvas, LatticeField

SEED = 3


@pytest.fixture(scope="module")
def cases() -> dict[str, OrganCase]:
    """Subject ``SEED`` in every preset domain, on the domain's default grid."""
    return {name: generate_organ_phantom(SEED, name) for name in DOMAINS}


def _label_means(case: OrganCase) -> dict[int, float]:
    image, label = case.image.array, case.label.array
    return {k: float(image[label == k].mean()) for k in LABELS if np.any(label == k)}


def _interior_centroids(case: OrganCase) -> dict[int, np.ndarray]:
    """LPS centroid (mm) of every label that does not touch the grid's faces."""
    label = case.label.array
    faces = np.zeros(label.shape, dtype=bool)
    faces[[0, -1]] = faces[:, [0, -1]] = faces[:, :, [0, -1]] = True
    out = {}
    for k in LABELS:
        mask = label == k
        if mask.any() and not (mask & faces).any():
            out[k] = case.label.index_to_world(np.argwhere(mask).mean(axis=0))
    return out


def test_same_seed_and_domain_give_identical_cases():
    a = generate_organ_phantom(11, "B", shape=(24, 48, 48))
    b = generate_organ_phantom(11, "B", shape=(24, 48, 48))
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.label.array, b.label.array)
    assert np.array_equal(a.image.affine, b.image.affine)


def test_different_seeds_give_different_subjects():
    a = generate_organ_phantom(1, "A", shape=(32, 64, 64)).label.array
    b = generate_organ_phantom(2, "A", shape=(32, 64, 64)).label.array
    assert not np.array_equal(a, b)


def test_case_has_the_documented_types_grid_and_meta(cases):
    case = cases["A"]
    dom = DOMAINS["A"]
    assert case.image.array.dtype == np.float32 and case.label.array.dtype == np.uint8
    assert case.image.shape == case.label.shape == dom.shape
    assert np.allclose(case.image.spacing, dom.spacing)
    assert np.array_equal(case.image.affine, case.label.affine)
    assert case.image.meta["seed"] == SEED and case.image.meta["domain"] == "A"
    # axial, default direction; the origin is about -FOV/2 in x and y
    assert np.allclose(case.image.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    _, fov_y, fov_x = dom.fov_mm
    assert np.allclose(case.image.origin[:2], [-fov_x / 2, -fov_y / 2], atol=dom.spacing[1])


def test_shape_overrides_grid_size_but_keeps_domain_spacing():
    case = generate_organ_phantom(0, "C", shape=(20, 40, 50))
    assert case.image.shape == (20, 40, 50)
    assert np.allclose(case.image.spacing, DOMAINS["C"].spacing)


def test_labels_are_valid_and_a_default_case_has_many_structures(cases):
    for case in cases.values():
        values = np.unique(case.label.array)
        assert set(values.tolist()) <= {0, *LABELS}
    present = set(np.unique(cases["A"].label.array).tolist()) - {0}
    assert len(present) >= 6
    assert present == set(LABELS)


def test_labels_are_strongly_imbalanced(cases):
    counts = np.bincount(cases["A"].label.array.ravel(), minlength=len(LABELS) + 1)[1:]
    assert counts.min() > 0
    assert counts.max() / counts.min() > 20
    assert LABELS[int(np.argmax(counts)) + 1] == "liver"


def test_anatomy_is_the_same_in_every_domain(cases):
    """Same seed -> same organs at the same LPS positions, whatever the grid."""
    reference = _interior_centroids(cases["A"])
    assert len(reference) >= 6
    for name, case in cases.items():
        centroids = _interior_centroids(case)
        common = set(reference) & set(centroids)
        assert len(common) >= 6, name
        for k in common:
            distance = np.linalg.norm(reference[k] - centroids[k])
            assert distance < 4.0, f"{LABELS[k]} moved {distance:.1f} mm in domain {name}"


def test_anatomy_does_not_depend_on_the_domain_random_stream():
    a = generate_organ_phantom(5, "A").label.array
    same_grid = dataclasses.replace(DOMAINS["A"], name="A-renamed", noise_std=40.0)
    b = generate_organ_phantom(5, same_grid)
    assert np.array_equal(a, b.label.array)
    assert not np.array_equal(generate_organ_phantom(5, "A").image.array, b.image.array)


def test_domains_have_clearly_different_intensities(cases):
    means = {name: _label_means(case) for name, case in cases.items()}
    for a, b in itertools.combinations(DOMAINS, 2):
        common = set(means[a]) & set(means[b])
        largest = max(abs(means[a][k] - means[b][k]) for k in common)
        assert largest > 15.0, f"domains {a} and {b} look alike (max label-mean gap {largest:.1f})"


def test_adjacent_organs_are_separable_by_intensity_in_every_domain():
    """The domains' contrast separates touching organs (a case's own variation aside: see
    the next test)."""
    steady = {
        name: dataclasses.replace(dom, case_intensity_sd=0.0, case_noise_sd=0.0)
        for name, dom in DOMAINS.items()
    }
    cases = {name: generate_organ_phantom(SEED, dom) for name, dom in steady.items()}
    for name, case in cases.items():
        label = case.label.array
        means = _label_means(case)
        touching = set()
        for k in means:
            mask = label == k
            ring = ndimage.binary_dilation(mask) & ~mask
            touching |= {(k, int(j)) for j in np.unique(label[ring]) if j > k}
        assert touching, name
        for a, b in touching:
            gap = abs(means[a] - means[b])
            assert gap > 10.0, f"{name}: {LABELS[a]} vs {LABELS[b]} differ by only {gap:.1f}"


def test_cases_of_one_ct_domain_differ_in_organ_intensity():
    """Between-case variation: the same domain does not give every patient the same liver HU."""

    def liver_hu(domain, seed: int) -> float:
        case = generate_organ_phantom(seed, domain, shape=(16, 64, 64))
        return float(np.median(case.image.array[case.label.array == 1]))

    frozen = dataclasses.replace(DOMAINS["A"], case_intensity_sd=0.0, case_noise_sd=0.0)
    varied, steady = ([liver_hu(d, s) for s in range(10)] for d in ("A", frozen))
    assert np.std(varied) > 2 * np.std(steady)  # anatomy and bias alone move the median ~3 HU


def test_mr_inverts_fat_and_soft_tissue_contrast(cases):
    def fat_and_liver(name: str) -> tuple[float, float]:
        _, axes = organ_grid(name)
        tissue = rasterise(sample_anatomy(SEED), axes).tissue
        # away from edges, so blur does not mix in neighbours
        fat = ndimage.binary_erosion(tissue == Tissue.FAT, iterations=2)
        liver = ndimage.binary_erosion(tissue == Tissue.LIVER, iterations=2)
        image = cases[name].image.array
        return float(image[fat].mean()), float(image[liver].mean())

    ct_fat, ct_liver = fat_and_liver("ct")
    mr_fat, mr_liver = fat_and_liver("mr")
    assert ct_fat < -50.0 < ct_liver
    assert mr_fat > mr_liver > 0
    assert cases["mr"].domain.modality == "MR" and cases["mr"].image.array.min() >= 0


def test_ct_domains_are_in_hounsfield_range(cases):
    for case in cases.values():
        if case.domain.modality == "CT":
            image = case.image.array
            assert image.min() >= -1024 and image.max() <= 3071
            assert np.median(image[:, 0, 0]) < -900  # air in the corners of the field of view


def test_unknown_domain_and_incomplete_contrast_table_are_rejected():
    with pytest.raises(ValueError, match="unknown domain 'E'"):
        generate_organ_phantom(0, "E")
    table = dict(DOMAINS["A"].tissue_intensity)
    del table["liver"]
    with pytest.raises(ValueError, match="missing \\['liver'\\]"):
        dataclasses.replace(DOMAINS["A"], tissue_intensity=table)
    with pytest.raises(ValueError, match="seed"):
        generate_organ_phantom(-1, "A")


def test_lattice_field_is_defined_in_millimetres_not_voxels():
    field = LatticeField.draw(np.random.default_rng(0), (-50, -50, -50), (50, 50, 50), 12.0)
    fine = np.arange(-48.0, 48.1, 2.0)
    coarse = fine[::3]
    on_fine = field.sample(fine, fine, fine)[::3, ::3, ::3]
    assert np.allclose(on_fine, field.sample(coarse, coarse, coarse), atol=1e-5)


def test_canvas_paints_only_onto_allowed_tissues():
    axis = np.arange(4.0)
    canvas = Canvas([axis, axis, axis])
    win = canvas.window((0, 0, 0), (3, 3, 3))
    canvas.paint(win, np.ones((4, 4, 4), bool), Tissue.FAT)
    canvas.paint(win, np.broadcast_to(np.arange(4)[:, None, None] < 2, (4, 4, 4)), Tissue.BONE)
    onto = np.zeros(256, bool)
    onto[Tissue.FAT] = True
    canvas.paint(win, np.ones((4, 4, 4), bool), Tissue.LIVER, 1, onto)
    assert (canvas.tissue[:2] == Tissue.BONE).all() and (canvas.label[:2] == 0).all()
    assert (canvas.tissue[2:] == Tissue.LIVER).all() and (canvas.label[2:] == 1).all()

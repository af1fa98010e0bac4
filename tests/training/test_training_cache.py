"""The preprocessed-volume cache: write once, memory-map after, never reuse stale arrays."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from medssl import Volume, affine_from_geometry
from medssl.pipeline import Intensity, Preparation, prepare
from medssl.training.cache import CachedVolume, VolumeCache

SPACING = 1.5


def _scan() -> Volume:
    """An anisotropic oblique-free HU volume whose voxels all differ."""
    shape = (8, 20, 18)
    values = np.linspace(-1100.0, 500.0, num=int(np.prod(shape)), dtype=np.float32).reshape(shape)
    return Volume(values, affine_from_geometry((-80.0, -100.0, -200.0), (2.5, 0.9, 1.1)))


def _mask() -> Volume:
    scan = _scan()
    labels = np.zeros(scan.shape, dtype=np.int16)
    labels[2:6, 5:15, 4:9] = 1
    labels[2:6, 5:15, 10:15] = 2
    return scan.with_array(labels)


class CountingLoader:
    def __init__(self, make=_scan) -> None:
        self.calls = 0
        self.make = make

    def __call__(self) -> Volume:
        self.calls += 1
        return self.make()


def test_first_get_writes_and_second_get_maps_without_loading(tmp_path):
    cache = VolumeCache(tmp_path, SPACING, Intensity())
    load = CountingLoader()
    first = cache.get("scan-1.2.3", load)
    assert load.calls == 1
    assert cache.path("scan-1.2.3").is_file()
    second = VolumeCache(tmp_path, SPACING, Intensity()).get("scan-1.2.3", load)
    assert load.calls == 1
    for cached in (first, second):
        assert isinstance(cached, CachedVolume)
        assert isinstance(cached.array, np.memmap) and cached.array.dtype == np.float32
        assert not cached.array.flags.writeable
    assert np.array_equal(first.array, second.array)
    sidecar = json.loads(cache.path("scan-1.2.3").with_suffix(".json").read_text())
    assert sidecar["shape"] == list(first.shape)
    assert np.allclose(sidecar["source_spacing"], [2.5, 0.9, 1.1])
    assert not list(cache.dir.rglob(".*"))  # no temp files left behind


def test_cached_array_and_geometry_match_prepare(tmp_path):
    cached = VolumeCache(tmp_path, SPACING, Intensity()).get("s", _scan)
    expected = prepare(_scan(), Preparation(SPACING, Intensity()))
    assert cached.shape == expected.shape
    assert np.array_equal(np.asarray(cached.array), expected.array)
    assert np.allclose(cached.affine, expected.affine)
    assert np.allclose(cached.spacing, SPACING)
    assert cached.array.min() >= -1.0 and cached.array.max() <= 1.0
    idx = np.array([[0, 0, 0], [3, 4, 5], [cached.shape[0] - 1, 1, 2]], dtype=float)
    world = expected.index_to_world(idx)
    assert np.allclose(cached.world_to_index(world), idx)
    assert np.allclose(cached.index_to_world(idx), world)
    vol = cached.to_volume()
    assert isinstance(vol, Volume) and np.allclose(vol.world_to_index(world), idx)


def test_changed_preprocessing_gets_its_own_file(tmp_path):
    load = CountingLoader()
    lung = VolumeCache(tmp_path, SPACING, Intensity()).get("s", load)
    soft_cache = VolumeCache(tmp_path, SPACING, Intensity(hu_min=-160.0, hu_max=240.0))
    soft = soft_cache.get("s", load)
    fine_cache = VolumeCache(tmp_path, 1.0, Intensity())
    fine = fine_cache.get("s", load)
    assert load.calls == 3
    hashes = {VolumeCache(tmp_path, SPACING, Intensity()).hash, soft_cache.hash, fine_cache.hash}
    assert len(hashes) == 3
    assert not np.array_equal(np.asarray(lung.array), np.asarray(soft.array))
    assert fine.shape != lung.shape
    params = json.loads((soft_cache.dir / "params.json").read_text())
    assert params["intensity"]["hu_min"] == -160.0


def test_corrupt_entry_is_rebuilt(tmp_path):
    cache = VolumeCache(tmp_path, SPACING, Intensity())
    load = CountingLoader()
    good = np.asarray(cache.get("s", load).array).copy()
    npy = cache.path("s")
    npy.write_bytes(npy.read_bytes()[:200])  # truncated, e.g. by a full disk
    rebuilt = cache.get("s", load)
    assert load.calls == 2 and np.array_equal(np.asarray(rebuilt.array), good)
    npy.write_bytes(b"garbage")
    assert np.array_equal(np.asarray(cache.get("s", load).array), good) and load.calls == 3
    npy.with_suffix(".json").write_text("{not json")
    assert np.array_equal(np.asarray(cache.get("s", load).array), good) and load.calls == 4


def test_racing_workers_both_get_the_same_array(tmp_path):
    cache = VolumeCache(tmp_path, SPACING, Intensity())
    barrier = threading.Barrier(2)
    results: list[np.ndarray] = []

    def slow_scan() -> Volume:
        barrier.wait(timeout=10)  # both workers miss before either writes
        return _scan()

    def worker() -> None:
        results.append(np.asarray(cache.get("s", slow_scan).array).copy())

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 2 and np.array_equal(results[0], results[1])
    names = sorted(p.name for p in cache.dir.iterdir())
    assert names == ["masks", "params.json", "s.json", "s.npy"]


def test_mask_is_uint8_on_the_image_grid(tmp_path):
    cache = VolumeCache(tmp_path, SPACING, Intensity())
    image = cache.get("s", _scan)
    load = CountingLoader(_mask)
    mask = cache.get_mask("s", load)
    cache.get_mask("s", load)
    assert load.calls == 1
    assert isinstance(mask.array, np.memmap) and mask.array.dtype == np.uint8
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    expected = _mask().resample(SPACING, "nearest")
    assert np.array_equal(np.asarray(mask.array), expected.array.astype(np.uint8))
    assert set(np.unique(mask.array)) == {0, 1, 2}


def test_mask_validation(tmp_path):
    cache = VolumeCache(tmp_path, SPACING, Intensity())
    cache.get("s", _scan)
    with pytest.raises(ValueError, match="0..255"):
        cache.get_mask("s", lambda: _mask().with_array(_mask().array * 300))
    cropped = Volume(_mask().array[:, :10], _mask().affine)
    with pytest.raises(ValueError, match="not on the scan's grid"):
        cache.get_mask("s", lambda: cropped)


def test_bad_keys_and_arguments_are_rejected(tmp_path):
    cache = VolumeCache(tmp_path, SPACING, Intensity())
    for key in ["../escape", "a/b", "", ".hidden"]:
        with pytest.raises(ValueError, match="cache key"):
            cache.get(key, _scan)
    with pytest.raises(TypeError, match="must return a Volume"):
        cache.get("s", lambda: np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="spacing_mm"):
        VolumeCache(tmp_path, 0.0, Intensity())

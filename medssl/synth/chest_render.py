"""The slab renderer of the synthetic chest CT: a prepared :class:`Scene` painted in HU.

A :class:`Scene` holds everything drawn for one scan (anatomy, grid, scanner,
tubes, lesions, the lung texture and the noise bank; every random draw done);
:func:`render` paints it into ``scene.out`` in z-slabs on a few threads, so the
output does not depend on the threading. Partial volume, the reconstruction
kernel and the noise model are described in :mod:`medssl.synth.chest`.

Painting order, each layer blending towards its HU over the ones before: the
body (skin and fat, chest-wall muscle, the cavity, the abdomen; ribs, sternum,
scapulae), the gastric bubble, the spine, the clavicles; the lung coverage,
the heart and mediastinal vessels carved out of it, the lung parenchyma with
its texture, pulmonary vessels, airways, scars, lesions; then the reconstruction
kernel, the patient table, noise, and the stored HU range.

Frames: arrays are indexed ``(z, y, x)`` (``z`` head-ward, ``y`` posterior,
``x`` to the patient's left); world points are LPS ``(x, y, z)`` mm.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medssl.synth.chest_anatomy import (
    AIRWAY_WALL,
    HEART_FAT_MM,
    MEDIASTINAL_FAT_MM,
    ChestAnatomy,
    ScanGrid,
    Tubes,
    blend,
    cover,
    ramp,
    round_coverage,
    tube_field,
)
from medssl.synth.chest_scanner import Scanner
from medssl.synth.nodules import Lesion, paint_lesion
from medssl.synth.primitives import kernel_blur, kernel_reach_mm

__all__ = ["Scene", "Texture", "body_and_lung_boxes", "render"]

_F32 = np.float32

#: Voxels per render slab (a few MB per array keeps the work in cache).
SLAB_VOXELS = 1 << 21


def body_and_lung_boxes(
    anatomy: ChestAnatomy,
    grid: ScanGrid,
) -> tuple[tuple[slice, slice], tuple[slice, slice, slice] | None]:
    """Index boxes of the body and of the lungs on ``grid``.

    Returns:
        ``(body_box, lung_region)``: ``(y, x)`` index slices holding the body on
        every slice, and ``(z, y, x)`` index slices holding the lungs within the
        body box (None if the lungs miss the grid).
    """
    blo, bhi = anatomy.body_box()
    glo, ghi = grid.box()
    body = grid.index_slices(np.append(blo, glo[2]), np.append(bhi, ghi[2]))
    if body is None:
        raise ValueError(
            f"the body's LPS (x, y) box {blo.tolist()}..{bhi.tolist()} mm misses the scan grid "
            f"{glo.tolist()}..{ghi.tolist()} mm: centre the field of view on the body"
        )
    _, body_y, body_x = body
    lo, hi = anatomy.lung_box()
    region = grid.index_slices(lo, hi)
    if region is not None:  # the lungs lie in the body
        ys = slice(max(region[1].start, body_y.start), min(region[1].stop, body_y.stop))
        xs = slice(max(region[2].start, body_x.start), min(region[2].stop, body_x.stop))
        region = (region[0], ys, xs) if ys.stop > ys.start and xs.stop > xs.start else None
    return (body_y, body_x), region


def render(scene: Scene, workers: int) -> None:
    """Render every slice of ``scene`` into ``scene.out``, in z-slabs on ``workers`` threads.

    A slab holds about :data:`SLAB_VOXELS` voxels and at most ``ceil(Z / workers)``
    slices; the output is bit-identical for any ``workers >= 1``.
    """
    n_z, n_y, n_x = scene.grid.shape
    step = max(1, min(round(SLAB_VOXELS / (n_y * n_x)), math.ceil(n_z / workers)))
    slabs = [slice(a, min(a + step, n_z)) for a in range(0, n_z, step)]
    if workers == 1 or len(slabs) == 1:
        for zs in slabs:
            _render_slab(scene, zs)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda zs: _render_slab(scene, zs), slabs))


@dataclass(frozen=True)
class _TubeSet:
    """Tubes in the field of view, how to draw them, and how far each reaches (mm).

    ``layers``: ``(radius_scale, radius_offset_mm, hu, raise_only)``, drawn in
    order; a layer's radius is ``r * scale + offset``. ``carve``: if set, the
    tubes plus this much fat are also taken out of the lungs.
    """

    tubes: Tubes
    pad: np.ndarray
    layers: tuple[tuple[float, float, float, bool], ...]
    carve: float | None = None

    @staticmethod
    def build(
        tubes: Tubes,
        grid: ScanGrid,
        layers: tuple[tuple[float, float, float, bool], ...],
        carve: float | None = None,
    ) -> _TubeSet:
        grow = max(scale for scale, _, _, _ in layers)
        extra = max(offset for _, offset, _, _ in layers) + grid.reach + (carve or 0.0)
        pad = np.maximum(tubes.r0, tubes.r1) * grow + extra
        lo, hi = grid.box()
        lo[2] -= grid.motion_mm
        hi[2] += grid.motion_mm
        keep = np.all(
            (np.maximum(tubes.start, tubes.end) + pad[:, None] >= lo)
            & (np.minimum(tubes.start, tubes.end) - pad[:, None] <= hi),
            axis=1,
        )
        kept = Tubes(*(getattr(tubes, f)[keep] for f in ("start", "end", "r0", "r1", "clipped")))
        return _TubeSet(kept, pad[keep], layers, carve)

    def boxes(self, grid: ScanGrid, zs: slice) -> tuple[np.ndarray, np.ndarray]:
        """Segments reaching slab ``zs``: their indices ``(n,)`` and index boxes ``(n, 6)``

        ``(z0, z1, y0, y1, x0, x1)`` (slab-local z, ends exclusive) around just the
        part of each axis within reach of the slab.
        """
        t = self.tubes
        levels = grid.axes(zs)[2].astype(np.float64)  # shown levels (breathing shift)
        half = 0.5 * grid.spacing[0]
        z_lo, z_hi = float(levels.min()) - half, float(levels.max()) + half
        a, d, pad = t.start, t.end - t.start, self.pad
        flat = np.abs(d[:, 2]) < 1e-9
        dz = np.where(flat, 1.0, d[:, 2])
        t1 = (z_lo - pad - a[:, 2]) / dz
        t2 = (z_hi + pad - a[:, 2]) / dz
        lo_t = np.where(flat, 0.0, np.clip(np.minimum(t1, t2), 0.0, 1.0))
        hi_t = np.where(flat, 1.0, np.clip(np.maximum(t1, t2), 0.0, 1.0))
        reach = np.where(
            flat,
            np.abs(a[:, 2] - 0.5 * (z_lo + z_hi)) <= pad + 0.5 * (z_hi - z_lo),
            (np.maximum(t1, t2) >= 0.0) & (np.minimum(t1, t2) <= 1.0),
        )
        p, q = a + lo_t[:, None] * d, a + hi_t[:, None] * d
        first = np.ceil(grid.to_index(np.minimum(p, q) - pad[:, None]) - 1e-9)
        last = np.floor(grid.to_index(np.maximum(p, q) + pad[:, None]) + 1e-9) + 1
        if grid.z_shift:  # a slice shows a level up to the largest shift off its own
            slack = math.ceil(grid.motion_mm / grid.spacing[0])
            first[:, 0] -= slack
            last[:, 0] += slack
        top = np.array([zs.stop, grid.shape[1], grid.shape[2]])
        first = np.clip(first, [zs.start, 0, 0], top).astype(int)
        last = np.clip(last, [zs.start, 0, 0], top).astype(int)
        reach &= np.all(last > first, axis=1)
        first[:, 0] -= zs.start
        last[:, 0] -= zs.start
        idx = np.flatnonzero(reach)
        return idx, np.stack(
            [first[idx, 0], last[idx, 0], first[idx, 1], last[idx, 1], first[idx, 2], last[idx, 2]],
            axis=1,
        )


@dataclass
class Scene:
    """Everything drawn for one scan, prepared before rendering (all random draws done).

    Made by :meth:`build`. ``out`` receives what :func:`render` draws, each
    ``grid.shape`` ``(Z, Y, X)``: ``"image"`` float32 HU, ``"lung"`` bool lung mask,
    ``"nodules"`` uint8 nodule labels.
    """

    anatomy: ChestAnatomy
    grid: ScanGrid
    scanner: Scanner
    maps: dict[str, np.ndarray]
    body_box: tuple[slice, slice]  # (y, x) index ranges holding the body
    body_maps: dict[str, np.ndarray]  # the in-plane maps cropped to the body box
    blur_box: tuple[slice, slice]  # the body box and the kernel's reach
    table_rows: slice
    table: np.ndarray  # (1, rows, X) HU above air, blurred
    lung_region: tuple[slice, slice, slice] | None
    texture: Texture | None
    tubes: list[_TubeSet]
    mediastinal: _TubeSet
    lesions: list[Lesion]
    noise_bank: np.ndarray
    noise_pick: np.ndarray  # (Z, 3): bank slice, row offset, column offset
    out: dict[str, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def build(
        anatomy: ChestAnatomy,
        grid: ScanGrid,
        scanner: Scanner,
        body_box: tuple[slice, slice],
        lung_region: tuple[slice, slice, slice] | None,
        texture: Texture | None,
        vessels: Tubes,
        airways: Tubes,
        lesions: list[Lesion],
        noise_bank: np.ndarray,
        noise_pick: np.ndarray,
        *,
        scars: Tubes | None = None,
        scar_hu: float = 0.0,
    ) -> Scene:
        """Prepare a scene (no random draws) and allocate its outputs.

        Args:
            anatomy, grid, scanner: the patient, the scan grid and the acquisition.
            body_box, lung_region: index boxes from :func:`body_and_lung_boxes`.
            texture: the lung texture over ``lung_region``; None if there is none.
            vessels, airways: pulmonary vessels (with any confuser crossings) and
                airways, LPS mm.
            lesions: nodules and confusers, painted in order.
            scars: band-like scars (lung-clipped tubes) raising the lung to ``scar_hu``.
            noise_bank: float HU noise ``(B, Y + s, X + s)``, ``s`` the largest shift.
            noise_pick: int ``(Z, 3)``: each slice's bank slice, row and column offset.
        """
        hu = anatomy.hu
        body_y, body_x = body_box
        _, n_y, n_x = grid.shape
        wall, marrow = (*AIRWAY_WALL, hu.muscle, True), (1.0, 0.0, -1000.0, False)
        bone = ((1.0, 0.0, hu.cortical, False), (1.0, -1.5, hu.cancellous, False))
        maps = _inplane_maps(anatomy, grid)
        margin = (
            int(np.ceil(kernel_reach_mm(scanner.kernel_fwhm, scanner.edge_enhance) / scanner.pixel))
            + 1
        )
        blur_y = slice(max(body_y.start - margin, 0), min(body_y.stop + margin, n_y))
        blur_x = slice(max(body_x.start - margin, 0), min(body_x.stop + margin, n_x))
        table_rows, table = _table(anatomy, grid, scanner)
        return Scene(
            anatomy=anatomy,
            grid=grid,
            scanner=scanner,
            maps=maps,
            body_box=(body_y, body_x),
            blur_box=(blur_y, blur_x),
            table_rows=table_rows,
            table=table,
            lung_region=lung_region,
            texture=texture,
            body_maps={
                k: np.ascontiguousarray(v[:, body_y, body_x])
                for k, v in maps.items()
                if v.shape[1:] == grid.shape[1:]
            },
            tubes=[
                _TubeSet.build(vessels, grid, ((1.0, 0.0, hu.vessel, False),)),
                _TubeSet.build(airways, grid, (wall, marrow)),
                _TubeSet.build(anatomy.clavicles, grid, bone),
                _TubeSet.build(
                    scars if scars is not None else Tubes.concat([]),
                    grid,
                    ((1.0, 0.0, scar_hu, True),),
                ),
            ],
            mediastinal=_TubeSet.build(
                anatomy.mediastinal, grid, ((1.0, 0.0, hu.blood, False),), MEDIASTINAL_FAT_MM
            ),
            lesions=lesions,
            noise_bank=noise_bank,
            noise_pick=noise_pick,
            out={
                "image": np.empty(grid.shape, dtype=_F32),
                "lung": np.empty(grid.shape, dtype=bool),
                "nodules": np.zeros(grid.shape, dtype=np.uint8),
            },
        )


@dataclass(frozen=True)
class Texture:
    """A smooth random field over the lung region of the grid, unit variance, float32.

    Drawn on a coarse grid aligned with the scan grid (every ``factor``-th
    pixel in-plane from the region's first, every ``step_z`` mm along z from
    ``z0``) and sampled by linear interpolation.
    """

    values: np.ndarray  # (nz, ny, nx) coarse, float32
    factor: int
    z0: float
    step_z: float
    shape_yx: tuple[int, int]

    @staticmethod
    def draw(
        rng: np.random.Generator, grid: ScanGrid, region: tuple[slice, slice, slice], step_mm: float
    ) -> Texture:
        """Draw a texture over the index box ``region`` ``(z, y, x)``; coarse step ``step_mm``."""
        zs, ys, xs = region
        factor = max(1, round(step_mm / grid.spacing[1]))
        ny, nx = ys.stop - ys.start, xs.stop - xs.start
        z = grid.axes(zs)[2].ravel()
        n_z = int(np.ceil(float(z.max() - z.min()) / step_mm)) + 2
        shape = (n_z, -(-ny // factor) + 1, -(-nx // factor) + 1)
        values = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=_F32), 1.0, mode="wrap")
        values /= max(float(values.std()), 1e-6)
        return Texture(values, factor, float(z.min()), step_mm, (ny, nx))

    def sample(self, z: np.ndarray) -> np.ndarray:
        """Values ``(nz, ny, nx)`` over the region at LPS levels ``z`` ``(nz, 1, 1)``."""
        u = (z.ravel().astype(np.float64) - self.z0) / self.step_z
        i0 = np.clip(np.floor(u).astype(np.intp), 0, len(self.values) - 2)
        w = np.clip(u - i0, 0.0, 1.0).astype(_F32)[:, None, None]
        out = self.values[i0] * (1 - w) + self.values[i0 + 1] * w
        ny, nx = self.shape_yx
        return _upsample(_upsample(out, 1, self.factor)[:, :ny], 2, self.factor)[:, :, :nx]


def _upsample(a: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Linear interpolation by an integer ``factor`` along ``axis`` (1 or 2) of a 3D array."""
    if factor == 1:
        return a
    w = np.arange(factor, dtype=_F32) / _F32(factor)
    if axis == 1:
        lo, step = a[:, :-1, None, :], np.diff(a, axis=1)[:, :, None, :]
        out = lo + step * w[:, None]
        return out.reshape(a.shape[0], -1, a.shape[2])
    lo, step = a[:, :, :-1, None], np.diff(a, axis=2)[:, :, :, None]
    return (lo + step * w).reshape(a.shape[0], a.shape[1], -1)


def _inplane_maps(anatomy: ChestAnatomy, grid: ScanGrid) -> dict[str, np.ndarray]:
    """z-invariant maps over the grid's plane, ``(1, Y, X)`` (``lung_hu``: ``(1, Y, 1)``):

    wall depths, diaphragm height, mediastinum, tissue HU, ribs, sternum, scapulae, spine.
    """
    x, y, _ = grid.axes(slice(0, 1))
    sx = grid.spacing_xyz[0]
    an = anatomy
    fat, cav = an.wall_depths(x, y)
    theta = an.rib_angle(x, y)
    u = np.clip((theta - RIB_HEAD) / (np.pi - RIB_HEAD), 0.0, 1.0)
    # ribs run level from the spine, drop steeply round the side, level again in front
    steep = np.tanh(np.pi / 2 / RIB_TURN)
    front = 0.5 * (np.tanh((theta - np.pi / 2) / RIB_TURN) + steep) / steep
    maps = {
        "fat_depth": fat,
        "cav_depth": cav,
        "shoulder_weight": an.shoulder_wall(x, y, an.zc)[1],
        "diaphragm": an.diaphragm_z(x, y),
        "medial": ramp(an.medial_depth(x, y), sx),
        "front": (np.abs(x - _F32(an.xm)) < STERNUM[0] * an.size + grid.reach) & (y < an.cy),
        # scapulae: mm along the body's surface from the blade's centre line
        "blade": ((theta - _F32(an.scapula[2])) * _F32(0.9 * an.body_a)).astype(_F32),
        "abdomen_hu": np.where(x - _F32(an.xm) < 30 * an.size, an.hu.liver, an.hu.abdomen).astype(
            _F32
        )
        + np.zeros_like(y),
        "lung_hu": (
            an.hu.lung
            + an.hu.lung_gradient * (y - _F32(an.cy)) / _F32(an.body_b_ant + an.body_b_post)
        ).astype(_F32),
        # ribs: angle around the body, phase along z (rib k where it is near k), half-sizes
        "rib_theta": theta,
        "rib_phase": ((an.rib_z1 - an.rib_drop * front) / an.pitch).astype(_F32),
        "rib_hz": (an.size * (6.0 + 1.0 * u)).astype(_F32),
        "rib_hr": (an.size * (3.2 - 1.0 * u)).astype(_F32),
    }
    # spine: vertebral body (outer, inner), neural arch, canal, spinous and transverse processes
    rx, ry = an.vb_r
    dx, dy = x - _F32(an.xm), y - _F32(an.vb_y)
    g = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    d_body = (g - 1) * _F32(min(rx, ry))
    canal_y = ry + 9 * an.size
    rc = np.sqrt(dx * dx + (dy - _F32(canal_y)) ** 2)
    r_canal, r_arch = 7.5 * an.size, 14.0 * an.size
    maps.update(
        vb_outer=ramp(-d_body, sx),
        vb_inner=ramp(-(d_body + _F32(1.5)), sx),
        arch=ramp(r_arch - rc, sx) * ramp(dy - _F32(ry - 4), sx),
        canal=ramp(r_canal - rc, sx),
        spinous=ramp(
            1
            - np.sqrt(
                (dx / (4 * an.size)) ** 2
                + ((dy - _F32(canal_y + 22 * an.size)) / (12 * an.size)) ** 2
            ),
            sx / (4 * an.size),
        ),
        transverse=ramp(
            1
            - np.sqrt(
                ((np.abs(dx) - _F32(28 * an.size)) / (14 * an.size)) ** 2
                + ((dy - _F32(canal_y - 2)) / (6 * an.size)) ** 2
            ),
            sx / (6 * an.size),
        ),
    )
    return maps


#: Angle (radians from the posterior midline) where ribs leave the spine, and where the bone,
#: then the costal cartilage, of ribs 1-12 ends.
RIB_HEAD = 0.12 * np.pi
RIB_TURN = 0.35  # radians over which a rib turns from level to its steepest, at the side
RIB_BONE_END = np.pi * np.array(
    [0.55, 0.74, 0.76, 0.77, 0.77, 0.76, 0.74, 0.72, 0.68, 0.6, 0.5, 0.42], dtype=_F32
)
RIB_CARTILAGE_END = np.pi * np.array(
    [0.9, 0.93, 0.93, 0.93, 0.93, 0.92, 0.9, 0.86, 0.8, 0.72, 0.5, 0.42], dtype=_F32
)
RIB_CORTEX_MM = 1.2
#: Sternum half-width, depth of its centre outside the cavity and half-thickness, mm (x size).
STERNUM = (14.0, 6.0, 5.0)
#: Scapular blade: depth of its centre outside the cavity and half-thickness, mm (x size).
SCAPULA = (16.0, 2.2)


def _sub(
    grid: ScanGrid,
    zs: slice,
    lo: np.ndarray,
    hi: np.ndarray,
) -> tuple[tuple[slice, slice, slice], tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """Slab-local index slices and world axes of the LPS box ``[lo, hi]`` within slab ``zs``."""
    box = grid.index_slices(lo, hi)
    if box is None:
        return None
    bz = slice(max(box[0].start, zs.start), min(box[0].stop, zs.stop))
    if bz.stop <= bz.start:
        return None
    local = (slice(bz.start - zs.start, bz.stop - zs.start), box[1], box[2])
    return local, grid.axes(bz, box[1], box[2])


def _paint_tubes(
    scene: Scene,
    zs: slice,
    image: np.ndarray,
    lung: np.ndarray | None,
    ts: _TubeSet,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """Draw the tubes of ``ts`` into slab ``zs`` (and carve them out of the lungs if asked).

    ``lung``: the slab's lung coverage; None before the lungs exist (then no
    tube may be clipped to, or carved from, them). ``axes``: the slab's open
    LPS axes ``x, y, z``.
    """
    grid, t = scene.grid, ts.tubes
    ax, ay, az = axes
    idx, boxes = ts.boxes(grid, zs)
    thick = max(grid.spacing_xyz) * 1.5
    for k, (z0, z1, y0, y1, x0, x1) in zip(idx, boxes):
        local = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        x, y, z = ax[:, :, x0:x1], ay[:, y0:y1], az[z0:z1]
        dist, radius, width = tube_field(
            x, y, z, t.start[k], t.end[k], t.r0[k], t.r1[k], grid.spacing_xyz
        )
        img = image[local]
        lung_sub = lung[local] if lung is not None else None
        for scale, offset, hu, raise_only in ts.layers:
            r_min = min(t.r0[k], t.r1[k]) * scale + offset
            layer = radius * _F32(scale) + _F32(offset) if (scale, offset) != (1.0, 0.0) else radius
            # a thick tube has a single edge
            occ = ramp(layer - dist, width) if r_min > thick else round_coverage(dist, layer, width)
            if t.clipped[k]:
                occ *= lung_sub
            if raise_only:
                rise = np.subtract(_F32(hu), img, dtype=_F32)
                np.maximum(rise, 0.0, out=rise)
                rise *= occ
                img += rise
            else:
                blend(img, occ, hu)
        if ts.carve is not None:
            if lung_sub is None:
                raise ValueError("these tubes carve the lungs: paint them after the lungs")
            np.minimum(lung_sub, ramp(dist - radius - _F32(ts.carve), width), out=lung_sub)


def _paint_spine(scene: Scene, zs: slice, image: np.ndarray, z: np.ndarray) -> None:
    """Vertebral bodies and discs, neural arches, canal, spinous and transverse processes."""
    an, maps, hu = scene.anatomy, scene.maps, scene.anatomy.hu
    s, pitch = an.size, an.pitch
    _rx, ry = an.vb_r
    lo = np.array([an.xm - 50 * s, an.vb_y - ry - 4, -np.inf])
    hi = np.array([an.xm + 50 * s, an.vb_y + ry + 60 * s, np.inf])
    box = scene.grid.index_slices(lo, hi)
    if box is None:
        return
    _, ys, xs = box
    img = image[:, ys, xs]
    sz = scene.grid.spacing[0]
    phase = (z - _F32(an.rib_z1)) / _F32(pitch)
    delta = np.abs(phase - np.rint(phase)) * _F32(pitch)  # mm to the nearest vertebra centre
    spin = phase + _F32(0.35)
    spin = np.abs(spin - np.rint(spin)) * _F32(pitch)
    bone = 0.6 * hu.cortical + 0.4 * hu.cancellous
    outer = maps["vb_outer"][:, ys, xs]
    blend(img, outer, hu.disc)
    blend(img, outer * ramp(_F32(0.4 * pitch) - delta, sz), hu.cortical)
    blend(
        img, maps["vb_inner"][:, ys, xs] * ramp(_F32(0.4 * pitch - 1.5) - delta, sz), hu.cancellous
    )
    blend(img, maps["arch"][:, ys, xs] * ramp(_F32(0.38 * pitch) - delta, sz), bone)
    blend(img, maps["transverse"][:, ys, xs] * ramp(_F32(0.2 * pitch) - delta, sz), bone)
    blend(img, maps["spinous"][:, ys, xs] * ramp(_F32(0.25 * pitch) - spin, sz), bone)
    blend(img, maps["canal"][:, ys, xs], 20.0)


def _paint_chest_wall(
    scene: Scene, image: np.ndarray, cavity_dist: np.ndarray, x: np.ndarray, z: np.ndarray
) -> None:
    """Ribs 1-12 (cortex and marrow, then costal cartilage), sternum and scapulae: the chest wall.

    Rib ``k`` lies where the phase ``(z1 - drop(angle) - z) / pitch`` is near ``k``; the
    drop is steepest at the side (:data:`RIB_TURN`). A rib's cross-section is an
    ellipse in (z, depth outside the cavity); the sternum's one in (x, depth), a
    scapula's one in (distance along the body's surface, depth).
    Only the columns near the cavity's surface are computed (gathered, drawn,
    scattered back).

    Args:
        image, cavity_dist: contiguous ``(nz, ny, nx)`` HU and distance outside the cavity (mm)
            over the body box; ``x`` ``(1, 1, nx)``, ``z`` ``(nz, 1, 1)`` its LPS axes.
    """
    an, maps, hu = scene.anatomy, scene.body_maps, scene.anatomy.hu
    sx, _, sz = scene.grid.spacing_xyz
    nz = image.shape[0]
    reach = (
        max(
            2.0 * float(maps["rib_hr"].max()) + 1.5,
            STERNUM[1] + STERNUM[2],
            SCAPULA[0] + SCAPULA[1],
        )
        * an.size
    )
    near = (cavity_dist > -2 * sx) & (cavity_dist < reach + scene.grid.reach)
    cols = np.flatnonzero(near.any(axis=0))
    if len(cols) == 0:
        return

    def gather(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a, (a.shape[0], *image.shape[1:])).reshape(a.shape[0], -1)[:, cols]

    img, dist = gather(image), gather(cavity_dist)
    theta, hz, hr = gather(maps["rib_theta"]), gather(maps["rib_hz"]), gather(maps["rib_hr"])
    phi = gather(maps["rib_phase"]) - z.reshape(nz, 1) / _F32(an.pitch)
    k = np.rint(phi)
    phi -= k
    phi *= _F32(an.pitch)  # mm from the rib's centre along z
    index = np.clip(k, 0, len(RIB_BONE_END) - 1).astype(np.intp)
    rib = (k >= 0) & (k < len(RIB_BONE_END)) & (theta > RIB_HEAD)
    bone = rib & (theta < RIB_BONE_END[index])
    rib &= theta < RIB_CARTILAGE_END[index]
    _paint_bone(
        img,
        phi,
        dist - (hr + _F32(1.5)),
        hz,
        hr,
        (sz, sx),
        rib,
        bone,
        hu.cortical,
        hu.cartilage,
        hu.cancellous,
    )

    def flat_bone(
        where: np.ndarray,
        across: np.ndarray,
        top: float,
        bottom: float,
        half_w: float,
        depth: float,
        half_t: float,
    ) -> None:
        """A bone of section ``2 half_w`` x ``2 half_t`` mm (across x depth), ``depth`` mm

        outside the cavity, in the gathered columns ``where`` between levels ``bottom``, ``top``.
        """
        sel = np.flatnonzero(where)
        along = (z.reshape(nz, 1) > _F32(bottom)) & (z.reshape(nz, 1) < _F32(top))
        if len(sel) == 0 or not along.any():
            return
        sub = img[:, sel]
        _paint_bone(
            sub,
            np.broadcast_to(across[:, sel], sub.shape),
            dist[:, sel] - _F32(depth),
            _F32(half_w),
            _F32(half_t),
            (sx, sx),
            along,
            along,
            hu.cortical,
            hu.cortical,
            hu.cancellous,
        )
        img[:, sel] = sub

    # the sternum, manubrium to xiphoid, in the anterior wall on the midline
    half_w, depth, half_t = (v * an.size for v in STERNUM)
    flat_bone(
        gather(maps["front"])[0], gather(x) - _F32(an.xm), *an.sternum_z, half_w, depth, half_t
    )
    # the scapulae: thin curved blades behind the posterolateral ribs, upper chest
    top, bottom, _, half_w = an.scapula
    blade = gather(maps["blade"])
    depth, half_t = (v * an.size for v in SCAPULA)
    flat_bone(np.abs(blade[0]) < _F32(half_w + sx), blade, top, bottom, half_w, depth, half_t)
    image.reshape(nz, -1)[:, cols] = img


def _paint_bone(
    img: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    ha: np.ndarray,
    hb: np.ndarray,
    widths: tuple[float, float],
    present: np.ndarray,
    bone: np.ndarray,
    cortical: float,
    other: float,
    marrow: float,
) -> None:
    """Blend an elliptic bone section, semi-axes ``ha``, ``hb`` (mm) in local coordinates

    ``a``, ``b`` (mm), with voxel extents ``widths`` along them: a cortex where
    ``bone`` (else ``other`` HU, e.g. cartilage) and marrow inside, where ``present``.
    """
    u, v = np.abs(a / ha), np.abs(b / hb)
    e = np.sqrt(u * u + v * v)
    width = (u * _F32(widths[0]) + v * _F32(widths[1])) / np.maximum(e, _F32(1e-3))
    np.maximum(width, _F32(min(widths)), out=width)
    e -= _F32(1.0)
    e *= np.minimum(ha, hb)  # ~ distance outside the bone, mm
    outer = ramp(-e, width)
    outer *= present
    blend(img, outer, np.where(bone, _F32(cortical), _F32(other)))
    e += _F32(RIB_CORTEX_MM)
    inner = ramp(-e, width)
    inner *= bone
    blend(img, inner, marrow)


def _table(
    anatomy: ChestAnatomy,
    grid: ScanGrid,
    scanner: Scanner,
) -> tuple[slice, np.ndarray]:
    """The patient table under the back, carbon-fibre plates around a foam core, as seen

    through the reconstruction kernel: ``(rows, hu_above_air)``, the rows it spans
    and its HU minus air's there, ``(1, rows, X)``, the same on every slice.
    """
    x, y, _ = grid.axes(slice(0, 1))
    sx = grid.spacing_xyz[0]
    top = _F32(anatomy.back_y + 1.0) - _F32(6e-4) * x * x  # curves up at the sides
    depth = y - top
    across = ramp(_F32(230.0) - np.abs(x), sx)
    plate = ramp(np.minimum(depth, 3.0 - depth), sx) + ramp(
        np.minimum(depth - 33.0, 36.0 - depth), sx
    )
    core = ramp(np.minimum(depth - 3.0, 33.0 - depth), sx)
    hu = (plate * _F32(200.0 + 1000.0) + core * _F32(-900.0 + 1000.0)) * across
    hu = kernel_blur(hu, scanner.kernel_fwhm, grid.spacing, edge_enhance=scanner.edge_enhance)
    rows = np.flatnonzero(np.abs(hu).max(axis=(0, 2)) > 1e-3)
    sl = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) else slice(0, 0)
    return sl, np.ascontiguousarray(hu[:, sl], dtype=_F32)


def _paint_bubble(scene: Scene, zs: slice, image: np.ndarray) -> None:
    """Gas over fluid in the gastric fundus, under the left dome."""
    an = scene.anatomy
    if an.gastric_bubble is None:
        return
    cx, cy, cz, r = an.gastric_bubble
    c = np.array([cx, cy, cz])
    found = _sub(scene.grid, zs, c - r - scene.grid.reach, c + r + scene.grid.reach)
    if found is None:
        return
    (bz, by, bx), (x, y, z) = found
    sx, _, sz = scene.grid.spacing_xyz
    rho = np.sqrt((x - _F32(cx)) ** 2 + (y - _F32(cy)) ** 2 + (z - _F32(cz)) ** 2)
    occ = ramp(_F32(r) - rho, sx) * cover(z - scene.maps["diaphragm"][:, by, bx], sz)
    img = image[bz, by, bx]
    blend(img, occ, 20.0)
    blend(img, occ * ramp(z - _F32(cz - 0.3 * r), sz), -1000.0)


def _paint_mediastinum(
    scene: Scene,
    zs: slice,
    image: np.ndarray,
    lung: np.ndarray,
    axes: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """The heart and the mediastinal tubes (soft tissue), carved out of the lungs with a fat rim."""
    an, grid = scene.anatomy, scene.grid
    sx = grid.spacing_xyz[0]
    # the heart's distance is scaled to its shortest axis: allow for that along the longest
    lo, hi = an.heart_box((HEART_FAT_MM + grid.reach) * max(an.heart_radii) / min(an.heart_radii))
    found = _sub(grid, zs, lo, hi)
    if found is not None:
        local, (x, y, z) = found
        dist = an.heart_distance(x, y, z)
        blend(image[local], ramp(-dist, sx), an.hu.blood)
        lung_sub = lung[local]
        np.minimum(lung_sub, ramp(dist - _F32(HEART_FAT_MM), sx), out=lung_sub)
    _paint_tubes(scene, zs, image, lung, scene.mediastinal, axes)


def _render_body(
    scene: Scene,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Skin and subcutaneous fat, chest-wall muscle, the cavity (mediastinal fat), the abdomen,

    ribs and sternum over the body box: nested layers, each adding its HU step over the
    one it lies in.

    Args:
        x, y, z: open LPS axes of the body box in this slab.

    Returns:
        ``(image, cavity, above, cavity_dist)``, each ``(nz, ny, nx)`` over the box:
        HU, cavity coverage, coverage of the region above the diaphragm, distance
        outside the cavity (mm).
    """
    an, maps, hu = scene.anatomy, scene.body_maps, scene.anatomy.hu
    sx, _, sz = scene.grid.spacing_xyz
    dist = an.outline_distance(x, y, z)
    image = cover(an.skin_distance(dist, y), sx)
    image *= _F32(hu.fat + 1000.0)
    image -= _F32(1000.0)
    layer = cover(an.muscle_distance(dist, y, maps["fat_depth"]), sx)
    layer *= _F32(hu.muscle - hu.fat)
    image += layer
    dist += maps["cav_depth"]
    dist += an.shoulder_wall(an.xm, an.cy, z)[0] * maps["shoulder_weight"]
    cavity = cover(dist, sx)
    np.multiply(cavity, _F32(hu.fat - hu.muscle), out=layer)
    image += layer
    above = cover(maps["diaphragm"] - z, sz)
    np.subtract(1.0, above, out=layer)
    layer *= cavity
    layer *= maps["abdomen_hu"] - _F32(hu.fat)
    image += layer
    _paint_chest_wall(scene, image, dist, x, z)
    return image, cavity, above, dist


def _render_slab(scene: Scene, zs: slice) -> None:
    """Render slices ``zs`` of the scan into ``scene.out`` (image, lung mask, nodule mask)."""
    an, grid, maps, hu = scene.anatomy, scene.grid, scene.maps, scene.anatomy.hu
    sx = grid.spacing_xyz[0]
    x, y, z = grid.axes(zs)
    axes = (x, y, z)
    image = np.full((zs.stop - zs.start, *grid.shape[1:]), -1000.0, dtype=_F32)
    by, bx = scene.body_box
    body, cavity, above, _ = _render_body(scene, x[:, :, bx], y[:, by], z)
    image[:, by, bx] = body
    _paint_bubble(scene, zs, image)
    _paint_spine(scene, zs, image, z)
    _paint_tubes(scene, zs, image, None, scene.tubes[2], axes)
    # lungs: the cavity above the diaphragm, under the apical caps, outside the mediastinum
    lung = np.zeros(image.shape, dtype=_F32)
    region = scene.lung_region
    if region is not None:
        rz = slice(
            max(region[0].start, zs.start) - zs.start, min(region[0].stop, zs.stop) - zs.start
        )
        region = (rz, region[1], region[2]) if rz.stop > rz.start else None
    if region is not None:
        rz, ys, xs = region
        ly, lx = (
            slice(ys.start - by.start, ys.stop - by.start),
            slice(xs.start - bx.start, xs.stop - bx.start),
        )
        sub = np.minimum(cavity[rz, ly, lx], above[rz, ly, lx])
        np.minimum(sub, cover(-an.apex_depth(x[:, :, xs], y[:, ys], z[rz]), sx), out=sub)
        np.minimum(sub, maps["medial"][:, ys, xs], out=sub)
        lung[rz, ys, xs] = sub
    _paint_mediastinum(scene, zs, image, lung, axes)
    if region is not None and scene.texture is not None:
        lung_hu = scene.texture.sample(z[rz])
        lung_hu *= _F32(hu.lung_texture)
        lung_hu += maps["lung_hu"][:, ys]
        blend(image[rz, ys, xs], lung[rz, ys, xs], lung_hu)
    # vessels and airways, lesions
    _paint_tubes(scene, zs, image, lung, scene.tubes[0], axes)
    _paint_tubes(scene, zs, image, lung, scene.tubes[1], axes)
    _paint_tubes(scene, zs, image, lung, scene.tubes[3], axes)
    mask = scene.out["nodules"][zs]
    for lesion in scene.lesions:
        paint_lesion(lesion, grid, zs, image, lung, mask)
    # the scanner: reconstruction kernel (outside the blur box all is air, save the table,
    # which comes blurred), noise, the stored HU range
    ky, kx = scene.blur_box
    image[:, ky, kx] = kernel_blur(
        image[:, ky, kx],
        scene.scanner.kernel_fwhm,
        grid.spacing,
        edge_enhance=scene.scanner.edge_enhance,
    )
    image[:, scene.table_rows] += scene.table
    _, ny, nx = image.shape
    for i, (b, r, c) in enumerate(scene.noise_pick[zs]):
        image[i] += scene.noise_bank[b, r : r + ny, c : c + nx]
    np.clip(image, -1024.0, 3071.0, out=scene.out["image"][zs])
    np.greater_equal(lung, 0.5, out=scene.out["lung"][zs])

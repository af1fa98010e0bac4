"""Render orthogonal slices of generated cases, so a person can see they look like CT.

Chest CT: axial, coronal and sagittal slices through the largest nodule of a few
seeds (lung window), with the nodule outlined. Organs: the same three views per
domain preset (soft-tissue window for CT domains, min-max for MR), labels
outlined. Slices are drawn with their true aspect ratio (pixel spacing).

    python benchmarks/synth_gallery.py [--out benchmarks/results] [--seeds 0 1 2]

Writes ``synth_gallery_chest.png``, ``synth_gallery_organs.png`` and a JSON
listing what each panel shows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medssl.synth.chest import ChestConfig, generate_chest_ct
from medssl.synth.organs import DOMAINS, generate_organ_phantom
from medssl.volume import Volume

VIEWS = ("axial", "coronal", "sagittal")


def _slices(volume: Volume, centre: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """(2D slice, aspect) for the three views through index ``centre`` (z, y, x)."""
    z, y, x = (round(c) for c in centre)
    sz, sy, sx = volume.spacing
    a = volume.array
    # coronal/sagittal are flipped so that superior is up
    return [(a[z], sy / sx), (a[::-1, y, :], sz / sx), (a[::-1, :, x], sz / sy)]


def _outline_slices(mask: np.ndarray, centre: np.ndarray) -> list[np.ndarray]:
    z, y, x = (round(c) for c in centre)
    return [mask[z], mask[::-1, y, :], mask[::-1, :, x]]


def chest_gallery(seeds: list[int], out: Path, matrix: int) -> list[dict[str, object]]:
    fig, axes = plt.subplots(len(seeds), 3, figsize=(12, 4 * len(seeds)), squeeze=False)
    panels = []
    for row, seed in enumerate(seeds):
        case = generate_chest_ct(seed, ChestConfig(matrix=matrix))
        largest = max(case.nodules, key=lambda n: n.diameter_mm)
        centre = case.volume.world_to_index(largest.centre_lps)
        mask = case.nodule_mask == largest.label
        for col, ((image, aspect), outline) in enumerate(
            zip(_slices(case.volume, centre), _outline_slices(mask, centre))
        ):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=-1350, vmax=150, aspect=aspect)
            ax.contour(outline, levels=[0.5], colors="tab:red", linewidths=0.8)
            ax.set_title(
                f"seed {seed} {VIEWS[col]}: {largest.kind} {largest.diameter_mm:.1f} mm "
                f"{largest.location}",
                fontsize=8,
            )
            ax.axis("off")
        panels.append(
            {
                "seed": seed,
                "shape": list(case.volume.shape),
                "spacing_mm": case.volume.spacing.round(3).tolist(),
                "nodules": [(n.kind, round(n.diameter_mm, 1), n.location) for n in case.nodules],
                "confusers": [(c.kind, round(c.diameter_mm, 1)) for c in case.confusers],
            }
        )
    fig.tight_layout()
    fig.savefig(out / "synth_gallery_chest.png", dpi=90)
    plt.close(fig)
    return panels


def organ_gallery(seed: int, out: Path) -> list[dict[str, object]]:
    domains = sorted(DOMAINS)
    fig, axes = plt.subplots(len(domains), 3, figsize=(12, 4 * len(domains)), squeeze=False)
    panels = []
    for row, name in enumerate(domains):
        case = generate_organ_phantom(seed, name)
        centre = np.array(case.image.shape) / 2
        ct = case.domain.modality == "CT"
        lo, hi = (-160, 240) if ct else np.percentile(case.image.array, [1, 99])
        for col, ((image, aspect), labels) in enumerate(
            zip(_slices(case.image, centre), _outline_slices(case.label.array, centre))
        ):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            ax.contour(
                labels, levels=np.arange(0.5, labels.max() + 1), cmap="tab10", linewidths=0.6
            )
            ax.set_title(f"domain {name} ({case.domain.modality}) {VIEWS[col]}", fontsize=8)
            ax.axis("off")
        panels.append(
            {
                "domain": name,
                "shape": list(case.image.shape),
                "spacing_mm": case.image.spacing.round(3).tolist(),
            }
        )
    fig.tight_layout()
    fig.savefig(out / "synth_gallery_organs.png", dpi=90)
    plt.close(fig)
    return panels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--matrix", type=int, default=512)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "chest": chest_gallery(args.seeds, args.out, args.matrix),
        "organs": organ_gallery(args.seeds[0], args.out),
    }
    (args.out / "synth_gallery.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in summary["chest"]:
        print(
            f"chest seed {row['seed']}: shape {row['shape']} spacing {row['spacing_mm']} "
            f"nodules {row['nodules']}"
        )
    for row in summary["organs"]:
        print(f"organs domain {row['domain']}: shape {row['shape']} spacing {row['spacing_mm']}")
    print(f"wrote {args.out}/synth_gallery_chest.png, synth_gallery_organs.png")


if __name__ == "__main__":
    main()

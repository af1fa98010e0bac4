"""Convert the layouts the SSL literature ships into the Decathlon layout ``medssl-train`` reads.

* UA-MT's Left Atrium (:class:`~medssl.datasets.la_h5.LAHeart`): ``train.list`` cases become
  ``imagesTr``/``labelsTr``, ``test.list`` cases ``imagesTs``/``labelsTs`` (the standard 80/20).
* A&D's ``npy`` + ``split_txts`` (:class:`~medssl.datasets.ad_npy.ADNumpy`): the ``test`` split
  becomes ``imagesTs``/``labelsTs``, every other id (labeled, unlabeled and eval splits) a
  training case. medssl then draws its own labeled fraction (``data.labeled_fraction``) and
  validation cases from them with a recorded seed; A&D's exact ``labeled_*`` lists are not kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medssl.datasets.ad_npy import ADNumpy
from medssl.datasets.decathlon import DecathlonWriter
from medssl.datasets.la_h5 import LAHeart

__all__ = ["ad_npy_to_decathlon", "la_h5_to_decathlon"]


def la_h5_to_decathlon(
    root: str | Path, out: str | Path, list_dir: str | Path | None = None
) -> Path:
    """Write the LA dataset under ``root`` as a Decathlon dataset in ``out``; returns
    dataset.json."""
    la = LAHeart(root, list_dir)
    writer = DecathlonWriter(
        out,
        name="Left atrium (UA-MT h5)",
        labels={0: "background", 1: "left_atrium"},
        modality="MRI",
        description=f"converted from {Path(root).resolve()}",
    )
    for case in la.train_cases:
        writer.add_training(case, la.image(case), la.label(case))
    for case in la.test_cases:
        writer.add_test(case, la.image(case), la.label(case))
    return writer.close()


def ad_npy_to_decathlon(
    root: str | Path,
    out: str | Path,
    labels: Mapping[int, str],
    modality: str = "CT",
    **reader_options: object,
) -> Path:
    """Write A&D's ``npy`` dataset under ``root`` as a Decathlon dataset in ``out``.

    Args:
        labels: label code → name, background included (the npy layout does not name them).
        modality: the images' modality (``"CT"`` stores them as int16 HU).
        reader_options: passed to :class:`ADNumpy` (``spacing``, ``axis_order``).
    """
    data = ADNumpy(root, **reader_options)  # type: ignore[arg-type]
    test = set(data.ids("test")) if "test" in data.splits() else set()
    training = sorted(
        {i for split in data.splits() if split != "test" for i in data.ids(split)} - test
    )
    writer = DecathlonWriter(
        out,
        name=f"A&D npy ({Path(root).name})",
        labels=labels,
        modality=modality,
        description=f"converted from {Path(root).resolve()}",
    )
    for data_id in training:
        writer.add_training(data_id, data.image(data_id), data.label(data_id))
    for data_id in sorted(test):
        writer.add_test(data_id, data.image(data_id), data.label(data_id))
    return writer.close()

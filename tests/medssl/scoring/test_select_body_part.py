"""Routing by BodyPartExamined: the selection rule that sends chest CT to the detector and
abdominal CT to the organ model."""

from __future__ import annotations

import pytest

from medssl.scoring.manifest import ScanItem
from medssl.scoring.select import SelectionRules, parse_rules, select_series


def _ct(key: str, body_part: str) -> ScanItem:
    return ScanItem(
        key=key,
        paths=(f"/x/{key}/1.dcm",),
        study_uid=f"1.2.{key}",
        series_uid=f"1.2.3.{key}",
        modality="CT",
        image_type="ORIGINAL\\PRIMARY\\AXIAL",
        orientation="AXIAL",
        n_slices=64,
        slice_thickness_mm=1.0,
        body_part=body_part,
    )


def test_body_part_rule_picks_the_listed_parts_case_insensitively():
    items = [_ct("1", "CHEST"), _ct("2", "abdomen "), _ct("3", "ABDOMENPELVIS"), _ct("4", "")]
    chosen, skipped = select_series(items, parse_rules("body_part=ABDOMEN/abdomenpelvis"))
    assert [i.key for i in chosen] == ["2", "3"]
    reasons = {s.item.key: s.reason for s in skipped}
    assert reasons == {
        "1": "body part CHEST, not ABDOMEN/ABDOMENPELVIS",
        "4": "body part missing, not ABDOMEN/ABDOMENPELVIS",
    }


def test_without_a_body_part_rule_every_body_part_passes():
    items = [_ct("1", "CHEST"), _ct("2", ""), _ct("3", "ABDOMEN")]
    assert len(select_series(items, SelectionRules())[0]) == 3


def test_a_free_text_body_part_is_not_quoted_in_the_skip_reason():
    """BodyPartExamined is free text in practice; a hostile or careless header may put a name
    there."""
    chosen, skipped = select_series(
        [_ct("1", "DOE^JANE 1961")], SelectionRules(body_part=("CHEST",))
    )
    assert not chosen
    assert skipped[0].reason == "body part not a defined term, not CHEST"
    assert "DOE" not in skipped[0].reason


def test_body_part_rule_reads_from_yaml_lists(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("body_part: [chest, Lung]\nmin_slices: 16\n")
    assert parse_rules(str(rules)).body_part == ("CHEST", "LUNG")


@pytest.mark.parametrize("value", ["CHEST", "ABDOMEN"])
def test_a_dicom_index_carries_body_part_examined_into_the_manifest(tmp_path, value):
    import numpy as np

    from medssl.index import index_tree
    from medssl.io.dicom_writer import SeriesInfo, write_dicom_series
    from medssl.scoring.manifest import ScanItem as Item
    from medssl.volume import Volume, affine_from_geometry

    volume = Volume(
        np.zeros((4, 32, 32), np.float32), affine_from_geometry((0.0, 0.0, 0.0), (2.0, 1.0, 1.0))
    )
    write_dicom_series(volume, tmp_path / "s", SeriesInfo(uid_seed=value, body_part=value))
    record = index_tree(tmp_path).series[0]
    assert Item.from_record(record).body_part == value

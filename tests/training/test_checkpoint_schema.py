"""The checkpoint schema: kinds, the current version, and schema-1 files migrating on load."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from medssl.errors import CheckpointError
from medssl.training.checkpoint import SCHEMA_VERSION, CheckpointKind, migrate


def test_the_kind_enum_accepts_the_value_string_or_the_member():
    assert CheckpointKind("medssl.segmenter") is CheckpointKind.SEGMENTER
    assert CheckpointKind(CheckpointKind.DETECTOR) is CheckpointKind.DETECTOR
    assert {k.value for k in CheckpointKind} == {"medssl.detector", "medssl.segmenter"}


def test_a_schema_1_segmenter_moves_its_method_state_under_method():
    teacher = {"w": torch.ones(2)}
    old = {
        "kind": "medssl.segmenter",
        "model": {"w": torch.zeros(2)},
        "step": 4,
        "classes": {"0": "background", "1": "liver"},
        "teacher": teacher,
        "drs": None,
        "bcp": None,
        "threshold": {"policy": "fixed", "tau": 0.6},
        "patchcl": None,
    }
    new = migrate(old)
    assert new["schema"] == SCHEMA_VERSION and new["kind"] == "medssl.segmenter"
    assert new["method"] == {"teacher": teacher, "threshold": {"policy": "fixed", "tau": 0.6}}
    assert new["data"] == {} and new["classes"] == old["classes"] and new["step"] == 4
    assert not {"teacher", "drs", "bcp", "threshold", "patchcl"} & set(new)
    assert "teacher" in old, "the input is left unchanged"


def test_a_schema_1_detector_moves_its_mined_lists_to_data():
    mined = {"hard_negatives": {"version": 1, "centres": []}}
    new = migrate({"kind": "medssl.detector", "threshold": None, "mined": mined})
    assert new["method"] == {} and new["data"] == mined and "mined" not in new


def test_a_current_checkpoint_passes_unchanged():
    state = {"schema": SCHEMA_VERSION, "kind": "medssl.detector", "method": {}, "data": {}}
    assert migrate(state) == state


@pytest.mark.parametrize(
    "state, message",
    [
        ({"kind": "medssl.unknown"}, "unknown checkpoint kind"),
        ({}, "unknown checkpoint kind"),
        ({"kind": "medssl.detector", "schema": SCHEMA_VERSION + 1}, "newer than"),
    ],
)
def test_an_unknown_kind_or_a_newer_schema_names_the_file(state, message):
    with pytest.raises(CheckpointError, match=message) as info:
        migrate(state, "run/checkpoints/last.pt")
    assert "last.pt" in str(info.value)

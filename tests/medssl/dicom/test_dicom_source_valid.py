"""Which received patient and study values the result writers copy (medssl.dicom.source):
the per-value syntax check behind :meth:`OutputSource.restore`, on headers built in memory."""

from __future__ import annotations

import builtins
import inspect
import symtable

import pytest
from pydicom.dataset import Dataset

from medssl.dicom import source
from medssl.dicom.source import _keep, _valid, output_source

#: pydicom warns when a header is given a value invalid for its VR, as archives send them.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR", "ignore:The value length", "ignore:The PN component length"
)


def _header(**values: object) -> Dataset:
    """One slice header of series ``1.2.3`` holding ``values`` (keyword -> value)."""
    ds = Dataset()
    ds.SeriesInstanceUID = "1.2.3"
    ds.FrameOfReferenceUID = "1.2.3.4"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("vr", "value", "valid"),
    [
        ("DA", "20230231", True),  # DA syntax, though no calendar day: the PACS holds it
        ("DA", "00000000", False),
        ("DA", "1958-02-14", False),
        ("TM", "120000", True),
        ("TM", "25:00", False),
        ("AS", "055Y", True),
        ("AS", "55 years", False),
        ("PN", "Doe^Jane", True),
        ("PN", "x" * 70, False),  # a component group holds at most 64 characters
        ("DS", 70.5, True),  # numbers are valid as they are
        ("IS", 3, True),
    ],
)
def test_one_value_is_valid_when_pydicom_accepts_its_syntax(vr, value, valid):
    assert _valid(vr, value) is valid


def test_multi_valued_attributes_are_kept_only_when_every_value_is_valid():
    good = _header(OtherPatientNames=["Doe^John", "Roe^Jane"])
    bad = _header(OtherPatientNames=["Doe^John", "x" * 70])
    assert _keep(good["OtherPatientNames"], "PN")
    assert not _keep(bad["OtherPatientNames"], "PN")
    # the parsed attributes must hold one value, however valid each is
    assert not _keep(_header(PatientName=["Doe^John", "Roe^Jane"])["PatientName"], "PN")


def test_restore_drops_copied_values_invalid_for_their_vr_and_keeps_valid_ones():
    received = _header(
        PatientName="Doe^Jane",
        PatientBirthDate="00000000",
        PatientSex="Q",
        PatientAge="55 years",
        PatientWeight="70.5",
        OtherPatientNames=["Doe^John", "x" * 70],
        StudyDescription="CT CHEST",
        AccessionNumber="x" * 40,  # over-long SH, yet an identifier: kept as received
    )
    prepared = output_source([received])
    output = Dataset()
    output.update(received)  # what highdicom copies verbatim from the source
    restored = prepared.restore(output)

    assert restored is output
    assert str(restored.PatientName) == "Doe^Jane"
    assert restored.PatientBirthDate in ("", None)
    assert restored.PatientSex in ("", None)
    assert "PatientAge" not in restored
    assert "OtherPatientNames" not in restored
    assert float(restored.PatientWeight) == 70.5
    assert restored.StudyDescription == "CT CHEST"
    assert restored.AccessionNumber == "x" * 40


def _function_tables(table: symtable.SymbolTable) -> list[symtable.SymbolTable]:
    found = [table] if table.get_type() == "function" else []
    for child in table.get_children():
        found += _function_tables(child)
    return found


def test_every_global_name_the_functions_read_exists():
    """An undefined name fails only when its line runs (or never, after a ``return``, and
    Python drops such code from the bytecode): read the names from the source instead."""
    module = symtable.symtable(inspect.getsource(source), source.__file__, "exec")
    missing = {
        f"{table.get_name()}: {symbol.get_name()}"
        for table in _function_tables(module)
        for symbol in table.get_symbols()
        if symbol.is_global()
        and symbol.is_referenced()
        and not hasattr(source, symbol.get_name())
        and not hasattr(builtins, symbol.get_name())
    }
    assert not missing, f"medssl.dicom.source reads undefined names: {sorted(missing)}"

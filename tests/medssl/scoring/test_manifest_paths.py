"""PathList: a series' file paths held compactly, behaving as the tuple of them."""

from __future__ import annotations

import pickle
import sys

import pytest

from medssl.scoring.manifest import PathList, ScanItem
from medssl.synth.scale import header_records


@pytest.mark.parametrize(
    "paths",
    [
        (),
        ("/a/b.dcm",),
        ("/a/1.dcm", "/a/2.dcm", "/b/3.dcm"),
        ("/x/abc", "/x/abd"),
        ("rel/1", "other/2"),
    ],
)
def test_a_path_list_is_its_tuple_of_paths(paths):
    compact = PathList(paths)
    assert tuple(compact) == paths and len(compact) == len(paths)
    assert compact == paths and compact == list(paths) and hash(compact) == hash(paths)
    assert [compact[i] for i in range(len(paths))] == list(paths)
    assert [compact[-i] for i in range(1, len(paths) + 1)] == [
        paths[-i] for i in range(1, len(paths) + 1)
    ]
    assert compact[1:] == paths[1:]
    assert pickle.loads(pickle.dumps(compact)) == paths
    with pytest.raises(IndexError):
        compact[len(paths)]


def test_items_with_a_path_list_equal_items_with_a_tuple_and_survive_json():
    item = ScanItem(key="1.2", paths=PathList(("/a/1.dcm", "/a/2.dcm")), series_uid="1.2")
    assert item == ScanItem(key="1.2", paths=("/a/1.dcm", "/a/2.dcm"), series_uid="1.2")
    assert ScanItem.from_json(item.to_json()) == item


def test_an_nlst_series_paths_take_a_tenth_of_the_memory_of_python_strings():
    record = next(iter(header_records(1)))
    as_strings = sys.getsizeof(tuple(record.files)) + sum(sys.getsizeof(p) for p in record.files)
    compact = PathList(record.files)
    held = sys.getsizeof(compact) + sys.getsizeof(compact._prefix) + sys.getsizeof(compact._rest)
    assert len(record.files) > 100 and held < as_strings / 8

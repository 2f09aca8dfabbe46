"""docs/api.md cannot drift from the code: its tables of save options and checkpoint
figures list exactly the fields of the dataclasses they document."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ckptstore.store.catalog import CheckpointSummary
from ckptstore.store.options import SaveOptions
from ckptstore.store.usage import CheckpointUsage

API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _tables(heading: str) -> list[list[str]]:
    """The first-column names of each table in the section ``heading`` of api.md."""
    text = API_MD.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    tables: list[list[str]] = []
    current: list[str] | None = None
    for line in section.splitlines():
        if line.startswith("|"):
            m = re.match(r"\|\s*`([A-Za-z_]+)`", line)
            if current is None:
                current = []
                tables.append(current)
            if m:
                current.append(m.group(1))
        else:
            current = None
    return tables


def _own_fields(cls: type, base: type | None = None) -> list[str]:
    inherited = {f.name for f in dataclasses.fields(base)} if base else set()
    return [f.name for f in dataclasses.fields(cls) if f.name not in inherited]


def test_save_options_table_lists_every_field_in_order() -> None:
    (table,) = _tables("SaveOptions")
    assert table == list(SaveOptions.names())


def test_figures_tables_list_every_field_of_each_record() -> None:
    from ckptstore.dcp.writer import SaveInfo
    from ckptstore.transfer import ImportInfo

    summary, save_info, usage, imported = _tables("CheckpointSummary and SaveInfo")
    assert summary == [*_own_fields(CheckpointSummary), "ratio"]
    assert save_info == _own_fields(SaveInfo, CheckpointSummary)
    assert usage == _own_fields(CheckpointUsage, CheckpointSummary)
    assert imported == _own_fields(ImportInfo, CheckpointSummary)


@pytest.mark.parametrize("record", ["SaveInfo", "CheckpointUsage", "ImportInfo"])
def test_every_record_carries_every_figure(record: str) -> None:
    """A figure added to CheckpointSummary reaches every surface (they inherit it)."""
    from ckptstore.dcp.writer import SaveInfo
    from ckptstore.transfer import ImportInfo

    cls = {"SaveInfo": SaveInfo, "CheckpointUsage": CheckpointUsage, "ImportInfo": ImportInfo}[
        record
    ]
    assert issubclass(cls, CheckpointSummary)
    s = CheckpointSummary("a", 1, 1.5, 10, 8, 8, 1, 0, 0.1, 1, 1, 5, 3, 2)
    rec = cls.from_summary(s)
    d = rec.to_dict()
    for f in dataclasses.fields(CheckpointSummary):
        assert d[f.name] == getattr(s, f.name)
    assert d["ratio"] == round(10 / 8, 4)

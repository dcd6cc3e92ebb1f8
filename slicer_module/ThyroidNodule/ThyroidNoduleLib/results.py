"""The results table: one row per classification, batch result or confirmation.

A ``vtkMRMLTableNode`` (so it is shown in Slicer's table views, saved with the scene and
exportable as CSV) with the columns of :data:`COLUMNS`. Probabilities are numbers in ``[0, 1]``;
times are ISO 8601 local times with the UTC offset.
"""

from __future__ import annotations

import datetime
from typing import Any, Dict, List, Mapping, Optional

import vtk

__all__ = ["COLUMNS", "DEFAULT_TABLE_NAME", "add_row", "ensure_table", "now_iso", "result_row", "table_rows", "update_rows"]

DEFAULT_TABLE_NAME = "ThyroidNodule results"

#: (column name, kind): ``double`` columns hold probabilities, the others text
COLUMNS = (
    ("Volume", "string"),
    ("Image ID", "string"),
    ("Label", "string"),
    ("Probability", "double"),
    ("P(malignant)", "double"),
    ("ROI", "string"),
    ("Model", "string"),
    ("Time", "string"),
    ("Source", "string"),
    ("Diagnosis", "string"),
)


def now_iso() -> str:
    """The local time now, ISO 8601 with seconds and UTC offset (e.g. ``2026-05-01T10:03:12+02:00``)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def ensure_table(scene, table=None):
    """The results table: ``table`` if given (missing columns are added), else the scene's node
    named :data:`DEFAULT_TABLE_NAME`, else a new one."""
    if table is None:
        table = scene.GetFirstNodeByName(DEFAULT_TABLE_NAME)
        if table is not None and not table.IsA("vtkMRMLTableNode"):
            table = None
    if table is None:
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", DEFAULT_TABLE_NAME)
    for name, kind in COLUMNS:
        if table.GetColumnIndex(name) < 0:
            column = vtk.vtkDoubleArray() if kind == "double" else vtk.vtkStringArray()
            column.SetName(name)
            column.SetNumberOfTuples(table.GetNumberOfRows())
            if kind == "double":
                column.Fill(float("nan"))
            table.AddColumn(column)
    return table


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value)
    return str(value)


def add_row(table, values: Mapping[str, Any]) -> int:
    """Append a row; ``values`` maps column names to values (missing ones stay empty).

    Returns:
        the new row's index.
    """
    row = table.AddEmptyRow()
    for name, value in values.items():
        col = table.GetColumnIndex(name)
        if col >= 0:
            table.SetCellText(row, col, _text(value))
    table.Modified()
    return row


def update_rows(table, match: Mapping[str, str], values: Mapping[str, Any]) -> int:
    """Set ``values`` in every row whose cells equal ``match``; returns how many rows changed."""
    changed = 0
    cols = {name: table.GetColumnIndex(name) for name in match}
    for row in range(table.GetNumberOfRows()):
        if all(c >= 0 and table.GetCellText(row, c) == str(v) for (name, v), c in zip(match.items(), cols.values())):
            for name, value in values.items():
                col = table.GetColumnIndex(name)
                if col >= 0:
                    table.SetCellText(row, col, _text(value))
            changed += 1
    if changed:
        table.Modified()
    return changed


def table_rows(table) -> List[Dict[str, str]]:
    """All rows as ``{column name: cell text}`` dictionaries."""
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetCellText(r, c) for c, name in enumerate(names)} for r in range(table.GetNumberOfRows())]


def result_row(volume_name: str, image_id: Optional[str], result: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """The table row of one result JSON (``label``, ``probabilities``, ``roi``, ``model``)."""
    probs = result.get("probabilities") or {}
    label = result.get("label", "")
    return {
        "Volume": volume_name,
        "Image ID": image_id or "",
        "Label": label,
        "Probability": probs.get(label),
        "P(malignant)": probs.get("malignant"),
        "ROI": result.get("roi") or "",
        "Model": result.get("model", ""),
        "Time": now_iso(),
        "Source": source,
    }

"""``fxreparam.meta`` owns every node-metadata key: the engine reads and writes them through its accessors only."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import fx

from fxreparam import meta

ROOT = Path(__file__).resolve().parents[1]

# A key read or written on ``node.meta`` itself: ``meta["k"]``, ``meta.get(...)``, ``meta.pop(...)``, ``meta[K] =``.
_DIRECT = re.compile(r"\.meta(\[|\.get\(|\.pop\(|\.setdefault\()")

# file: why it still reads a key directly. Each is to be removed, not added to.
EXCEPTIONS: dict[str, str] = {
}


def _direct_reads() -> dict[str, list[int]]:
    """Per engine file but meta.py, the lines that index ``node.meta`` by a key."""
    found: dict[str, list[int]] = {}
    for path in [*ROOT.glob("fxreparam/**/*.py"), *ROOT.glob("passes/**/*.py")]:
        rel = str(path.relative_to(ROOT))
        if rel == "fxreparam/meta.py":
            continue
        lines = [i for i, line in enumerate(path.read_text().splitlines(), 1)
                 if _DIRECT.search(line.split("#")[0])]
        if lines:
            found[rel] = lines
    return found


def test_no_engine_file_reads_a_metadata_key_itself():
    direct = {f: lines for f, lines in _direct_reads().items() if f not in EXCEPTIONS}
    assert not direct, f"node.meta read by key outside fxreparam/meta.py (use its accessors): {direct}"


def test_listed_exceptions_still_read_directly():
    fixed = set(EXCEPTIONS) - set(_direct_reads())
    assert not fixed, f"fixed, remove from EXCEPTIONS: {sorted(fixed)}"


def test_the_check_sees_a_direct_read():
    assert _DIRECT.search('x = node.meta.get("val")') and _DIRECT.search('node.meta["fxreparam_path"] = name')
    assert not _DIRECT.search("new.meta.update(like.meta)")  # bulk copies of all metadata stay


def _node() -> fx.Node:
    graph = fx.Graph()
    return graph.placeholder("x")


def test_writers_and_readers_agree():
    node = _node()
    assert meta.written(node) is None and meta.marked_opaque(node) is None and not meta.is_guard(node)
    meta.set_written(node, "why")
    meta.mark_opaque(node, "hooked")
    meta.mark_guard(node)
    meta.set_path(node, "layer1.0")
    meta.set_provisional_record(node, "record")
    meta.mark_speculation_undone(node)
    assert meta.written(node) == "why" and meta.marked_opaque(node) == "hooked" and meta.is_guard(node)
    assert meta.module_path(node) == "layer1.0" and meta.provisional_record(node) == "record"
    assert meta.speculation_undone(node)
    meta.drop_provisional(node)
    assert meta.provisional_record(node) is None


def test_recorded_values_prefer_export_over_dynamo():
    node = _node()
    node.meta[meta.EXAMPLE_VALUE] = torch.zeros(2)
    assert meta.export_value(node) is None and meta.recorded_value(node) is node.meta[meta.EXAMPLE_VALUE]
    node.meta[meta.VAL] = 3
    assert meta.export_value(node) == 3 and meta.recorded_value(node) == 3 and meta.dynamo_value(node) is not None


def test_copies_keep_what_they_say():
    source, value, fresh = _node(), _node(), _node()
    source.meta.update({meta.VAL: 1, meta.TENSOR_META: 2, meta.WRITTEN: "w", meta.PATH: "p"})
    meta.copy_value(source, value)
    assert value.meta == {meta.VAL: 1, meta.TENSOR_META: 2}
    meta.copy_but_written(source, fresh)
    assert fresh.meta == {meta.VAL: 1, meta.TENSOR_META: 2, meta.PATH: "p"}


def test_the_old_key_names_still_resolve_to_meta_s():
    from fxreparam import capture, graph, mutation

    assert capture.OPAQUE == meta.OPAQUE and graph.PROVISIONAL == meta.PROVISIONAL
    assert mutation.WRITTEN == meta.WRITTEN

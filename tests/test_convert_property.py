"""A property per source: its valid real-format fixture with random byte flips, truncations, inserted text (deep
nesting, 5000-digit numbers, NUL and surrogate escapes) and JSON mutations (hostile values, deleted keys,
repeated records) never makes convert-datasets raise. Under ``--on-error skip``
the run either finishes with read = written + skipped, or stops on a file it cannot read with exactly one line
on stderr; under ``fail`` it finishes only if skip found no bad record, else it exits 1 with exactly one line.
No record is ever rejected by the pipeline's safety net ("unexpected ..."): every bad input has a named check.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convert_cases import SOURCES, case, load, run_cli

EXAMPLES = 250  # per source: 11 sources x 2 modes x 250 runs take about 30 s on 2 cores

SNIPPETS = [b"[" * 100_000, b"1" * 5000, b"\\u0000", b'"\\ud800"', b"NaN", b"-", b"\xff\xfe", b"\n", b"\x00"]
HOSTILE = [None, True, False, "10", "", -1, 0, 1.5, 1e308, 10**400, math.nan, math.inf, [], {}, [1, 2], [[[[]]]],
           {"a": 1}, "\u0000T0\u0000", "\ud800", "x" * 3, [0.1, 0.2, 0.3, 0.4], ["1", "2", "3", "4"]]


def paths_of(value, path=()):
    """Every path into a decoded JSON value (the value itself included)."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        yield from paths_of(v, path + (k,))


def mutate_json(value, draw):
    """One mutation of a decoded JSON value: replace a node by a hostile value, delete a key, repeat a list item."""
    paths = list(paths_of(value))
    path = draw(st.sampled_from(paths[1:] if len(paths) > 1 else paths))
    op = draw(st.sampled_from(["replace", "delete", "repeat"]))
    if not path:
        return draw(st.sampled_from(HOSTILE))
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if op == "delete" and isinstance(parent, dict):
        del parent[key]
    elif op == "repeat" and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(parent[key])))
    else:
        parent[key] = draw(st.sampled_from(HOSTILE))
    return value


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=True)  # writes NaN / Infinity / "\ud800" as Python's json does


@st.composite
def corruption(draw, files):
    """(file, new bytes) for one of ``files``."""
    path = draw(st.sampled_from(files))
    data = path.read_bytes()
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "json", "json"]))
    if kind == "insert":  # text no JSON writer makes: deep nesting, 5000 digits, escapes, stray bytes
        at = draw(st.integers(0, len(data)))
        return path, data[:at] + draw(st.sampled_from(SNIPPETS)) + data[at:]
    if kind == "flip" and data:
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return path, bytes(data)
    if kind == "truncate" or not data:
        return path, data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if path.suffix == ".p":  # the refs pickle: mutate the refs and pickle them again, as the toolkit would
        return path, pickle.dumps(mutate_json(pickle.loads(data), draw), protocol=2)
    if path.suffix == ".jsonl":
        lines = data.decode().splitlines()
        k = draw(st.integers(0, len(lines) - 1))
        lines[k] = dumps(mutate_json(json.loads(lines[k]), draw))
        return path, ("\n".join(lines) + "\n").encode()
    if path.suffix == ".json":
        return path, dumps(mutate_json(json.loads(data), draw)).encode()
    return path, data[: draw(st.integers(0, max(len(data) - 1, 0)))]  # XML, text: cut


SAFETY_NET = re.compile(r"unexpected [A-Z][A-Za-z]*(Error|Exception)")  # the pipeline's catch-all's words


def check_run(argv, out: Path):
    """Both --on-error modes on the same input; the property of the module docstring."""
    rc, err = run_cli(argv + ["--output", out, "--on-error", "skip"])
    assert "Traceback" not in err and not SAFETY_NET.search(err), err
    bad_records = 0
    if rc == 0:
        s = load(out.with_suffix(".summary.json"))
        assert s["read"] == s["written"] + s["skipped"], s
        assert len(load(out)) == s["output_records"] == s["written"]
        rejects = load(out.with_suffix(".rejects.jsonl")) if s["skipped"] else []
        assert len(rejects) == s["skipped"]
        assert not [r for r in rejects if r["reason"].startswith("unexpected")], rejects
        bad_records = sum(bool(r.get("error")) for r in rejects)
    else:
        assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("convert-datasets: error: "), err
    rc2, err2 = run_cli(argv + ["--output", out.with_name("fail.jsonl"), "--on-error", "fail"])
    assert "Traceback" not in err2 and not SAFETY_NET.search(err2), err2
    if rc == 1 or bad_records:
        assert rc2 == 1 and len(err2.splitlines()) == 1 and err2.startswith("convert-datasets: error: "), (rc2, err2)
    else:
        assert rc2 == 0, err2


@pytest.mark.parametrize("source", SOURCES)
def test_corrupt_input_is_converted_counted_or_named_in_one_line(source, tmp_path):
    argv, files = case(source, tmp_path / "valid")
    originals = {p: p.read_bytes() for p in files}
    rc, err = run_cli(argv + ["--output", tmp_path / "valid.jsonl"])
    assert rc == 0, err  # the fixture itself is valid

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def prop(data):
        path, new = data.draw(corruption(files))
        try:
            path.write_bytes(new)
            with tempfile.TemporaryDirectory(dir=tmp_path) as d:
                check_run(argv, Path(d) / "out.jsonl")
        finally:
            path.write_bytes(originals[path])

    prop()

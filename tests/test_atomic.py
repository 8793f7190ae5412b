"""Atomic writes keep ordinary permissions (mkstemp alone would leave 0600) and clean up after a failure."""
import os
import stat

import pytest

from llava_getok.atomic import atomic_path, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_text_atomic_gets_the_umask_mode(tmp_path, umask_022):
    path = tmp_path / "sub" / "out.txt"
    write_text_atomic(path, "hello\n")
    assert path.read_text() == "hello\n"
    assert mode(path) == 0o644
    assert os.listdir(path.parent) == ["out.txt"]


def test_failed_write_leaves_neither_temp_nor_target(tmp_path, umask_022):
    path = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_existing_target_survives_a_failed_write(tmp_path, umask_022):
    path = tmp_path / "out.txt"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("new\n")
        raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_sidecar_json_is_readable_by_others(tmp_path, umask_022):
    from llava_getok.training.sidecar import write_json_atomic

    path = tmp_path / "getok_config.json"
    write_json_atomic(path, {"a": 1})
    assert mode(path) == 0o644
    assert os.listdir(tmp_path) == ["getok_config.json"]

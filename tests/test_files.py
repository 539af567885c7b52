"""attenuation.files: atomic writes with a plain file's permissions, and no temporaries left behind."""
import os
import stat

import pytest
import torch

from attenuation.files import (
    atomic_open,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temporaries,
)


@pytest.fixture
def umask():
    """Set the process umask for one test, restored afterwards."""
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "text")
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "b.pt")
    plain = tmp_path / "plain"
    plain.write_text("")
    assert _mode(plain) == mode  # what open() gives, for reference
    assert _mode(tmp_path / "a.txt") == mode and _mode(tmp_path / "b.pt") == mode


def test_content_replaced_and_no_temporary_left(tmp_path):
    target = tmp_path / "sub" / "report.md"  # the folder is created
    atomic_write_text(target, "first")
    atomic_write_bytes(target, "zweite Fassung \u00e9".encode())
    assert target.read_text(encoding="utf-8") == "zweite Fassung \u00e9"
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.pt", "report.md", "sub"]


def test_temporary_is_named_after_target_and_pid(tmp_path):
    target = tmp_path / "checkpoint.pt"
    with atomic_open(target) as f:
        f.write(b"partial")
        assert [p.name for p in tmp_path.iterdir()] == [f".checkpoint.pt.{os.getpid()}.tmp"]
        assert not target.exists()
    assert target.read_bytes() == b"partial"


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save({"epoch": 1}, target)
    with pytest.raises(Exception):
        atomic_torch_save({"epoch": 2, "bad": lambda: None}, target)  # a lambda cannot be pickled
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(target) as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_leftover_of_the_same_pid_is_overwritten(tmp_path):
    target = tmp_path / "x.json"
    (tmp_path / f".x.json.{os.getpid()}.tmp").write_text("stale")
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_remove_stale_temporaries(tmp_path):
    names = [".checkpoint.pt.4242.tmp", "checkpoint.ptk2j3h4.tmp", ".model.pt.7.tmp",  # stale
             "checkpoint.pt", ".other.pt.1.tmp", "notes.tmp", "model.pt"]                   # kept
    for name in names:
        (tmp_path / name).write_text("")
    removed = remove_stale_temporaries(tmp_path, ["checkpoint.pt", "model.pt"])
    assert sorted(p.name for p in removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])
    assert remove_stale_temporaries(tmp_path / "absent", ["checkpoint.pt"]) == []

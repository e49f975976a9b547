"""Atomic writes leave files with the mode the user's umask gives, and never a torn or stray file."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from repdyn.core.files import (atomic_path, atomic_write_text, check_writable, not_writable_reason, save_figure,
                               write_npz, write_table)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_written_files_follow_the_umask(tmp_path, umask_022):
    import matplotlib.pyplot as plt

    paths = [atomic_write_text(tmp_path / "REPORT.md", "# report\n"),
             write_table(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.csv"),
             write_npz(tmp_path / "m.npz", x=[1, 2]),
             save_figure(plt.figure(), tmp_path / "f.png")]
    assert [_mode(p) for p in paths] == [0o644] * 4  # not mkstemp's 0600
    os.umask(0o077)
    assert _mode(atomic_write_text(tmp_path / "private.md", "x")) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["REPORT.md", "f.png", "m.npz", "private.md", "t.csv"]


def test_failed_write_leaves_the_old_file(tmp_path):
    target = atomic_write_text(tmp_path / "t.csv", "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_check_writable_names_the_path_and_creates_nothing(tmp_path, read_only_dir):
    """``read_only_dir``: chmod 0555 when not root, a simulated read-only file system as root."""
    check_writable(tmp_path / "new" / "deeper", "--out")  # a writable parent: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    for target in (read_only_dir, read_only_dir / "sub" / "out.png"):
        with pytest.raises(ValueError, match=rf"--out {target} is not writable \((read-only file system|permission "
                                             rf"denied)( at {read_only_dir})?\): choose a writable location"):
            check_writable(target, "--out")
    assert list(read_only_dir.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "sub", "--out")


def test_not_writable_reason():
    import errno

    assert not_writable_reason(OSError(errno.EROFS, "x")) == "read-only file system"
    assert not_writable_reason(PermissionError(errno.EACCES, "x")) == "permission denied"
    assert not_writable_reason(OSError(errno.ENOENT, "x")) is None

"""repdyn.cli: expected failures are one `error: ...` line (exit 2), warnings one `warning: ...` line,
unexpected errors keep their traceback; every command's --help reads whole at 80 columns."""

from __future__ import annotations

import errno
import warnings

import pytest
import typer
from typer.testing import CliRunner

from repdyn.cli import app, friendly_errors

runner = CliRunner()


def _invoke(fn):
    app = typer.Typer()
    app.command()(friendly_errors(fn))
    return runner.invoke(app, [])


def _lines(res) -> list[str]:
    return [ln for ln in res.output.strip().splitlines() if ln.strip()]


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.EROFS, "Read-only file system", "/data/ro/run"),
     "error: /data/ro/run is not writable (read-only file system at /"),
    (PermissionError(errno.EACCES, "Permission denied", "/nonexistent-root/out/.grid.png.x1.tmp"),
     "error: /nonexistent-root/out is not writable (permission denied at /)"),
])
def test_unwritable_paths_are_one_line(exc, expected):
    """The trainer's own mkdir (commands/train.py does not check first) and any later write land here."""
    def boom():
        raise exc

    res = _invoke(boom)
    assert res.exit_code == 2 and len(_lines(res)) == 1 and _lines(res)[0].startswith(expected), res.output


def test_other_os_errors_keep_their_traceback():
    def boom():
        raise OSError(errno.EIO, "Input/output error", "/dev/x")

    res = _invoke(boom)
    assert res.exit_code == 1 and isinstance(res.exception, OSError)


def test_dataloader_worker_errors_keep_only_the_message():
    def boom():
        raise ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nValueError: cannot read image a/b.png (not an image "
                         "PIL can read): remove or replace the file")

    res = _invoke(boom)
    assert _lines(res) == ["error: cannot read image a/b.png (not an image PIL can read): remove or replace the file"]


def test_warnings_are_one_line():
    from repdyn.model.pickled import PickledCodeWarning

    def warn():
        warnings.warn("evil.pt contains pickled code (posix.system): loading it runs that code", PickledCodeWarning)
        typer.echo("done")

    res = _invoke(warn)
    assert res.exit_code == 0
    assert _lines(res) == ["warning: evil.pt contains pickled code (posix.system): loading it runs that code", "done"]

COMMANDS = ["train", "layer-grid", "sample", "eval", "encode", "similarity", "diversity", "pca", "umap", "align",
            "spatial", "attribute", "curves", "correlate", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_readable_at_80_columns(command):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80
    assert "…" not in res.output, [ln for ln in res.output.splitlines() if "…" in ln]

"""Helpers of the analysis commands' tests: run the CLI, expect one error line, check a PNG."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from repdyn.cli import app

runner = CliRunner()


def _ok(args: list[str]):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _one_line_error(args: list[str], message: str) -> None:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output + repr(res.exception)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output


def _png(path) -> None:
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG", path


def _n_cells(cache) -> int:
    return len(json.loads((cache / "manifest.json").read_text())["cells"])


CURVE_ARGS = ["--probe", "ridge", "--n-train", "100", "--n-test", "48", "--n-div", "8", "--quiet", "--device", "cpu"]



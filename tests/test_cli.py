"""repdyn.cli: every command's --help reads whole at 80 columns (no option text cut off)."""

import pytest
from typer.testing import CliRunner

from repdyn.cli import app

COMMANDS = ["train", "layer-grid", "sample", "eval", "encode", "similarity", "diversity", "pca", "umap", "align",
            "spatial", "attribute", "curves", "correlate", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_readable_at_80_columns(command):
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80
    assert "…" not in res.output, [ln for ln in res.output.splitlines() if "…" in ln]

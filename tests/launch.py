"""Run the `probe` CLI under torchrun with 2 gloo ranks on CPU (the distributed path's tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cli(argv: list[str], workdir: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc -m repdyn ARGV``; asserts success and returns the process.

    The arguments travel in a JSON file: torchrun's own parser would take e.g. ``--n`` for its
    ``--nnodes`` (it accepts unambiguous prefixes) before the script sees it."""
    args_file = workdir / "argv.json"
    args_file.write_text(json.dumps(argv))
    script = workdir / "probe_cli.py"
    script.write_text("import json, sys\nfrom repdyn.cli import app\napp(json.load(open(sys.argv[1])))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(script), str(args_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res

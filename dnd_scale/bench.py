"""`dnd bench data|kernels|scale ...`: throughput benchmarks (results go to benchmarks/results/)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

BENCHES = {
    "data": "dnd_scale.bench_data",
    "kernels": "dnd_scale.bench_kernels",
    "scale": "dnd_scale.bench_scale",
}


def git_revision(short: bool = False) -> str | None:
    """The repository's HEAD commit (None where there is no git or no .git: a copy of the tree)."""
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: dnd bench {{{'|'.join(BENCHES)}}} [options]  (dnd bench data --help)", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)

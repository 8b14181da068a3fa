"""`dnd bench data|kernels|scale ...`: throughput benchmarks (results go to benchmarks/results/)."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "data": "dnd_scale.bench_data",
    "kernels": "dnd_scale.bench_kernels",
    "scale": "dnd_scale.bench_scale",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: dnd bench {{{'|'.join(BENCHES)}}} [options]  (dnd bench data --help)", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)

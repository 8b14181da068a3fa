"""Scale benchmark (same as `dnd bench scale`): ZeRO configurations, the largest target, 70B generation.

Run from the repository root on one GPU, e.g.
    python benchmarks/bench_scale.py --sections zero --out benchmarks/results/scale_h200.json
"""

import sys

from dnd_scale.bench_scale import main

if __name__ == "__main__":
    sys.exit(main())

"""Kernel benchmark (same as `dnd bench kernels`): run from the repository root on a GPU."""

from dnd_scale.bench_kernels import main

if __name__ == "__main__":
    main()

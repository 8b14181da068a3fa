"""Data-path benchmark (same as `dnd bench data`): run from the repository root."""

from dnd_scale.bench_data import main

if __name__ == "__main__":
    main()

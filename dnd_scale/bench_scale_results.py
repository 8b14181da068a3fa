"""The results of `dnd bench scale`: the environment they were measured in, the JSON file the
sections write into (format RESULTS_FORMAT, kept across calls) and the table printed from it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dnd_scale.bench import git_revision

# The repository root: its git revision is recorded, workers run in it, the CLI defaults live in it.
REPO = Path(__file__).resolve().parents[1]
RESULTS_FORMAT = "dnd-bench-scale-1"
GIB = 1024**3


def environment(git_rev: str | None = None) -> dict:
    """GPU, versions, git revision (`git_rev` when given: a copy of the tree may have no .git), host."""
    dirty = None
    if git_rev is None:
        git_rev = git_revision()
        if git_rev is None:
            git_rev = "unknown"
        else:
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                        capture_output=True, text=True).stdout.strip())  # fmt: skip
    env: dict[str, Any] = {"gpu": None, "gpu_memory_bytes": None, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "git_rev": git_rev, "git_dirty": dirty, "cpus": os.cpu_count(),
                           "host_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}  # fmt: skip
    for name in ("deepspeed", "triton", "peft", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"], env["gpu_memory_bytes"] = props.name, int(props.total_memory)
    return env


class ResultsFile:
    """The benchmark's JSON: loaded if present (sections of an earlier call are kept), rewritten
    atomically whenever a section reports progress."""

    def __init__(self, path: Path, git_rev: str | None = None, env: dict | None = None) -> None:
        from dnd_scale.io import read_json

        self.path = path
        self.data = read_json(path, "scale results") if path.is_file() else {"format": RESULTS_FORMAT, "sections": {}}
        self.data.setdefault("environments", []).append(env or environment(git_rev))

    def previous(self, section: str) -> dict | None:
        """The section as an earlier call left it (None if it has none)."""
        return self.data["sections"].get(section)

    def saver(self, section: str) -> Callable[[dict], None]:
        """A callback that stores `section`'s result and rewrites the file; records measured in this
        call are stamped with this call's index into "environments"."""
        index = len(self.data["environments"]) - 1

        def save(result: dict) -> None:
            from dnd_scale.io import write_json

            for record in [*result.get("configs", {}).values(),
                           *(a for t in result.get("targets", []) for a in t["attempts"].values())]:  # fmt: skip
                record.setdefault("environment_index", index)
            if section == "generate70b":
                result.setdefault("environment_index", index)
            self.data["sections"][section] = {**result, "environment": self.data["environments"][-1]}
            write_json(self.path, self.data)

        return save


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"


def record_summary(record: dict) -> str:
    """One line for a measured record: its error when it did not finish, else peak memory and times."""
    if record.get("status") != "ok":
        return record.get("error", "")
    parts = [
        f"GPU peak {_gib(record.get('gpu_max_allocated_bytes'))} GiB alloc / "
        f"{_gib(record.get('gpu_max_reserved_bytes'))} reserved",
        f"host RSS {_gib(record.get('host_peak_rss_bytes'))} GiB",
    ]
    if record.get("median_step_s") is not None:
        parts.append(f"median step {record['median_step_s']:.3f} s")
    if record.get("median_generate_s") is not None:
        parts.append(f"prompts->folder {record['median_generate_s'] * 1e3:.0f} ms")
    return ", ".join(parts)


def format_table(data: dict) -> str:
    lines = []
    zero = data["sections"].get("zero")
    if zero:
        lines += [f"zero: {zero['sizes']['model']} target, {zero['sizes']['generator_params'] / 1e9:.2f} B generator, "
                  f"micro-batch {zero['micro_batch']}",
                  "| config | status | GPU alloc GiB | GPU reserved GiB | plan GiB | plan error (alloc) | host RSS GiB "
                  "| plan host GiB | median step s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        tune = zero.get("tuning")
        if tune:
            lines.insert(1, f"tuning pass (forward + backward at the micro-batch, no DeepSpeed): {tune['status']}"
                         + (f", first call {tune['first_call_s']:.1f} s, second {tune['second_call_s']:.2f} s"
                            if tune["status"] == "ok" else f": {tune.get('error', '')}"))  # fmt: skip
        for name, r in zero["configs"].items():
            p = r["predicted"]
            step = "-" if r.get("median_step_s") is None else f"{r['median_step_s']:.3f}"
            cells = [name, r["status"], _gib(r.get("gpu_max_allocated_bytes")), _gib(r.get("gpu_max_reserved_bytes")),
                     _gib(p["gpu_bytes"]), _pct(r.get("predicted_error")), _gib(r.get("host_peak_rss_bytes")),
                     _gib(p["model_states_cpu_bytes"]), step]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    largest = data["sections"].get("largest")
    if largest:
        lines += ["", "largest: | target | tokens | generator B params | result |", "|---|---|---|---|"]
        for t in largest["targets"]:
            tried = ", ".join(f"{c}: {a['status']}" for c, a in t["attempts"].items())
            lines.append(f"| {t['model']} | {t['sizes']['tokens']} | {t['sizes']['generator_params'] / 1e9:.2f} | {tried} |")
        lines.append(f"largest that trains: {largest['largest_fit']}")
    gen = data["sections"].get("generate70b")
    if gen:
        lines += ["", f"generate70b: {gen['sizes']['model']}, {gen['sizes']['generator_params'] / 1e9:.2f} B generator: "
                  f"{gen['status']}; " + record_summary(gen)]  # fmt: skip
        if gen.get("peft_check"):
            c = gen["peft_check"]
            lines.append(f"peft keys/shapes equal: {c['match']} ({c['saved_keys']} saved, {c['expected_keys']} expected)")
        lines.append(f"weights after load {_gib(gen.get('gpu_after_load_bytes'))} GiB vs 4 B/param "
                     f"{_gib(gen['predicted_weights_bytes'])} GiB ({_pct(gen.get('predicted_error_after_load'))})")
    return "\n".join(lines)

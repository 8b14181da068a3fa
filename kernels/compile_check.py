"""Compile the Triton kernels that a CPU run launches for a GPU target, with no GPU.

Under ``TRITON_INTERPRET=1`` (the CPU tests) a kernel's Python body runs on CPU tensors, so what only
the compiler refuses passes unnoticed: a name rebound to a value of another shape inside an ``if``,
say, failed every GPU launch of a detokenize kernel whose interpreter tests all passed.
``recorded_launches`` records each launch of a module's kernels inside a block (the interpreter still
runs them); ``compile_launches`` compiles the records for a GPU target (sm_90 by default) with
Triton's own compiler and ptxas, in a child process without the interpreter switch (triton's
language helpers are built for the interpreter or for the compiler when triton is imported).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch

HOPPER = ("cuda", 90, 32)
"""(backend, compute capability, warp size) of an H100/H200."""

_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                  torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                  torch.bool: "i1"}  # fmt: skip


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the compiler sees it."""

    module: str
    """Module that defines the kernel."""
    kernel: str
    """The kernel's name in that module."""
    signature: dict[str, str]
    """Every parameter's Triton type ("*bf16", "i32", "fp32", "constexpr")."""
    constants: dict[str, Any]
    """Values of the constexpr parameters."""
    aligned: list[int] = field(default_factory=list)
    """Indices of pointer parameters that are 16-byte aligned (as a GPU launch would find them)."""
    options: dict[str, int] = field(default_factory=dict)
    """num_warps / num_stages of the launch."""

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"compile check: no Triton type for an argument of type {type(value).__name__}")


def _params(kernel: Any) -> list:
    import triton

    return (kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else triton.runtime.jit.JITFunction(kernel.fn)).params


class _Recorder:
    """Stands in for one kernel: records each launch, then launches the kernel."""

    def __init__(self, module: str, name: str, kernel: Any, launches: dict[str, Launch]) -> None:
        self.module, self.name, self.kernel, self.launches = module, name, kernel, launches
        self.params = _params(kernel)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: int(kwargs[k]) for k in ("num_warps", "num_stages") if k in kwargs}
            values = dict(zip((p.name for p in self.params), args))
            values.update({k: v for k, v in kwargs.items() if k not in options})
            signature, constants, aligned = {}, {}, []
            for i, p in enumerate(self.params):
                value = values[p.name]
                if p.is_constexpr or value is None:
                    signature[p.name], constants[p.name] = "constexpr", value
                    continue
                signature[p.name] = _arg_type(value)
                if isinstance(value, torch.Tensor) and value.data_ptr() % 16 == 0:
                    aligned.append(i)
            record = Launch(self.module, self.name, signature, constants, aligned, options)
            self.launches.setdefault(record.key(), record)
            return self.kernel[grid](*args, **kwargs)

        return launch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kernel, name)


@contextlib.contextmanager
def recorded_launches(*modules: types.ModuleType) -> Iterator[list[Launch]]:
    """Inside the block, each launch (``kernel[grid](...)``) of a kernel named ``*_kernel`` in any of
    `modules` is recorded, once per signature, and then runs; the yielded list is filled when the
    block exits."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    kernels = [(module, n, v) for module in modules for n, v in vars(module).items()
               if isinstance(v, (InterpretedFunction, triton.runtime.jit.JITFunction)) and n.endswith("_kernel")]  # fmt: skip
    launches: dict[str, Launch] = {}
    records: list[Launch] = []
    try:
        for module, name, kernel in kernels:
            setattr(module, name, _Recorder(module.__name__, name, kernel, launches))
        yield records
    finally:
        for module, name, kernel in kernels:
            setattr(module, name, kernel)
        records.extend(launches.values())


class CompileCheckError(RuntimeError):
    """A recorded launch that the compiler refused (the message is the compiler's)."""


class NoCudaCompiler(RuntimeError):
    """This triton build cannot compile for CUDA (no NVIDIA backend or ptxas)."""


def compile_launches(launches: list[Launch], target: tuple[str, int, int] = HOPPER, timeout_s: float = 600) -> list[str]:
    """PTX of each launch compiled for `target`, in a child process without TRITON_INTERPRET.

    Raises CompileCheckError for a kernel the compiler refuses, NoCudaCompiler where triton has no
    CUDA backend to compile with."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the kernels import as they do here
    request = json.dumps({"target": list(target), "launches": [asdict(x) for x in launches]})
    proc = subprocess.run([sys.executable, "-m", __name__], input=request, capture_output=True, text=True,
                          env=env, timeout=timeout_s)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"compile check process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads(proc.stdout)
    if "no_cuda_compiler" in results:
        raise NoCudaCompiler(results["no_cuda_compiler"])
    for launch, result in zip(launches, results["results"]):
        if "error" in result:
            raise CompileCheckError(f"{launch.module}.{launch.kernel} does not compile for {target}: {result['error']}")
    return [r["ptx"] for r in results["results"]]


def _compile_one(launch: dict, target: tuple[str, int, int]) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    attrs = {(i,): [["tt.divisibility", 16]] for i in launch["aligned"]}
    source = ASTSource(kernel, launch["signature"], launch["constants"], attrs=attrs)
    return triton.compile(source, target=GPUTarget(*target), options=launch["options"]).asm["ptx"]


def _main() -> None:
    request = json.load(sys.stdin)
    target = tuple(request["target"])
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as err:
        json.dump({"no_cuda_compiler": f"{type(err).__name__}: {err}"}, sys.stdout)
        return
    results = []
    for launch in request["launches"]:
        try:
            results.append({"ptx": _compile_one(launch, target)})
        except Exception as err:  # noqa: BLE001 - reported to the caller, which raises it
            results.append({"error": f"{type(err).__name__}: {err}"[-4000:]})
    json.dump({"results": results}, sys.stdout)


if __name__ == "__main__":
    _main()

"""Shared test setup."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model tests on one intra-op thread.

    Tiny shapes gain nothing from threads; on a loaded 2-core machine two threads made a
    (4, 300, 32) x (32, 48) linear 60x slower (26 ms against 0.4 ms).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at import; on a machine without a GPU it must be the CPU one
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Triton kernels run under the interpreter on CPU tensors; triton.jit reads this when a kernel is
    # defined, so it is set before any test module imports dnd_kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""GPU lane: tests marked ``gpu`` are skipped where CUDA (or, for vLLM tests, vLLM) is missing.

Run on the GPU machine through ``ops/gpu/run.sh``. Figures a test measures are printed and,
when ``CONVEYOR_GPU_REPORT`` names a file, appended to it as JSON lines (the run script
collects them for docs/performance.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os

import pytest

# Ask for CUDA through NVML: a parent whose CUDA driver was initialised (which
# ``torch.cuda.is_available()`` does otherwise) cannot fork vLLM's engine core.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs vLLM importable (with gpu: skipped without it)")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if item.get_closest_marker("gpu") is None:  # not ``keywords``: it holds the folder name
            continue
        if not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        elif item.get_closest_marker("vllm") is not None and not vllm:
            item.add_marker(pytest.mark.skip(reason="needs vLLM (ops/gpu/run.sh installs it on the GPU machine)"))


def report(name: str, **figures) -> None:
    """Print a test's figures and append them to ``$CONVEYOR_GPU_REPORT``."""
    line = json.dumps({"test": name, **figures})
    print(f"figures {line}")
    path = os.environ.get("CONVEYOR_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="session")
def loop():
    """One event loop for the whole session: a vLLM engine is bound to the loop it started on."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()

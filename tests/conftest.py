"""Shared fixtures: tiny SD-shaped pipelines, built once per test session.

The saved folders and the in-memory pipeline are shared by every test: read them, never modify them
(copy the folder or call `build_tiny_pipeline` for a private one).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from bksdm.world.tiny import build_tiny_pipeline, save_tiny_pipeline
from bksdm.world.tiny_dit import DIT_LAYOUTS, save_tiny_dit_pipeline

# Tests compare images and weights bit for bit: the thread count must not change mid-run with the machine's load
# (bksdm.threads). Tests of that adaptation set BKSDM_OMP_WAIT themselves; CLI subprocesses inherit this.
os.environ.setdefault("BKSDM_OMP_WAIT", "active")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SD-v1 pipeline (seed 0), loadable with `StableDiffusionPipeline.from_pretrained`."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-v1"), "sd-v1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SD-v2 (epsilon-prediction) pipeline (seed 0)."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-v2"), "sd-v2", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SDXL pipeline (seed 0), loadable with `StableDiffusionXLPipeline.from_pretrained`."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), "sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_pipe() -> StableDiffusionPipeline:
    """The in-memory tiny SD-v1 pipeline (seed 0): the same weights as `tiny_sd_dir`."""
    return build_tiny_pipeline("sd-v1", seed=0)


@pytest.fixture(scope="session")
def tiny_dit_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny SD3, SD3.5, FLUX.1-dev and FLUX.1-schnell pipelines (seed 0), by layout name."""
    root = tmp_path_factory.mktemp("tiny-dit")
    return {layout: save_tiny_dit_pipeline(root / layout, layout) for layout in DIT_LAYOUTS}


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): images
    compared byte for byte must not depend on how work is split between threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

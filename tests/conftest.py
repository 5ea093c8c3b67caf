"""Shared fixtures: tiny SD-shaped pipelines, built once per test session.

The saved folders and the in-memory pipeline are shared by every test: read them, never modify them
(copy the folder or call `build_tiny_pipeline` for a private one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline

from bksdm.world.tiny import build_tiny_pipeline, save_tiny_pipeline


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

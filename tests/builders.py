"""Test data that tests of several stages build (importable from every folder under tests/: pytest puts this
folder on sys.path for its conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path


def shapes_folder(folder: Path, count: int, seed: int = 3, listed: int | None = None) -> list[str]:
    """``count`` shapes-world images with a manifest listing the first ``listed`` of them (all by default)."""
    from bksdm.world.shapes import pairs

    folder.mkdir(parents=True, exist_ok=True)
    lines, prompts = [], []
    for i, (image, scene) in enumerate(pairs(seed, count)):
        image.save(folder / f"{i:06d}.png")
        prompts.append(scene.caption)
        lines.append(json.dumps({"index": i, "prompt": scene.caption, "seed": i, "file": f"{i:06d}.png"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines[:listed]) + "\n")
    return prompts

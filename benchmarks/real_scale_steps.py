"""The steps of ``real_scale.py`` (the :class:`Step` record) and its ``lcm`` and ``adapt`` groups.

``lcm``: ``bksdm lcm`` on the pruned bk-small student as its own teacher, 2 steps, as a full LCM pipeline and as an
LCM-LoRA. ``adapt``: a teacher LoRA (``bksdm dreambooth --lora`` on the teacher, 2 steps) carried onto bk-small
with ``bksdm adapt lora``, and the teacher's ControlNet (``ControlNetModel.from_unet`` of the teacher's random
U-Net, made by the build step: :func:`save_teacher_controlnet`) pruned for bk-small with ``bksdm adapt controlnet``,
then pruned and distilled for 2 steps on a small folder of control images (:func:`write_control_data`).

Imported by ``real_scale.py`` (run from the ``benchmarks`` folder's path, as the other benchmarks import each other).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LORA_FILE = "pytorch_lora_weights.safetensors"  # bksdm.use.lora.LORA_FILE: what load_lora_weights(folder) reads
REPORT = "adapt_report.json"  # bksdm.use.adapters.student.REPORT_FILE + ".json": every `bksdm adapt`'s report
CONTROL_COLUMN = "conditioning_image"  # bksdm.use.adapters.controlnet_kd.CONTROL_COLUMN: the KD's default column


@dataclass
class Step:
    """One command of the check."""

    name: str
    argv: list[str]  # after the program; program is `bksdm` unless `python` is set
    ceiling_gib: float
    outputs: list[Path]  # removed before the run (a rerun starts clean) and measured on disk after it
    needs: list[Path] = field(default_factory=list)  # skipped when one is missing
    python: bool = False  # argv is for `python` (the build step), not `bksdm`
    keep_outputs: bool = False  # resume: continue in the folder of an earlier step
    interact: Callable[[subprocess.Popen, Path], str] | None = None  # talks to a running command (serve)
    check: Callable[[], str] | None = None  # inspects the outputs; returns a note, raises on a wrong result
    timeout_s: float = 7200.0
    group: str = "other"


def add_prerequisites(chosen: list[Step], plan: list[Step]) -> list[Step]:
    """``chosen`` plus, for every missing path a chosen step needs, the step of ``plan`` that writes it (its
    outputs hold the path or a folder above it; resumes, which write into an earlier step's folder, never count),
    and so on for that step's own needs; in the order of ``plan``."""
    names, todo = {s.name for s in chosen}, list(chosen)
    while todo:
        step = todo.pop()
        for need in step.needs:
            if need.exists():
                continue
            writer = next(
                (
                    s
                    for s in plan
                    if s is not step and not s.keep_outputs and any(o == need or o in need.parents for o in s.outputs)
                ),
                None,
            )
            if writer is not None and writer.name not in names:
                names.add(writer.name)
                todo.append(writer)
    return [s for s in plan if s.name in names]


def remove_unneeded(step: Step, later: list[Step]) -> None:
    """Delete ``step``'s outputs that no later step reads (``--lean``: a GPU machine's 64 GB disk)."""
    needed = [p for s in later for p in s.needs] + [p for s in later if s.keep_outputs for p in s.outputs]
    for output in step.outputs:
        if output.is_dir() and not any(n == output or output in n.parents for n in needed):
            shutil.rmtree(output, ignore_errors=True)


def row_order(name: str, order: list[str]) -> tuple[int, str]:
    """Sort key of a result row: the step's place in the plan (a ``[overrides]`` suffix ignored), then the name."""
    base = re.sub(r" \[.*\]$", "", name)
    return (order.index(base) if base in order else len(order), name)


# ------------------------------------------------------------------------------------------ preparation


def write_control_data(folder: Path, count: int = 8) -> None:
    """``count`` 320x288 images of a coloured square on a textured background, each with its control image (the
    square in white on black) and a caption, in ``metadata.csv`` (file_name,text,conditioning_image): the layout
    ``bksdm adapt controlnet --data`` reads (diffusers' ``train_controlnet.py``'s column names)."""
    if (folder / "metadata.csv").is_file():
        return
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image = Image.fromarray(rng.integers(180, 256, (288, 320, 3), dtype=np.uint8))
        control = Image.new("RGB", image.size, "black")
        x, y = int(rng.integers(10, 180)), int(rng.integers(10, 150))
        box = (x, y, x + 120, y + 120)
        image.paste((210, 40, 40), box)
        control.paste((255, 255, 255), box)
        image.save(folder / f"{i:03d}.png")
        control.save(folder / f"{i:03d}-control.png")
        rows.append((f"{i:03d}.png", "a photo of a red square", f"{i:03d}-control.png"))
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text", CONTROL_COLUMN])
        writer.writerows(rows)


def save_teacher_controlnet(unet: Any, out: Path) -> None:
    """The teacher's ControlNet: ``ControlNetModel.from_unet`` (the U-Net's encoder copied, zero convolutions at
    zero, as a ControlNet starts training), saved in safetensors. With the random U-Net of the build it is a random
    ControlNet of the real shapes, which is what ``bksdm adapt controlnet`` maps."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet)
    controlnet.save_pretrained(out, safe_serialization=True)
    del controlnet


# ------------------------------------------------------------------------------------------------ checks


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RuntimeError(f"no {path.parent.name}/{path.name}")
    return json.loads(path.read_text(encoding="utf-8"))


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file (``safe_open`` reads its header only)."""
    from safetensors import safe_open

    if not path.is_file():
        raise RuntimeError(f"no {path.parent.name}/{path.name}")
    with safe_open(path, "pt") as f:
        return list(f.keys())


def lcm_note(run: Path, mode: str) -> str:
    """``run/student`` as the README says it loads: a pipeline folder whose scheduler is ``LCMScheduler`` (full:
    its U-Net has the guidance embedding; lora: plus ``pytorch_lora_weights.safetensors`` of U-Net adapters), and a
    checkpoint at step 2."""
    student = run / "student"
    _json(student / "model_index.json")
    scheduler = _json(student / "scheduler" / "scheduler_config.json").get("_class_name")
    if scheduler != "LCMScheduler":
        raise RuntimeError(f"student/scheduler is {scheduler}, not LCMScheduler")
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"))
    if not checkpoints:
        raise RuntimeError(f"no checkpoint in {run / 'checkpoints'}")
    if mode == "full":
        projection = _json(student / "unet" / "config.json").get("time_cond_proj_dim")
        if not projection:
            raise RuntimeError("student/unet has no guidance embedding (time_cond_proj_dim)")
        kind = f"U-Net with a {projection}-wide guidance embedding"
    else:
        adapters = [k for k in safetensors_keys(student / LORA_FILE) if k.startswith("unet.")]
        if not adapters:
            raise RuntimeError(f"student/{LORA_FILE} holds no U-Net adapters")
        kind = f"{LORA_FILE} ({len(adapters)} U-Net tensors)"
    return f"student/: LCMScheduler, {kind}; {checkpoints[-1].name}"


def adapt_lora_note(out: Path) -> str:
    """The carried LoRA file and the report of the adapters kept and dropped."""
    keys = safetensors_keys(out / LORA_FILE)
    report = _json(out / REPORT)
    a, p = report["adapters"], report["params"]
    if a["kept"] == 0:
        raise RuntimeError("no adapter kept")
    return (
        f"{len(keys)} tensors; adapters {a['kept']} of {a['total']} kept ({a['moved']} moved), {a['dropped']} "
        f"dropped ({p['dropped_share']:.0%} of the parameters)"
    )


def adapt_controlnet_note(out: Path, distilled: bool) -> str:
    """A ``ControlNetModel`` folder with safetensors weights and the report (and, distilled, the probe's KD loss)."""
    config = _json(out / "config.json")
    if config.get("_class_name") != "ControlNetModel":
        raise RuntimeError(f"config.json names {config.get('_class_name')}, not ControlNetModel")
    safetensors_keys(out / "diffusion_pytorch_model.safetensors")
    report = _json(out / REPORT)
    residuals = report["residuals"]
    note = (
        f"{len(residuals['skips'])} skip residuals kept, {len(residuals['dropped_skips'])} dropped; "
        f"{report['params']['carried'] / 1e6:.0f}M of {report['params']['teacher_controlnet'] / 1e6:.0f}M parameters"
    )
    if distilled:
        if "distillation" not in report:
            raise RuntimeError("the report has no distillation")
        probe = report["distillation"]["probe_loss_kd_out"]
        note += f"; probe KD loss {probe['before']:.3g} -> {probe['after']:.3g}"
    return note


# ------------------------------------------------------------------------------------------------- steps


def lcm_steps(c: Any, work: Path, res: str, gpu: bool) -> list[Step]:
    """``bksdm lcm`` of the pruned bk-small student (its own teacher): full pipeline and LCM-LoRA, 2 steps each."""
    student = work / "prune-bk-small"
    common = [
        f"model.teacher={student}", f"data.train={work / 'data'}", f"data.resolution={res}", "train.batch_size=1",
        "train.gradient_accumulation_steps=1", "train.max_steps=2", "train.checkpoint_every=2",
        "train.validate_every=0", "train.log_every=1", f"train.mixed_precision={'fp16' if gpu else 'no'}",
    ]  # fmt: skip
    full, lora = work / "lcm-full", work / "lcm-lora"
    return [
        Step("lcm 2 steps full (bk-small)", ["lcm", *common, "model.mode=full", f"train.output_dir={full}"],
             c.lcm, [full], [student], group="lcm", check=lambda: lcm_note(full, "full")),
        Step("lcm 2 steps LoRA (bk-small)", ["lcm", *common, "model.mode=lora", f"train.output_dir={lora}"],
             c.lcm_lora, [lora], [student], group="lcm", check=lambda: lcm_note(lora, "lora")),
    ]  # fmt: skip


def adapt_steps(c: Any, work: Path, res: str, gpu: bool) -> list[Step]:
    """A teacher LoRA (2 DreamBooth steps) carried onto bk-small; the teacher's ControlNet pruned for bk-small, and
    pruned then distilled for 2 steps."""
    teacher, student, controlnet = work / "teacher", work / "prune-bk-small", work / "controlnet"
    db_lora = work / "db-lora-teacher"
    db = ["dreambooth", "--model", teacher, "--instance-dir", work / "subject", "--instance-prompt",
          "a photo of sks shape", "--steps", "2", "--resolution", res, "--validation-every", "0",
          "--checkpoint-every", "2", "--lora", "--out", db_lora]  # fmt: skip
    if gpu:
        db += ["--mixed-precision", "fp16"]
    lora_out, cn_out, kd_out = work / "adapt-lora", work / "adapt-controlnet", work / "adapt-controlnet-kd"
    kd_run = kd_out.with_name(kd_out.name + "-kd")  # the KD's default run folder (checkpoints, logs)
    cn = ["adapt", "controlnet", "--student", student, "--controlnet", controlnet]
    return [
        Step("dreambooth 2 steps LoRA (teacher)", db, c.teacher_lora, [db_lora], [teacher], group="adapt",
             check=lambda: f"{len(safetensors_keys(db_lora / LORA_FILE))} tensors"),
        Step("adapt lora (teacher LoRA -> bk-small)",
             ["adapt", "lora", "--student", student, "--lora", db_lora / LORA_FILE, "--out", lora_out],
             c.adapt_lora, [lora_out], [student, db_lora / LORA_FILE], group="adapt",
             check=lambda: adapt_lora_note(lora_out)),
        Step("adapt controlnet (prune for bk-small)", [*cn, "--out", cn_out], c.adapt_controlnet, [cn_out],
             [student, controlnet, teacher], group="adapt", check=lambda: adapt_controlnet_note(cn_out, False)),
        Step("adapt controlnet + 2 KD steps",
             [*cn, "--out", kd_out, "--distill-steps", "2", "--data", work / "control-data", "--batch-size", "1",
              "--resolution", res, "--checkpoint-every", "2"],
             c.controlnet_kd, [kd_out, kd_run], [student, controlnet, teacher], group="adapt",
             check=lambda: adapt_controlnet_note(kd_out, True)),
    ]  # fmt: skip

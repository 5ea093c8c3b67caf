"""A teacher's ControlNet carried onto its distilled bk-small student with ``bksdm adapt controlnet``, in the shapes
world: does the student put the shape where the control says?

Usage (from the repository root, with bksdm installed)::

    python benchmarks/adapt_controlnet_shapes.py    # 17 min on 2 shared cores (+ the demo when the student is absent)
    python benchmarks/adapt_controlnet_shapes.py --count 32 --controlnet-steps 50 --kd-steps 10   # a quick check

What it runs, each stage with the project's own functions:

1. a ControlNet trained on the bundled teacher (:func:`bksdm.world.train_controlnet.train_controlnet`): the control
   image is a disc at the shape's centre, the prompts name no position;
2. the distilled bk-small student of ``bksdm demo --plan bk-small --out runs/students-bk-small`` (run with the demo's
   own :func:`bksdm.world.demo.run_demo` when absent);
3. ``bksdm adapt controlnet`` (:func:`bksdm.use.adapters.controlnet_job.adapt_controlnet`) of the ControlNet onto the
   student: pruned only (mid residual from the ControlNet's whole mid block, and from its first ResNet only), and
   pruned then distilled briefly on the student's training images (the demo's data seed) with their controls;
4. for each model, :func:`bksdm.world.train_controlnet.placement`: held-out scenes, prompts without a position, the
   control disc at the scene's shape; the share of images whose shape the classifier finds in the control's
   quadrant, and the share whose shape, colour and size are the prompt's. The rows without a ControlNet run the
   same stock ControlNet pipeline with an untrained ControlNet, whose zero convolutions make it the plain model
   (``tests/use/test_adapt_controlnet.py`` checks the images are identical);
5. two diagnostics of why the pruned ControlNet alone places fewer shapes: the teacher's *unpruned* ControlNet, of
   whose 12 residuals the student gets 8 (:func:`picked_controlnet`; a stock ``ControlNetModel`` cannot do this: it
   emits one residual per layer it has), either those of the skips the student kept (what the pruned ControlNet
   emits, but computed by the whole down path) or those the student's up layers received in the teacher
   (:func:`consumed_skips`).

Prints a table and writes ``benchmarks/results/adapt_controlnet_shapes.json`` with the command, time and CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROWS = (
    ("teacher", "none"),
    ("teacher", "teacher's ControlNet"),
    ("bk-small student", "none"),
    ("bk-small student", "teacher's ControlNet, as is"),
    ("bk-small student", "carried (pruned)"),
    ("bk-small student", "carried (pruned, mid: first ResNet)"),
    ("bk-small student", "carried + distilled"),
    ("bk-small student", "diagnostic: unpruned ControlNet, residuals of the kept skips"),
    ("bk-small student", "diagnostic: unpruned ControlNet, residuals its up layers took in the teacher"),
)


def distilled_student(root: Path, plan: str = "bk-small") -> Path:
    """The distilled student of ``bksdm demo --plan PLAN --out ROOT/students-PLAN`` (the demo run when absent)."""
    from bksdm.loading import PLAN_FILE
    from bksdm.world.demo import DemoSettings, run_demo

    out = root / f"students-{plan}"
    found = sorted(out.glob(f"runs/*/student/{PLAN_FILE}"))
    if not found:
        run_demo(out, DemoSettings(plan=plan))
        found = sorted(out.glob(f"runs/*/student/{PLAN_FILE}"))
    return found[0].parent


def picked_controlnet(folder: Path, picks: list[int]):
    """Diagnostic only: the teacher's unpruned ControlNet that hands the pipeline its residuals at ``picks``."""
    from diffusers import ControlNetModel

    class Picked(ControlNetModel):
        def forward(self, *args, **kwargs):
            kwargs["return_dict"] = False
            down, mid = super().forward(*args, **kwargs)
            return [down[i] for i in picks], mid

    return Picked.from_pretrained(folder)


def consumed_skips(resolved) -> list[int]:
    """For each student skip, the teacher skip that the teacher up layer its consumer came from took (the up path
    pops skips from the end, one per layer, innermost stage first)."""
    from bksdm.use.adapters.controlnet import controlnet_skips

    teacher_skips, student_skips = controlnet_skips(resolved)
    taken, t = {}, len(teacher_skips)
    for stage in resolved.layout.up:
        for j in range(stage.num_layers):
            t -= 1
            taken[(stage.index, j)] = t
    picks, k = [0] * len(student_skips), len(student_skips)
    for stage in resolved.up:
        for layer in stage.layers:
            k -= 1
            picks[k] = taken[(stage.teacher.index, layer)]
    return picks


def measure(model: Path, controlnet, count: int) -> dict[str, Any]:
    """:func:`placement` of the stock ControlNet pipeline of ``model`` (a pipeline folder) with ``controlnet``."""
    from diffusers import StableDiffusionPipeline

    from bksdm.world.teacher import recommended_settings
    from bksdm.world.train_controlnet import controlnet_pipeline, placement

    settings = recommended_settings()
    pipe = controlnet_pipeline(StableDiffusionPipeline.from_pretrained(model), controlnet)
    return placement(pipe, count, steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/adapt_controlnet_shapes"))
    parser.add_argument("--students", type=Path, default=Path("runs"), help="where runs/students-bk-small lives")
    parser.add_argument("--controlnet-steps", type=int, default=400)
    parser.add_argument("--kd-steps", type=int, default=100)
    parser.add_argument("--kd-lr", type=float, default=3e-4)
    parser.add_argument("--kd-data", type=int, default=4000, help="training images of the student, with controls")
    parser.add_argument("--count", type=int, default=96, help="held-out images per row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapt_controlnet_shapes.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import ControlNetModel, UNet2DConditionModel

    from bksdm.families import family_of
    from bksdm.loading import load_denoiser_config, load_plan
    from bksdm.use.adapters.controlnet import controlnet_from_student, controlnet_skips
    from bksdm.use.adapters.controlnet_job import adapt_controlnet
    from bksdm.use.adapters.controlnet_kd import ControlNetKDSettings
    from bksdm.world.demo import DemoSettings
    from bksdm.world.teacher import TEACHER_DIR
    from bksdm.world.teacher_eval import machine
    from bksdm.world.train_controlnet import (
        EMBEDDING_CHANNELS,
        ControlNetRecipe,
        build_controlnet,
        export_control_data,
        train_controlnet,
    )

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    began, cpu = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}
    record: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }

    tick = time.perf_counter()
    controlnet_dir = work / f"controlnet-{args.controlnet_steps}"
    if not (controlnet_dir / "config.json").is_file():
        recipe = ControlNetRecipe(out=str(controlnet_dir), steps=args.controlnet_steps, threads=args.threads)
        train_controlnet(recipe, record["command"])
    record["controlnet"] = json.loads((controlnet_dir / "bksdm_toy.json").read_text())
    seconds["controlnet"] = time.perf_counter() - tick

    tick = time.perf_counter()
    student = distilled_student(args.students)
    seconds["student"] = time.perf_counter() - tick

    tick = time.perf_counter()
    carried = work / "carried"
    record["adapt"] = adapt_controlnet(student, controlnet_dir, carried, overwrite=True)
    resnet = work / "carried-resnet"
    adapt_controlnet(student, controlnet_dir, resnet, overwrite=True, mid_block="resnet")
    seconds["adapt"] = time.perf_counter() - tick

    tick = time.perf_counter()
    data = work / "kd-data"
    if not (data / "metadata.csv").is_file():
        export_control_data(data, args.kd_data, seed=DemoSettings().seed)  # the demo's data seed: the student's
    kd = ControlNetKDSettings(data=str(data), steps=args.kd_steps, batch_size=32, lr=args.kd_lr, overwrite=True)
    distilled = work / "carried-distilled"
    record["distill"] = adapt_controlnet(student, controlnet_dir, distilled, overwrite=True, distill=kd)["distillation"]
    seconds["distill"] = time.perf_counter() - tick

    teacher_unet = UNet2DConditionModel.from_pretrained(TEACHER_DIR / "unet")
    student_unet = UNet2DConditionModel.from_pretrained(student / "unet")
    config = load_denoiser_config(TEACHER_DIR)
    resolved = family_of(config).resolve(load_plan(student), config)
    teacher, kept = controlnet_skips(resolved)
    record["diagnostic_picks"] = {"kept": [teacher.index(s) for s in kept], "taken": consumed_skips(resolved)}
    plain_student = controlnet_from_student(student_unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)
    models = {
        ROWS[0]: (TEACHER_DIR, build_controlnet(teacher_unet)),
        ROWS[1]: (TEACHER_DIR, ControlNetModel.from_pretrained(controlnet_dir)),
        ROWS[2]: (student, plain_student),
        ROWS[3]: (student, ControlNetModel.from_pretrained(controlnet_dir)),
        ROWS[4]: (student, ControlNetModel.from_pretrained(carried)),
        ROWS[5]: (student, ControlNetModel.from_pretrained(resnet)),
        ROWS[6]: (student, ControlNetModel.from_pretrained(distilled)),
        ROWS[7]: (student, picked_controlnet(controlnet_dir, [teacher.index(s) for s in kept])),
        ROWS[8]: (student, picked_controlnet(controlnet_dir, consumed_skips(resolved))),
    }
    results = []
    for (model, controlnet_name), (folder, controlnet) in models.items():
        tick = time.perf_counter()
        row: dict[str, Any] = {"model": model, "controlnet": controlnet_name}
        try:
            row |= measure(folder, controlnet, args.count)
        except RuntimeError as err:  # the unpruned ControlNet on the student: the stock pipeline fails on shapes
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        seconds[f"{model} / {controlnet_name}"] = time.perf_counter() - tick
        results.append(row)
        print(json.dumps(row), flush=True)

    record["results"] = results
    record["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    record["wall_time_s"] = round(time.perf_counter() - began, 1)
    record["cpu_time_s"] = round(time.process_time() - cpu, 1)
    record["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of the rows."""
    from bksdm.plan.render import markdown_table

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["controlnet"], "fails", "fails", r["error"]])
        else:
            rows.append(
                [r["model"], r["controlnet"], f"{r['position_accuracy']:.3f}", f"{r['attribute_accuracy']:.3f}", ""]
            )
    header = ["model", "ControlNet", "shape where the control says", "shape, colour, size as prompted", "note"]
    return markdown_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())

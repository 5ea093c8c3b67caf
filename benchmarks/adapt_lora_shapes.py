"""A teacher's DreamBooth LoRA carried onto its distilled students with ``bksdm adapt lora``, in the shapes world.

Usage (from the repository root, with bksdm installed)::

    python benchmarks/adapt_lora_shapes.py      # 11 min on 2 shared cores (+ 2 demos when the students are absent)

What it runs, each stage with the project's own functions:

1. the DreamBooth LoRA of the red ring bound to "sks", trained on the bundled teacher exactly as the must-show test
   trains it (``tests/use/test_dreambooth.py``: its subject images, class prompts and ``--lora --rank 8 --steps 300
   --lr 5e-4``, U-Net only), into ``--work``;
2. the distilled bk-small and bk-tiny students of ``bksdm demo --plan P --out runs/students-P`` (run with the demo's
   own :func:`bksdm.world.demo.run_demo` when absent);
3. ``bksdm adapt lora`` (:func:`bksdm.use.adapters.lora_job.adapt_lora`) of the LoRA onto each student, no training;
4. for the teacher and each student, without the LoRA, with the carried LoRA and with the teacher's LoRA loaded as is
   (stock ``load_lora_weights``): rings drawn for the instance prompt in 8 images (the must-show test's seeds and
   yardstick: ``filled_centre`` < 0.3, and the classifier reading red at the top left), discs still drawn for the
   class prompt, and prompt accuracy on the demo's 96 held-out captions and seeds (``bksdm.eval.evaluate`` with
   the shapes classifier);
5. why a student misses: the same figures for the teacher with only the adapters a student keeps (and with the
   dropped adapters of each kind of removed block silenced in turn), and how far distillation moved the adapted
   weights from the teacher's beside the size of the LoRA's delta on them.

Prints a table and writes ``benchmarks/results/adapt_lora_shapes.json`` with the command, time and CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "use"))  # the must-show test's subject, prompts and yardstick

from test_dreambooth import CLASS_PROMPT, INSTANCE_PROMPT, PRIOR, filled_centre, subject_images  # noqa: E402

MUST_SHOW = ["--lora", "--rank", "8", "--steps", "300", "--lr", "5e-4"]
"""tests/use/test_dreambooth.py::test_must_show_lora_binds_a_new_subject_with_a_small_adapter's settings."""
RING_SEED, IMAGES = 2, 8
"""The must-show test's seeds (``prompt_seed(2, i)``) and image count for the instance and class prompts."""


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def train_lora(work: Path) -> Path:
    """The must-show DreamBooth LoRA on the bundled teacher (``bksdm dreambooth``), unless already there."""
    from bksdm.cli import main
    from bksdm.use.lora import LORA_FILE

    out = work / "dreambooth"
    if (out / LORA_FILE).is_file():
        return out
    subject = subject_images(work / "subject", count=5)
    args = ["dreambooth", "--instance-dir", str(subject), "--instance-prompt", INSTANCE_PROMPT, "--out", str(out)]
    args += ["--class-prompt", *PRIOR, "--num-class-images", str(len(PRIOR)), "--class-dir", str(work / "class")]
    args += ["--mixed-precision", "no", "--validation-every", "0", "--checkpoint-every", "0", "--batch-size", "2"]
    if main([*args, *MUST_SHOW]) != 0:
        raise RuntimeError("bksdm dreambooth failed")
    return out


def demo_students(root: Path, plan: str) -> tuple[Path, Path]:
    """The distilled student of ``bksdm demo --plan PLAN --out ROOT/students-PLAN`` and the pruned one it started
    from, the demo run with its own function when it is not there yet."""
    from bksdm.loading import PLAN_FILE
    from bksdm.world.demo import DemoSettings, run_demo

    out = root / f"students-{plan}"
    found = sorted(out.glob(f"runs/*/student/{PLAN_FILE}"))
    if not found:
        if out.exists() and any(out.iterdir()):  # never write into a demo that may still be running
            raise RuntimeError(f"{out} holds no distilled student yet (a demo still running?): wait, or remove it")
        run_demo(out, DemoSettings(plan=plan))
        found = sorted(out.glob(f"runs/*/student/{PLAN_FILE}"))
    return found[0].parent, out / "pruned" / plan


def load(folder: Path, lora: Path | None = None):
    """A stock pipeline from ``folder``, with ``lora`` loaded by stock ``load_lora_weights``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe


def silence(denoiser: torch.nn.Module, modules: set[str]) -> None:
    """Zeroes the B matrices (so the delta W) of the loaded adapters on ``modules``."""
    from peft.tuners.lora import LoraLayer

    for name, module in denoiser.named_modules():
        if name in modules and isinstance(module, LoraLayer):
            for b in module.lora_B.values():
                b.weight.data.zero_()


def drift(distilled: Path, pruned: Path, adapted: Path) -> dict[str, float]:
    """How far distillation moved the adapted modules' weights from the teacher's (the pruned student's), beside the
    size of the LoRA's delta on them: relative Frobenius norms over all adapted modules."""
    from peft.tuners.lora import LoraLayer

    before, after = load(pruned, adapted).unet, dict(load(distilled).unet.named_modules())
    change = delta = norm = 0.0
    with torch.no_grad():
        for name, module in before.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.base_layer.weight
                change += float((after[name].weight - weight).norm() ** 2)
                delta += float(module.get_delta_weight(module.active_adapters[0]).norm() ** 2)
                norm += float(weight.norm() ** 2)
    return {"distillation_change": (change / norm) ** 0.5, "lora_delta": (delta / norm) ** 0.5}


def measure(pipe, folder: Path) -> dict[str, Any]:
    """Rings for the instance prompt, discs for the class prompt (8 images each), and prompt accuracy on the demo's
    held-out captions (generated into ``folder`` and scored by ``bksdm.eval.evaluate``)."""
    from bksdm.artifacts import MANIFEST_FILE
    from bksdm.eval.evaluate import EvaluationOptions, evaluate
    from bksdm.eval.generate import generate_images, prompt_seed
    from bksdm.world.classifier import load_classifier, predict
    from bksdm.world.demo import GENERATE_BATCH, HELD_OUT_SEED
    from bksdm.world.shapes import all_scenes
    from bksdm.world.teacher import recommended_settings

    settings = recommended_settings()
    sampling = {"steps": settings["num_inference_steps"], "guidance_scale": settings["guidance_scale"]}
    seeds = [prompt_seed(RING_SEED, i) for i in range(IMAGES)]
    rings = generate_images(pipe, [INSTANCE_PROMPT] * IMAGES, seeds, **sampling)
    discs = generate_images(pipe, [CLASS_PROMPT] * IMAGES, seeds, **sampling)
    classifier = load_classifier()
    read = [(s.color, s.position) for s in predict(classifier, rings)]
    prompts = [scene.caption for scene in all_scenes()]
    held_out = [HELD_OUT_SEED + i for i in range(len(prompts))]
    images = generate_images(pipe, prompts, held_out, batch_size=GENERATE_BATCH, **sampling)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        image.save(folder / f"{i:06d}.png")
        lines.append(json.dumps({"index": i, "prompt": prompt, "seed": HELD_OUT_SEED + i, "file": f"{i:06d}.png"}))
    (folder / MANIFEST_FILE).write_text("\n".join(lines) + "\n")
    (folder / "sks").mkdir(exist_ok=True)
    for i, image in enumerate(rings):
        image.save(folder / "sks" / f"{i}.png")
    scores = evaluate(folder, options=EvaluationOptions(metrics=["shapes"], batch_size=256, device="cpu"))
    filled = [float(filled_centre(im)) for im in rings]
    return {
        "rings": sum(f < 0.3 for f in filled),
        "rings_red_top_left": sum(f < 0.3 and r == ("red", "top left") for f, r in zip(filled, read, strict=True)),
        "class_discs": sum(filled_centre(im) > 0.7 for im in discs),
        "prompt_accuracy": scores["metrics"]["shapes_prompt_accuracy"],
        "filled_centre": [round(f, 3) for f in filled],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/adapt_lora_shapes"), help="LoRA, adapted LoRAs, images")
    parser.add_argument("--students", type=Path, default=Path("runs"), help="where runs/students-PLAN demos live")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapt_lora_shapes.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # other jobs share the CPU
    from bksdm.use.adapters.lora_job import adapt_lora
    from bksdm.world.teacher import TEACHER_DIR

    started = time.perf_counter()
    record: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
    }
    work = args.work
    trained = not (work / "dreambooth" / "dreambooth.json").is_file()
    lora = train_lora(work)
    record["lora"] = json.loads((lora / "dreambooth.json").read_text()) | {"args": MUST_SHOW}
    record["lora_seconds"] = time.perf_counter() - started if trained else None  # None: trained by an earlier run
    record["adapt"], reports = {}, {}
    # (row, model folder, LoRA folder or None, modules whose adapters are silenced)
    runs: list[tuple[str, Path, Path | None, set[str]]] = [
        ("teacher, no LoRA", TEACHER_DIR, None, set()),
        ("teacher, teacher's LoRA", TEACHER_DIR, lora, set()),
    ]
    for plan in ("bk-small", "bk-tiny"):
        student, pruned = demo_students(args.students, plan)
        carried = work / f"adapted-{plan}"
        report = reports[plan] = adapt_lora(student, lora, carried, overwrite=True)
        dropped = {d["module"] for d in report["dropped"]}
        figures = {k: report[k] for k in ("adapters", "params")}
        blocks = sorted({d["block"] for d in report["dropped"]})
        record["adapt"][plan] = {"student": str(student), **figures, "dropped_blocks": blocks}
        record["adapt"][plan]["weights"] = drift(student, pruned, carried)
        print(plan, record["adapt"][plan], flush=True)
        runs += [
            (f"{plan}, no LoRA", student, None, set()),
            (f"{plan}, carried LoRA (adapt lora)", student, carried, set()),
            (f"{plan}, teacher's LoRA as is", student, lora, set()),
        ]
        # Why a student misses: the teacher with only the adapters the student keeps (the others' B set to zero),
        # then with the dropped adapters of one kind of removed block silenced at a time.
        groups = {"": dropped} | {
            g: {d["module"] for d in report["dropped"] if d["block"].split(".")[0] == g}
            for g in sorted({d["block"].split(".")[0] for d in report["dropped"]})
        }
        for group, modules in groups.items():
            if all(silenced != modules for *_, silenced in runs):  # bk-small and bk-tiny may drop the same adapters
                where = f" in {group}" if group else ""
                key = f"teacher, teacher's LoRA less the {len(modules)} adapters {plan} drops{where}"
                runs.append((key, TEACHER_DIR, lora, modules))
    rows: dict[str, dict[str, Any]] = {}
    for key, folder, adapter, silenced in runs:
        try:
            pipe = load(folder, adapter)
        except (RuntimeError, ValueError) as err:  # what stock diffusers does with a LoRA that does not fit
            first = " ".join(line.strip() for line in str(err).strip().splitlines()[:2])
            rows[key] = {"error": f"{type(err).__name__}: {first}"}
        else:
            silence(pipe.unet, silenced)
            rows[key] = measure(pipe, work / "images" / key.replace(", ", "-").replace(" ", "_").replace("'", ""))
        print(key, rows[key], flush=True)
    record["rows"] = rows
    record["seconds"] = time.perf_counter() - started
    record["load_average_after"] = os.getloadavg()

    lines = [
        f"| model | rings for `{INSTANCE_PROMPT}` (of {IMAGES}) | red, top left | class prompt discs "
        "| prompt accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, r in rows.items():
        if "error" in r:
            lines.append(f"| {key} | load fails: {r['error'][:160]} | | | |")
        else:
            figures = [r["rings"], r["rings_red_top_left"], r["class_discs"], f"{r['prompt_accuracy']:.3f}"]
            lines.append(f"| {key} | " + " | ".join(str(f) for f in figures) + " |")
    lines += [
        "",
        "| student | adapters carried | dropped (share of parameters) | distillation moved the adapted weights by "
        "| the LoRA's delta on them |",
        "|---|---:|---:|---:|---:|",
    ]
    for plan, a in record["adapt"].items():
        n, w = a["adapters"], a["weights"]
        lines.append(f"| {plan} | {n['kept']} of {n['total']} | {n['dropped']} ({a['params']['dropped_share']:.1%}) "
                     f"| {w['distillation_change']:.1%} | {w['lora_delta']:.1%} |")  # fmt: skip
    record["table"] = "\n".join(lines)
    print(record["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

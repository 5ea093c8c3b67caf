"""``bksdm demo``: the whole job on the bundled shapes teacher, offline, in minutes on a CPU.

prune → distill (the real recipe) → generate with teacher and students on the same prompts and seeds →
evaluate (prompt accuracy and Fréchet distance from the shapes classifier, params, MACs, latency) → a report
folder. With ``ablations`` it also trains the paper's two baselines with the same budget: the same student
trained with the task loss only, and a randomly initialised student (BK-SDM, Table 5 in miniature).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bksdm.eval.generate import generate_images
from bksdm.plan.prune import unet_macs
from bksdm.profiling import count_params, measure_latency, unet_inputs
from bksdm.train.config import load_config
from bksdm.train.validation import image_grid

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """What the demo runs; the defaults take about 3 minutes on 2 idle CPU cores."""

    plan: str = "bk-tiny"
    steps: int = 400
    """Distillation steps per student."""
    batch_size: int = 32
    lr: float = 5e-4
    data_size: int = 4000
    """Shapes pairs exported as the training folder."""
    eval_seeds: int = 1
    """Images per scene for evaluation (96 scenes each)."""
    sampling_steps: int = 25
    guidance_scale: float | None = None
    """None: the guidance scale shipped with the teacher."""
    ablations: bool = False
    seed: int = 1234
    extra: list[str] = field(default_factory=list)
    """Extra ``key=value`` overrides for the distill recipe."""


def _students(settings: DemoSettings) -> dict[str, list[str]]:
    """Each student's name and its recipe overrides (all share every other setting and the budget)."""
    students = {f"{settings.plan} (KD)": []}
    if settings.ablations:
        students[f"{settings.plan} (task loss only)"] = ["loss.lambda_out=0", "loss.lambda_feat=0"]
        students[f"{settings.plan} (random init, KD)"] = ["model.init=random"]
    return students


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_demo(out: str | Path, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Runs the demo and writes ``out/summary.md``, ``summary.json``, ``grid.png``, ``loss_curve*.png``."""
    from bksdm.loading import teacher_or_default
    from bksdm.train.distill import distill
    from bksdm.world import classifier as shapes_classifier
    from bksdm.world.shapes import all_scenes, export
    from bksdm.world.teacher import TEACHER_DIR, load_teacher, recommended_settings

    teacher_or_default(None)  # fails at once, with the fix, when the bundled teacher is missing
    settings = settings or DemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shipped = recommended_settings()
    guidance = settings.guidance_scale if settings.guidance_scale is not None else shipped["guidance_scale"]

    logger.info("1/4 exporting %d shapes pairs to %s", settings.data_size, out / "data")
    data = export(out / "data", settings.data_size, seed=settings.seed)

    runs: dict[str, Path] = {}
    for i, (name, extra) in enumerate(_students(settings).items()):
        logger.info("2/4 distilling student %d: %s (%d steps)", i + 1, name, settings.steps)
        run_dir = out / "runs" / _slug(name)
        overrides = [
            f"model.teacher={TEACHER_DIR}",
            f"model.plan={settings.plan}",
            f"data.train={data}",
            "data.resolution=64",
            "data.num_workers=0",
            f"train.output_dir={run_dir}",
            f"train.max_steps={settings.steps}",
            f"train.batch_size={settings.batch_size}",
            "train.gradient_accumulation_steps=1",
            "train.mixed_precision=no",
            "train.gradient_checkpointing=false",
            "train.validate_every=0",
            f"train.checkpoint_every={settings.steps}",
            "train.keep_checkpoints=1",
            f"train.log_every={max(1, settings.steps // 40)}",
            "train.use_ema=false",
            f"optim.lr={settings.lr}",
            f"train.seed={settings.seed}",
            *extra,
            *settings.extra,
        ]
        if run_dir.exists():
            shutil.rmtree(run_dir)
        runs[name] = distill(load_config(None, overrides))

    logger.info("3/4 generating with the teacher and %d student(s)", len(runs))
    scenes = all_scenes()
    prompts = [s.caption for s in scenes for _ in range(settings.eval_seeds)]
    seeds = [50_000 + i for i in range(len(prompts))]  # held out: training data uses other seeds
    classifier = shapes_classifier.load_classifier()
    reference = shapes_classifier.reference_statistics(classifier)
    models: dict[str, Any] = {"teacher": load_teacher()}
    from diffusers import StableDiffusionPipeline

    for name, folder in runs.items():
        models[name] = StableDiffusionPipeline.from_pretrained(folder)

    summary: dict[str, Any] = {"settings": vars(settings) | {"guidance_scale": guidance}, "models": {}}
    images: dict[str, list] = {}
    for name, pipe in models.items():
        pipe.set_progress_bar_config(disable=True)
        images[name] = generate_images(
            pipe, prompts, seeds, steps=settings.sampling_steps, guidance_scale=guidance, batch_size=16, progress=True
        )
        logger.info("4/4 evaluating %s", name)
        summary["models"][name] = _evaluate(pipe, images[name], prompts, classifier, reference)
    teacher_accuracy = summary["models"]["teacher"]["prompt_accuracy"]
    for name in runs:
        metrics = summary["models"][name]
        metrics["accuracy_vs_teacher"] = metrics["prompt_accuracy"] / teacher_accuracy if teacher_accuracy else 0.0
        metrics["run"] = str(runs[name].parent)
    summary["seconds"] = time.perf_counter() - started
    _write_report(out, summary, images, prompts, runs)
    return summary


def _evaluate(pipe, images, prompts, classifier, reference) -> dict[str, Any]:
    from bksdm.world import classifier as shapes_classifier
    from bksdm.world.shapes import parse_caption

    unet = pipe.unet
    config = dict(unet.config)
    resolution = config["sample_size"] * pipe.vae_scale_factor
    macs = unet_macs(config, resolution)
    inputs = unet_inputs(config, resolution)
    inputs["encoder_hidden_states"] = torch.zeros(1, 77, config["cross_attention_dim"])
    inputs["sample"] = torch.zeros(1, config["in_channels"], config["sample_size"], config["sample_size"])
    with torch.no_grad():
        latency = measure_latency(lambda: unet(**inputs), warmup=2, repeats=10)
    return {
        "prompt_accuracy": shapes_classifier.prompt_accuracy(classifier, images, prompts),
        "attribute_accuracy": shapes_classifier.attribute_accuracy(
            classifier, images, [parse_caption(p) for p in prompts]
        ),
        "frechet_distance": shapes_classifier.shapes_frechet_distance(classifier, images, reference),
        "unet_params": count_params(unet),
        "unet_macs": macs.conv_linear,
        "unet_step_ms": latency.median * 1000,
    }


def _write_report(out: Path, summary: dict[str, Any], images: dict[str, list], prompts: list[str], runs) -> None:
    names = list(images)
    columns = min(8, len(prompts))
    picks = [round(i * (len(prompts) - 1) / max(1, columns - 1)) for i in range(columns)]
    image_grid([[images[n][i] for i in picks] for n in names], names).save(out / "grid.png")
    for name, folder in runs.items():
        curve = folder.parent / "loss_curve.png"
        if curve.is_file():
            shutil.copy(curve, out / f"loss_curve-{_slug(name)}.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [
        f"| {n} | {m['prompt_accuracy']:.3f} | {m.get('accuracy_vs_teacher', 1.0):.0%} | {m['frechet_distance']:.2f} | "
        f"{m['unet_params']:,} | {m['unet_macs'] / 1e6:.1f}M | {m['unet_step_ms']:.1f} |"
        for n, m in summary["models"].items()
    ]
    s = summary["settings"]
    text = "\n".join(
        [
            "# bksdm demo",
            "",
            f"Plan `{s['plan']}`, {s['steps']} distillation steps of batch {s['batch_size']} per student, "
            f"{len(prompts)} held-out prompts, {s['sampling_steps']} sampling steps at guidance {s['guidance_scale']}; "
            f"{summary['seconds'] / 60:.1f} minutes in all.",
            "",
            "| model | prompt accuracy | of teacher's | Fréchet distance | U-Net params | U-Net MACs "
            "| U-Net step (ms) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Prompt accuracy: share of images whose shape, colour, size and position, as the shapes classifier reads "
            "them, all match the prompt. Fréchet distance: between classifier features of the generated images and "
            "of real shapes images (lower is better).",
            "",
            "![teacher vs students](grid.png)",
            "",
            *[f"![loss curve {n}](loss_curve-{_slug(n)}.png)" for n in runs],
            "",
        ]
    )
    (out / "summary.md").write_text(text)

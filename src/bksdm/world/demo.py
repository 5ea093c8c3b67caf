"""``bksdm demo``: the whole job on the bundled shapes teacher, offline, in minutes on a CPU.

The demo runs each stage's own function, so its figures are what the commands give:

1. export shapes pairs as a training folder (:func:`bksdm.world.shapes.export`);
2. prune the teacher (:func:`bksdm.plan.prune.prune`, ``bksdm prune``) into ``pruned/``;
3. distil each student from its pruned folder with the real recipe (:func:`bksdm.train.distill.distill`,
   ``bksdm distill``) into ``runs/``;
4. generate with the teacher and every student on the same held-out prompts and seeds
   (:func:`bksdm.eval.generate.generate_folder`, ``bksdm generate``) into ``images/``;
5. evaluate each folder with the shapes classifier (:func:`bksdm.eval.evaluate.evaluate_folder`,
   ``bksdm evaluate --metrics shapes``: prompt accuracy and Fréchet distance);
6. compare them (:func:`bksdm.eval.report.write_report`, ``bksdm report --latency``: params and MACs from
   :mod:`bksdm.eval.profile`, latency, the image grid), and write the demo's summary (``summary.md``,
   ``summary.json``) and the loss curves.

With ``ablations`` it also trains the paper's two baselines with the same budget: the same student trained with
the task loss only, and a randomly initialised student (BK-SDM, Table 5 in miniature). With ``lcm_steps`` the KD
student is then distilled to a few-step model (:func:`bksdm.train.lcm.lcm`, ``bksdm lcm``) and evaluated at
``lcm_sampling_steps`` steps beside the others.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bksdm.artifacts import atomic_file, write_text
from bksdm.plan.render import markdown_table

logger = logging.getLogger(__name__)

HELD_OUT_SEED = 50_000
"""Noise seed of the first evaluation image (image ``i`` uses ``HELD_OUT_SEED + i``); training uses other seeds."""
GENERATE_BATCH = 16
"""Prompts per pipeline call when generating (the images do not depend on it)."""
GRID_COLUMNS = 8
"""Prompts in the report's image grid."""


@dataclass(frozen=True)
class Budget:
    """What the demo runs when not told otherwise, for one kind of denoiser."""

    plan: str
    steps: int
    """Distillation steps per student."""
    lr_scheduler: str
    """``optim.lr_scheduler`` of the distill recipe."""


BUDGETS = {
    # BK-SDM's constant lr; 400 steps: bk-tiny keeps 96% of the teacher's accuracy in about 3 minutes.
    "unet": Budget("bk-tiny", 400, "constant"),
    # Half the joint blocks. The KD student's prompt accuracy (the teacher's is 1.000), 2-core EPYC: constant lr,
    # 400 steps 0.771, 1500 steps 0.906; cosine decay, 1000 steps 0.958 (the whole demo 4.3 min from a fresh
    # clone), 1500 steps 0.969.
    "transformer": Budget("keep-half", 1000, "cosine"),
}
"""The demo's defaults by the teacher's denoiser (``unet``, ``transformer``)."""


@dataclass
class DemoSettings:
    """What the demo runs; the defaults take about 3 minutes on 2 idle CPU cores."""

    teacher: str = "bundled"
    """A bundled teacher's name (``bundled``: the U-Net; ``bundled-sd3``: the SD3-shaped transformer) or a folder of
    a pipeline that draws the shapes world."""
    plan: str | None = None
    """None: the :data:`BUDGETS` plan for the teacher's denoiser (``bk-tiny``, or ``keep-half`` of the blocks)."""
    steps: int | None = None
    """Distillation steps per student (None: the :data:`BUDGETS` steps for the teacher's denoiser)."""
    lr_scheduler: str | None = None
    """None: the :data:`BUDGETS` schedule for the teacher's denoiser."""
    batch_size: int = 32
    lr: float = 5e-4
    data_size: int = 4000
    """Shapes pairs exported as the training folder."""
    eval_seeds: int = 1
    """Images per scene for evaluation (96 scenes each)."""
    sampling_steps: int | None = None
    """None: the steps the teacher's folder records (:func:`bksdm.sampling.sampling_defaults`: 25)."""
    guidance_scale: float | None = None
    """None: the guidance scale the teacher's folder records (3.0 for the bundled one)."""
    ablations: bool = False
    seed: int = 1234
    extra: list[str] = field(default_factory=list)
    """Extra ``key=value`` overrides for the distill recipe."""
    lcm_steps: int = 0
    """Latent consistency distillation steps of the KD student (0: none; ``--lcm``: :data:`LCM_STEPS`)."""
    lcm_sampling_steps: int = 4
    """Steps the LCM student samples with."""


LCM_STEPS = 500
"""The shapes world's LCM budget (``configs/lcm/shapes-bk-tiny-lcm.yaml``: 4-step accuracy falls past 500 steps)."""
LCM_RECIPE = (
    # configs/lcm/shapes-bk-tiny-lcm.yaml: guidance 2-4 (the teacher draws correctly at 2-4, not at 5 and above),
    # lr 1e-4 for a 3M-parameter U-Net, batch 16, fp32 on the CPU.
    "lcm.guidance_min=2.0",
    "lcm.guidance_max=4.0",
    "optim.lr=1e-4",
    "train.batch_size=16",
    "train.mixed_precision=no",
    "train.gradient_checkpointing=false",
    "train.validate_every=0",
    "data.resolution=64",
    "data.num_workers=0",
)


@dataclass(frozen=True)
class _Student:
    """One student of the demo: how its pruned starting point is made, and its recipe overrides."""

    init: str
    """``teacher`` (BK-SDM: the kept blocks' weights) or ``random`` (the ablation)."""
    overrides: tuple[str, ...] = ()


def _students(settings: DemoSettings) -> dict[str, _Student]:
    """Each student's name, starting point and recipe overrides (all share every other setting and the budget)."""
    students = {f"{settings.plan} (KD)": _Student("teacher")}
    if settings.ablations:
        students[f"{settings.plan} (task loss only)"] = _Student("teacher", ("loss.lambda_out=0", "loss.lambda_feat=0"))
        students[f"{settings.plan} (random init, KD)"] = _Student("random")
    return students


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_demo(out: str | Path, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Runs the demo into ``out`` and returns what ``summary.json`` holds.

    Writes ``data/`` (training pairs), ``pruned/`` (the pruned students), ``runs/`` (the distillation runs),
    ``images/`` (each model's images and ``evaluation.json``), the report (``report.md``, ``report.html``,
    ``report.json``, ``grid.png``, ``chart.png``), ``summary.md``, ``summary.json`` and ``loss_curve-*.png``.

    Raises:
        TeacherNotFoundError: The teacher is missing (at once, with the fix).
        TrainingSetupError: ``lcm_steps`` for a transformer teacher (``bksdm lcm`` distils U-Nets).
        TrainingStopped: SIGTERM stopped a distillation after its checkpoint.
    """
    from dataclasses import replace

    from bksdm.families import family_of
    from bksdm.loading import load_denoiser_config, teacher_or_default
    from bksdm.sampling import sampling_defaults
    from bksdm.world.shapes import all_scenes, export

    settings = settings or DemoSettings()
    teacher = Path(teacher_or_default(settings.teacher))  # fails at once, with the fix, when it is missing
    family = family_of(load_denoiser_config(teacher))
    budget = BUDGETS[family.denoiser]
    settings = replace(
        settings,
        plan=settings.plan or budget.plan,
        steps=settings.steps if settings.steps is not None else budget.steps,
        lr_scheduler=settings.lr_scheduler or budget.lr_scheduler,
    )
    if settings.lcm_steps:
        from bksdm.train.lcm_models import check_teacher

        check_teacher(str(teacher))  # before any work: LCM distils U-Net pipelines only
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    recorded = sampling_defaults(teacher)
    steps = settings.sampling_steps if settings.sampling_steps is not None else recorded.steps
    guidance = settings.guidance_scale if settings.guidance_scale is not None else recorded.guidance_scale
    sampling = {"sampling_steps": steps, "guidance_scale": guidance}

    logger.info("1/5 exporting %d shapes pairs to %s", settings.data_size, out / "data")
    data = export(out / "data", settings.data_size, seed=settings.seed)

    runs: dict[str, Path] = {}
    pruned: dict[str, Path] = {}
    for i, (name, student) in enumerate(_students(settings).items()):
        if student.init not in pruned:
            logger.info("2/5 pruning the teacher with %s (%s weights)", settings.plan, student.init)
            pruned[student.init] = _prune(out, settings, student.init)
        logger.info("3/5 distilling student %d: %s (%d steps)", i + 1, name, settings.steps)
        runs[name] = _distill(out / "runs" / _slug(name), settings, data, pruned[student.init], student.overrides)
    sampling_steps = dict.fromkeys(runs, steps)
    if settings.lcm_steps:
        kd = f"{settings.plan} (KD)"
        name = f"{settings.plan} LCM ({settings.lcm_sampling_steps} steps)"
        logger.info("3/5 latent consistency distillation of %s (%d steps)", kd, settings.lcm_steps)
        runs[name] = _lcm(out / "runs" / _slug(name), settings, data, runs[kd])
        sampling_steps[name] = settings.lcm_sampling_steps

    logger.info("4/5 generating and evaluating the teacher and %d student(s)", len(runs))
    scenes = all_scenes()
    prompts = [s.caption for s in scenes for _ in range(settings.eval_seeds)]
    seeds = [HELD_OUT_SEED + i for i in range(len(prompts))]
    models = {"teacher": teacher, **runs}
    folders: dict[str, Path] = {}
    evaluations: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        n = sampling_steps.get(name, steps)
        folders[name] = _generate(out / "images" / _slug(name), model, prompts, seeds, n, guidance)
        evaluations[name] = _evaluate(folders[name])

    logger.info("5/5 profiling and writing the report")
    from bksdm.eval.report import ReportOptions, write_report

    report = write_report(
        out,
        ReportOptions(
            models={name: str(folder) for name, folder in folders.items()},
            latency=True,
            steps=steps,
            columns=GRID_COLUMNS,
            title="bksdm demo",
        ),
        on_stage=logger.info,
    )
    summary: dict[str, Any] = {"settings": vars(settings) | sampling, "models": {}}
    for name in models:
        summary["models"][name] = _figures(evaluations[name], report["models"][name]["profile"])
    teacher_accuracy = summary["models"]["teacher"]["prompt_accuracy"]
    for name in runs:
        metrics = summary["models"][name]
        metrics["accuracy_vs_teacher"] = metrics["prompt_accuracy"] / teacher_accuracy if teacher_accuracy else 0.0
        metrics["run"] = str(runs[name].parent)
    summary["seconds"] = time.perf_counter() - started
    _write_summary(out, summary, len(prompts), runs)
    return summary


def _prune(out: Path, settings: DemoSettings, init: str) -> Path:
    """The prune job (``bksdm prune``) on the demo's teacher: ``out/pruned/<plan>[-random-init]``."""
    from bksdm.plan.prune import prune

    folder = out / "pruned" / (_slug(settings.plan) + ("" if init == "teacher" else f"-{init}-init"))
    # Seeded as distill seeded the random init when it built the student itself (train.seed): the same weights.
    prune(settings.teacher, settings.plan, folder, init=init, overwrite=True, seed=settings.seed)
    return folder


def _distill(run_dir: Path, settings: DemoSettings, data: Path, student: Path, overrides: tuple[str, ...]) -> Path:
    """The distill recipe from a pruned student folder; returns the final student pipeline's folder."""
    from bksdm.train.config import load_config
    from bksdm.train.distill import distill

    recipe = [
        f"model.teacher={settings.teacher}",
        f"model.plan={settings.plan}",
        f"model.student={student}",
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
        f"optim.lr_scheduler={settings.lr_scheduler}",
        f"train.seed={settings.seed}",
        *overrides,
        *settings.extra,
    ]
    if run_dir.exists():  # a fresh run each time: the demo's figures come from this run alone
        shutil.rmtree(run_dir)
    return distill(load_config(None, recipe))


def _lcm(run_dir: Path, settings: DemoSettings, data: Path, student: Path) -> Path:
    """The LCM recipe (``bksdm lcm``) on a distilled student; returns the few-step pipeline's folder."""
    from bksdm.train.lcm import lcm
    from bksdm.train.lcm_config import load_lcm_config

    recipe = [
        f"model.teacher={student}",
        f"data.train={data}",
        f"train.output_dir={run_dir}",
        f"train.max_steps={settings.lcm_steps}",
        f"train.checkpoint_every={settings.lcm_steps}",
        "train.keep_checkpoints=1",
        f"train.log_every={max(1, settings.lcm_steps // 40)}",
        f"train.seed={settings.seed}",
        *LCM_RECIPE,
    ]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return lcm(load_lcm_config(None, recipe))


def _generate(folder: Path, model: Path, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> Path:
    """``bksdm generate`` of the held-out prompts into ``folder`` (on the CPU in fp32, as the figures were made)."""
    from bksdm.eval.generate import GenerateOptions, generate_folder

    if folder.exists():  # never resumed: the same student folder may hold new weights since the last demo
        shutil.rmtree(folder)
    options = GenerateOptions(
        prompts=prompts,
        out=folder,
        model=str(model),
        steps=steps,
        guidance=guidance,
        batch_size=GENERATE_BATCH,
        seeds=seeds,
        dtype="fp32",
        device="cpu",
    )
    generate_folder(options)
    return folder


def _evaluate(folder: Path) -> dict[str, float]:
    """``bksdm evaluate --metrics shapes`` of a generated folder (writes its ``evaluation.json``)."""
    from bksdm.eval.evaluate import EvaluationOptions, evaluate_folder

    # One batch of up to 256 images, as the classifier reads a list of images by itself.
    result, _ = evaluate_folder(folder, options=EvaluationOptions(metrics=["shapes"], batch_size=256, device="cpu"))
    return result["metrics"]


def _figures(metrics: dict[str, float], profile: dict[str, Any]) -> dict[str, Any]:
    """One model's entry of ``summary.json`` from its evaluation and its profile."""
    from bksdm.world.shapes import ATTRIBUTES

    attributes = {name: metrics[f"shapes_{name}_accuracy"] for name in ATTRIBUTES}
    return {
        "prompt_accuracy": metrics["shapes_prompt_accuracy"],
        "attribute_accuracy": attributes | {"all": metrics["shapes_prompt_accuracy"]},
        "frechet_distance": metrics["shapes_frechet_distance"],
        "denoiser_params": profile["denoiser_params"],
        "denoiser_macs": profile["denoiser_macs"],
        "denoiser_step_ms": profile["denoiser_step_s"] * 1000,
    }


def _write_summary(out: Path, summary: dict[str, Any], prompts: int, runs: dict[str, Path]) -> None:
    """``summary.json``, ``summary.md`` and each run's loss curve as ``loss_curve-<student>.png``."""
    for name, folder in runs.items():
        curve = folder.parent / "loss_curve.png"
        if curve.is_file():
            with atomic_file(out / f"loss_curve-{_slug(name)}.png") as partial:
                shutil.copyfile(curve, partial)
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    rows = [
        [
            n,
            f"{m['prompt_accuracy']:.3f}",
            f"{m.get('accuracy_vs_teacher', 1.0):.0%}",
            f"{m['frechet_distance']:.2f}",
            f"{m['denoiser_params']:,}",
            f"{m['denoiser_macs'] / 1e6:.1f}M",
            f"{m['denoiser_step_ms']:.1f}",
        ]
        for n, m in summary["models"].items()
    ]
    header = ["model", "prompt accuracy", "of teacher's", "Fréchet distance", "denoiser params", "denoiser MACs"]
    s = summary["settings"]
    text = "\n".join(
        [
            "# bksdm demo",
            "",
            f"Teacher `{s['teacher']}`, plan `{s['plan']}`, {s['steps']} distillation steps of batch "
            f"{s['batch_size']} per student (lr {s['lr']:g}, {s['lr_scheduler']} schedule), "
            f"{prompts} held-out prompts, {s['sampling_steps']} sampling steps at guidance {s['guidance_scale']}; "
            f"{summary['seconds'] / 60:.1f} minutes in all.",
            "",
            markdown_table([*header, "denoiser step (ms)"], rows),
            "",
            "Prompt accuracy: share of images whose shape, colour, size and position, as the shapes classifier reads "
            "them, all match the prompt. Fréchet distance: between classifier features of the generated images and "
            "of real shapes images (lower is better). Every figure, with the per-attribute accuracies and the "
            "images' sources, is in [the report](report.md); each model's images and `evaluation.json` are in "
            "`images/`.",
            "",
            "![teacher vs students](grid.png)",
            "",
            *[f"![loss curve {n}](loss_curve-{_slug(n)}.png)" for n in runs],
            "",
        ]
    )
    write_text(out / "summary.md", text)

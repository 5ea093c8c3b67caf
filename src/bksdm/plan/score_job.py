"""The score job (``bksdm plan score``): every removable unit of a teacher, scored on a calibration set.

1. The calibration set: N prompts (a prompt file, a data folder's captions, or the bundled shapes prompts) x S seeds,
   each drawn by the teacher's own pipeline at its recorded sampling settings (clean latents on the teacher's
   distribution, ``output_type="latent"``), then noised at T timesteps spread over the schedule
   (:func:`bksdm.plan.score.noised`); or, with ``cache``, a ``bksdm cache`` folder's latents and text states noised
   the same way. Every draw is seeded (:mod:`bksdm.seeding`).
2. The teacher's predictions on it, with the similarity taps on (:class:`bksdm.plan.score.SimilarityTap`).
3. One real student per ablation (:mod:`bksdm.plan.removable`), built by ``build_student`` and run on the same inputs;
   tied pairs decomposed per unit (:func:`bksdm.plan.score.decompose`).
4. ``validate`` random multi-unit plans: measured against predicted loss, Spearman's rank correlation.
5. ``scores.json``, ``scores.csv``, ``scores.md`` and ``scores.png`` written atomically into the output folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bksdm import __version__
from bksdm.artifacts import atomic_dir
from bksdm.devices import resolve_device, resolve_dtype
from bksdm.families import family_of
from bksdm.families.base import Family
from bksdm.loading import load_denoiser_config, load_pipeline, teacher_or_default
from bksdm.plan.prune import check_output_dir, teacher_resolution
from bksdm.plan.removable import unit_space
from bksdm.plan.score import Calibration, SimilarityTap, decompose, noised, predict, relative_change, schedule_timesteps
from bksdm.plan.score_files import write_score_files
from bksdm.plan.search import Scores, random_removals
from bksdm.plan.spec import PRESETS
from bksdm.plan.surgery import build_student
from bksdm.plan.units import UnitError, UnitSpace
from bksdm.profiling import count_params, device_name
from bksdm.seeding import sample_generator

logger = logging.getLogger(__name__)

STREAM_CALIBRATION = 3
"""Seeding stream of the calibration's starting noise (bksdm.seeding uses 1 for data, 2 for diffusion noise)."""
SCORES_FILE = "scores.json"


@dataclass
class ScoreOptions:
    """What ``bksdm plan score`` measures. The defaults (16 prompts x 4 timesteps x 1 seed, 64 inputs) score the bundled
    shapes teacher in 17 s on one CPU thread (AMD EPYC, 2-core machine shared with other jobs): 5 s sampling, 9.4 s
    for its 20 ablations; ``--validate 10`` adds 4 s.

    Attributes:
        out: The output folder (written atomically).
        teacher: Hub id or folder of a diffusers pipeline; None: the bundled shapes teacher.
        prompts: A prompt file (.txt, .json, .jsonl, .csv); None (and no data/cache): the shapes world's 96 prompts.
        data: A data folder (``metadata.csv``/``.jsonl``) or ``hf:NAME`` whose captions are the prompts.
        cache: A ``bksdm cache`` folder whose latents and text states are the clean inputs (no sampling).
        num_prompts: N prompts (or cache rows), evenly spread over the source.
        timesteps: T timesteps per sample, spread over the schedule.
        seeds: S samples per prompt (cache: noise draws of each row's latent distribution).
        validate: K random multi-unit plans for the additivity check (0: none).
        seed: The base seed of every draw.
        steps: Sampling steps of the teacher's pipeline (None: its recorded or table default).
        guidance: Its guidance scale (None: recorded or table default).
        resolution: Image side in px (None: the teacher's recorded or native size).
        batch_size: Inputs per denoiser forward (and images per sampling call).
        device: ``cpu``, ``cuda``, ``cuda:N``; None: CUDA when available.
        dtype: ``fp32``, ``fp16``, ``bf16``; None: fp16 on CUDA, fp32 elsewhere.
        overwrite: Replace a non-empty ``out``.
    """

    out: str | Path
    teacher: str | None = None
    prompts: str | None = None
    data: str | None = None
    cache: str | None = None
    num_prompts: int = 16
    timesteps: int = 4
    seeds: int = 1
    validate: int = 0
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    resolution: int | None = None
    batch_size: int = 32
    device: str | None = None
    dtype: str | None = None
    overwrite: bool = False

    def check(self) -> None:
        """Raises ValueError naming the option, for any value that cannot work (before anything is loaded)."""
        sources = [n for n in ("prompts", "data", "cache") if getattr(self, n)]
        if len(sources) > 1:
            raise ValueError(f"give one calibration source, not {' and '.join('--' + s for s in sources)}")
        for name in ("num_prompts", "timesteps", "seeds", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: give a whole number >= 1")
        if self.validate < 0:
            raise ValueError(f"--validate {self.validate}: give a whole number >= 0")


def calibration_prompts(options: ScoreOptions) -> tuple[list[str], str]:
    """N prompts evenly spread over the source, and the source in words."""
    if options.prompts:
        from bksdm.eval.prompts import read_prompts

        pool, source = [r.prompt for r in read_prompts(options.prompts)], f"prompt file {options.prompts}"
    elif options.data:
        from bksdm.train.data import open_source
        from bksdm.train.data.images import clean_caption

        data = open_source(options.data)
        picks = spread(len(data), options.num_prompts)
        return [clean_caption(data[i][1])[0] for i in picks], f"captions of {options.data}"
    else:
        from bksdm.world.shapes import all_scenes

        pool, source = [s.caption for s in all_scenes()], "the shapes world's prompts (bksdm.world.shapes)"
    return [pool[i] for i in spread(len(pool), options.num_prompts)], source


def spread(total: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``range(total)`` (all of them, repeated in turn, if ``count > total``)."""
    return [int(k * total / count) % total for k in range(count)]


@torch.no_grad()
def sampled_latents(pipe, prompts: list[str], options: ScoreOptions, settings: dict[str, Any]) -> torch.Tensor:
    """The teacher's own samples, (N*S, C, h, w) float32 on the CPU: prompt i with seed s at row ``i * S + s``.

    Each image starts from ``sample_generator(seed, s, i, STREAM_CALIBRATION)``'s noise, so a row does not depend
    on the batch size. FLUX's pipeline returns packed tokens, unpacked to (C, h, w) here.
    """
    jobs = [(i, s) for i in range(len(prompts)) for s in range(options.seeds)]
    out = []
    for start in tqdm(range(0, len(jobs), options.batch_size), desc="calibration samples", leave=False):
        chunk = jobs[start : start + options.batch_size]
        generators = [sample_generator(options.seed, s, i, STREAM_CALIBRATION) for i, s in chunk]
        latents = pipe(
            [prompts[i] for i, _ in chunk],
            num_inference_steps=settings["steps"],
            guidance_scale=settings["guidance"],
            generator=generators,
            height=settings["resolution"],
            width=settings["resolution"],
            output_type="latent",
        ).images
        if latents.ndim == 3:  # FLUX: (B, h/2 * w/2, 4C) tokens
            from bksdm.families.flux import unpack

            side = settings["resolution"] // pipe.vae_scale_factor
            latents = unpack(latents, side, side)
        out.append(latents.float().cpu())
    return torch.cat(out)


def cached_inputs(folder: str, family: Family, vae, options: ScoreOptions) -> tuple[Any, ...]:
    """Clean latents (N*S, C, h, w), text states and pooled embeddings (or None) of N rows of a cache, each row's
    latent distribution sampled S times (``mean + std * eps``, as distillation does), and the cached prompts."""
    from bksdm.train.cache import CachedDataset
    from bksdm.train.data import SampleRef
    from bksdm.train.encoders import sample_latents

    dataset = CachedDataset(folder, options.seed, random_flip=False, family=family.name)
    latents, text, pooled, captions = [], [], [], []
    for i, row in enumerate(spread(len(dataset), options.num_prompts)):
        item = dataset[SampleRef(row, 0, 0)]
        captions.append(item["caption"])
        text.append(item["text"])
        if "pooled" in item:
            pooled.append(item["pooled"])
        for s in range(options.seeds):
            eps = torch.randn(item["mean"].shape, generator=sample_generator(options.seed, s, i, STREAM_CALIBRATION))
            shift = vae.config.get("shift_factor")
            latents.append(
                sample_latents(item["mean"], item["std"], eps, vae.config.scaling_factor, shift_factor=shift)
            )
    return torch.stack(latents), torch.stack(text), (torch.stack(pooled) if pooled else None), captions, dataset


def score_teacher(options: ScoreOptions) -> dict[str, Any]:
    """Scores every removable unit of the teacher and writes the scores folder (see the module docstring).

    Returns:
        What ``scores.json`` holds.

    Raises:
        ValueError: A bad option; PlanError / UnknownFamilyError: a teacher bksdm cannot prune; CacheError: a cache of
            another family; PromptFileError / DataError: an unreadable prompt source; OutputExistsError: a non-empty
            ``out`` without ``overwrite``; WriteFailed: the folder could not be written (nothing is left).
    """
    options.check()
    started = time.perf_counter()
    out = Path(options.out)
    check_output_dir(out, options.overwrite)
    teacher = teacher_or_default(options.teacher)
    config = load_denoiser_config(teacher)
    family = family_of(config)
    prompts, source = ([], f"cache {options.cache}") if options.cache else calibration_prompts(options)
    if options.cache:  # a missing, incomplete or other-family cache fails before the teacher is loaded
        from bksdm.train.cache import CachedDataset

        CachedDataset(options.cache, options.seed, random_flip=False, family=family.name)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    pipe = load_pipeline(teacher, dtype, str(device))
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, family.denoiser).eval()
    settings = _sampling(teacher, config, pipe, options)
    timing: dict[str, float] = {}

    tick = time.perf_counter()
    if options.cache:
        clean, states, pooled, prompts, dataset = cached_inputs(options.cache, family, pipe.vae, options)
        settings["resolution"] = int(dataset.meta["resolution"])  # the images' size (SDXL's time ids, MACs)
    else:
        clean = sampled_latents(pipe, prompts, options, settings)
        states, pooled = family.encode_prompt(pipe, prompts, device, config)
    states, pooled = states.float().cpu(), (pooled.float().cpu() if pooled is not None else None)
    timing["calibration_s"] = time.perf_counter() - tick
    space = unit_space(config, settings["resolution"], pipe.vae_scale_factor)
    scheduler = family.training_scheduler(pipe.scheduler.config)
    times = schedule_timesteps(family, pipe.scheduler.config, options.timesteps, tuple(clean.shape[1:]))
    noisy, t = noised(family, scheduler, clean, times, options.seed)
    rows = len(prompts) * options.seeds  # text of row m is prompt m // S; inputs are timestep-major
    index = torch.arange(rows).div(options.seeds, rounding_mode="floor").repeat(options.timesteps)
    labels = [(int(index[b]), b % rows % options.seeds, b // rows) for b in range(noisy.shape[0])]
    calibration = Calibration(noisy, t, states[index], pooled[index] if pooled is not None else None, labels)

    def conditioning(batch_pooled):
        return family.conditioning(batch_pooled, settings["resolution"], device, config)

    tick = time.perf_counter()
    sites = {u.address: u.site for u in space.units if u.site is not None}
    with SimilarityTap(denoiser, sites) as tap:
        reference = predict(family, denoiser, calibration, conditioning, options.batch_size, after=tap.collect)
    similarity = tap.scores()
    timing["reference_s"] = time.perf_counter() - tick

    def loss_of(plan) -> float:
        student = build_student(denoiser, plan).student
        pred = predict(family, student, calibration, conditioning, options.batch_size)
        return float(relative_change(pred, reference).mean())

    tick = time.perf_counter()
    losses = {a.key: loss_of(a.plan) for a in tqdm(space.ablations, desc="ablations", leave=False)}
    timing["ablations_s"] = time.perf_counter() - tick
    scores = unit_scores(space, losses)

    tick = time.perf_counter()
    validation = None
    if options.validate:
        validation = validate(space, scores, options.validate, options.seed, loss_of)
        timing["validation_s"] = time.perf_counter() - tick
    timing["total_s"] = time.perf_counter() - started
    record = {
        "bksdm_version": __version__,
        "teacher": teacher,
        "family": family.name,
        "teacher_config": {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"},
        "resolution": settings["resolution"],
        "vae_scale": int(pipe.vae_scale_factor),
        "teacher_params": space.teacher_params,
        "teacher_macs": space.teacher_macs,
        "calibration": {
            "source": source,
            "prompts": prompts,
            "num_prompts": len(prompts),
            "seeds": options.seeds,
            "timesteps": [float(x) for x in times],
            "inputs": len(calibration),
            "seed": options.seed,
            "sampling": None if options.cache else {k: settings[k] for k in ("steps", "guidance", "resolution")},
            "dtype": str(dtype).removeprefix("torch."),
            "device": device_name(device),
        },
        "units": [
            {
                "address": u.address,
                "kind": u.kind,
                "stage": u.stage,
                "ablation": scores.units[u.address],
                "similarity": similarity.get(u.address),
                "params": u.params,
                "macs": u.macs,
                "modules": list(u.modules),
                "contains": list(u.contains),
                "measured": "pairs" if u.address in scores.ties else "alone",
            }
            for u in space.units
        ],
        "pairs": [{"units": list(a.units), "ablation": losses[a.key]} for a in space.ablations if a.tie],
        "presets": preset_predictions(space, scores),
        "validation": validation,
        "timing": timing,
    }
    with atomic_dir(out) as tmp:
        write_score_files(tmp, record)
    logger.info("wrote %s", out)
    return record


def _sampling(teacher: str, config, pipe, options: ScoreOptions) -> dict[str, Any]:
    """The sampling settings of the calibration: the options, else the teacher's recorded ones, else the table's."""
    from bksdm.sampling import sampling_defaults

    recorded = sampling_defaults(teacher, denoiser=config)
    resolution = options.resolution or recorded.height or teacher_resolution(config, pipe.vae_scale_factor)[0]
    steps = options.steps if options.steps is not None else recorded.steps
    guidance = options.guidance if options.guidance is not None else recorded.guidance_scale
    return {"steps": int(steps), "guidance": float(guidance), "resolution": int(resolution)}


def unit_scores(space: UnitSpace, losses: dict[str, float]) -> Scores:
    """Each unit's score: its own ablation's loss, or its share of its tied pairs' losses (decomposed)."""
    units: dict[str, float] = {}
    families: dict[str, dict[tuple[str, str], float]] = {}
    ties: dict[str, str] = {}
    pairs: dict[frozenset[str], float] = {}
    for ablation in space.ablations:
        if ablation.tie is None:
            units[ablation.units[0]] = losses[ablation.key]
            continue
        families.setdefault(ablation.tie, {})[ablation.units] = losses[ablation.key]  # type: ignore[index]
        pairs[frozenset(ablation.units)] = losses[ablation.key]
        ties.update(dict.fromkeys(ablation.units, ablation.tie))
    for family_pairs in families.values():
        units.update(decompose(family_pairs))
    return Scores(units, pairs, ties)


def validate(space: UnitSpace, scores: Scores, count: int, seed: int, loss_of) -> dict[str, Any]:
    """``count`` random valid multi-unit plans: their measured ablation loss against the predicted one."""
    from bksdm.plan.score import spearman

    plans = []
    for units in tqdm(random_removals(space, scores, count, seed), desc="validation plans", leave=False):
        plan = space.plan_for(units, "random")
        plans.append({"units": sorted(units), "predicted": scores.predict(units), "measured": loss_of(plan)})
    rho = spearman([p["predicted"] for p in plans], [p["measured"] for p in plans])
    return {"plans": plans, "spearman": rho, "seed": seed}


def preset_predictions(space: UnitSpace, scores: Scores) -> list[dict[str, Any]]:
    """The U-Net presets that this teacher's units express: the units each removes, its predicted loss and its
    student's parameters as a fraction of the teacher's."""
    out = []
    for name, plan in PRESETS.items():
        if name == "identity" or space.family != "unet":
            continue
        try:
            units = space.removed_by(plan)
        except (UnitError, ValueError):
            continue
        family = family_of(space.config)
        with torch.device("meta"):
            student = family.build(family.resolve(plan, space.config).student_config())
        fraction = count_params(student) / space.teacher_params
        out.append({"name": name, "units": sorted(units), "predicted": scores.predict(units), "params": fraction})
    return out


def load_scores(folder: str | Path) -> dict[str, Any]:
    """A scores folder's record (``scores.json``).

    Raises:
        FileNotFoundError: The folder holds no scores.json (the message says how to make one).
        ValueError: The file is not a bksdm scores record.
    """
    import json

    path = Path(folder) / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--scores {folder}: no {SCORES_FILE} there; make one with `bksdm plan score`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); score the teacher again") from None
    if not isinstance(record, dict) or not {"units", "teacher_config", "family"} <= set(record):
        raise ValueError(f"{path} is not a bksdm scores record; score the teacher again with `bksdm plan score`")
    return record

"""``bksdm generate`` and ``bksdm coco-prompts``: argument parsing; the jobs are
:func:`bksdm.eval.generate.generate_folder` and :func:`bksdm.eval.coco.coco_prompts`."""

from __future__ import annotations

import argparse

from bksdm.eval.prompts import PromptFileError
from bksdm.sampling import table_help

__all__ = ["add_coco_prompts", "add_generate", "run_coco_prompts", "run_generate"]


def add_generate(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` sub-command to the ``bksdm`` parser."""
    p = sub.add_parser(
        "generate",
        help="generate one image per prompt of a prompt file (seeded per prompt, resumable, multi-GPU)",
        description="Generate one image per prompt with a stock diffusers pipeline. Prompt i gets the seed "
        "prompt_seed(--seed, i), so images do not depend on --batch-size or on the number of processes. Run it "
        "again to resume (finished images are skipped). Multi-GPU: accelerate launch --multi_gpu --num_processes "
        "N -m bksdm.cli generate ...",
    )
    p.add_argument(
        "--model", default=None, help="diffusers pipeline folder or hub id (default: the bundled shapes teacher)"
    )
    p.add_argument(
        "--unet",
        default=None,
        help="use this U-Net instead of the model's: a student pipeline folder (with unet/), a U-Net folder "
        "(with config.json) or a hub id whose unet/ to load (U-Net models only; a transformer student is a whole "
        "pipeline: give it as --model)",
    )
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one per line), .json, .jsonl or .csv")
    p.add_argument("--out", required=True, help="output folder (resumed when it holds a run with the same settings)")
    p.add_argument(
        "--scheduler",
        default=None,
        help="scheduler class name, e.g. PNDMScheduler (the paper's), DPMSolverMultistepScheduler, "
        "EulerDiscreteScheduler (default: the model's own)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: the model's recorded setting, as the shapes teachers have, else "
        f"{table_help('text-to-image', 'steps')}; 25 is the paper's)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale, 1 (or 0) for none, else above 1; for FLUX.1 the value fed to its "
        "guidance embedding (default: the model's recorded setting, as the shapes teachers have, else "
        f"{table_help('text-to-image', 'guidance_scale')}; 7.5 is the paper's)",
    )
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="image height, a multiple of the VAE's factor (8 for SD; 16 for SD3 and FLUX.1, whose latents go in "
        "2x2 patches) (default: the model's native size; 1024 for FLUX.1, whose transformer records none); a size "
        "whose estimated memory exceeds what is free is refused before any work",
    )
    p.add_argument("--width", type=int, default=None, help="image width, as --height (default: the native size)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for every image (not for FLUX.1)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses prompt_seed(seed, i) (default 0)")
    p.add_argument(
        "--resize", type=int, default=None, help="resize every image to SIZE x SIZE before saving (paper: 256)"
    )
    p.add_argument(
        "--no-safety-checker",
        action="store_true",
        help="turn off the pipeline's NSFW filter, as the paper's evaluation did (it blacks out images)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: accelerate's, CUDA if available)")
    p.set_defaults(func=run_generate)


def add_coco_prompts(sub: argparse._SubParsersAction) -> None:
    """Add the ``coco-prompts`` sub-command to the ``bksdm`` parser."""
    from bksdm.eval.coco import COCO_30K

    p = sub.add_parser(
        "coco-prompts",
        help="build the MS-COCO 30K prompt file (one caption per image, chosen by seed) from captions_val2014.json",
        description="Pick --count images of a COCO captions file and one caption for each, reproducibly by --seed "
        "(a smaller count gives a prefix of a larger one). Writes image_id, file_name, caption and annotation_id "
        "per prompt, so generated images can be matched with the real ones.",
    )
    p.add_argument("--captions", required=True, help="COCO captions annotations, e.g. captions_val2014.json")
    p.add_argument("--out", required=True, help="prompt file to write: .jsonl or .csv")
    p.add_argument(
        "--count", default=str(COCO_30K), help=f"images to pick, or 'all' (default {COCO_30K}, the paper's 30K)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of images and captions (default 0)")
    p.set_defaults(func=run_coco_prompts)


def run_coco_prompts(args: argparse.Namespace) -> int:
    """Handle ``bksdm coco-prompts``."""
    from bksdm.eval.coco import coco_prompts

    if args.count == "all":
        count = None
    else:
        try:
            count = int(args.count)
        except ValueError:
            raise PromptFileError(f"--count takes a number or 'all', got '{args.count}'") from None
    written, images = coco_prompts(args.captions, args.out, count, args.seed)
    print(f"wrote {written} prompts (one caption per image, seed {args.seed}) of {images} images to {args.out}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """Handle ``bksdm generate``."""
    from bksdm.eval.generate import GenerateOptions, generate_folder

    options = GenerateOptions(
        prompts=args.prompts,
        out=args.out,
        model=args.model,
        unet=args.unet,
        scheduler=args.scheduler,
        steps=args.steps,
        guidance=args.guidance,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seed=args.seed,
        resize=args.resize,
        safety_checker=not args.no_safety_checker,
        device=args.device,
    )
    summary = generate_folder(options)
    if summary.main_process:
        print(summary.describe())
    return 0

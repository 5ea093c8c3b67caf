"""``bksdm img2img``: translate one image or a folder of images towards a prompt (SDEdit), with any SD model.

Parses the options into a :class:`bksdm.use.img2img_job.Img2ImgOptions`, runs it with
:func:`bksdm.use.img2img_job.run_img2img` (which reads, translates and writes) and prints the summary.
"""

from __future__ import annotations

import argparse
import sys

from bksdm.sampling import SAMPLING_TABLE, table_help
from bksdm.use.img2img_job import Img2ImgOptions, run_img2img

_DEFAULTS = SAMPLING_TABLE[("image-to-image", "unet")]  # its strength is every model's

__all__ = ["add_img2img", "run_img2img_command"]


def add_img2img(sub: argparse._SubParsersAction) -> None:
    """Add the ``img2img`` sub-command to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    p = sub.add_parser(
        "img2img",
        help="translate an image or a folder of images towards a prompt (SDEdit), with a teacher or a student",
        description="Noise each input image's latent to --strength and denoise it under --prompt with the stock "
        "diffusers img2img pipeline (SDEdit). --model is any SD / SDXL / SD3 / FLUX.1 pipeline (a student folder "
        "from bksdm prune or distill works as is); --unet swaps a student U-Net into a U-Net model. Each image has "
        "its own seed, derived from --seed and its index in the sorted folder, so results do not depend on "
        "--batch-size.",
    )
    p.add_argument(
        "--model",
        default=None,
        help="diffusers pipeline folder or hub id (default: the bundled shapes teacher)",
    )
    p.add_argument(
        "--unet",
        default=None,
        help="student U-Net to use instead: a pipeline folder or a U-Net folder (U-Net models only; a transformer "
        "student is a whole pipeline: give it as --model)",
    )
    p.add_argument("--image", required=True, help="an image file, or a folder of images (its top level)")
    p.add_argument("--prompt", required=True, help="what the output should show")
    p.add_argument("--negative-prompt", default=None, help="what it should not show")
    p.add_argument(
        "--strength",
        type=float,
        default=_DEFAULTS.strength,
        help=f"0 < S <= 1: how far the input is noised; low keeps it, high follows the prompt (default "
        f"{_DEFAULTS.strength:g})",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (one PNG per input, named after it); for a single --image also a .png/.jpg file",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps of the full schedule, about steps x strength of them run (default: the model's recorded "
        f"setting, else {table_help('image-to-image', 'steps')})",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale, for FLUX.1 its embedded guidance (default: the model's recorded "
        f"setting, else {table_help('image-to-image', 'guidance_scale')})",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        help="scheduler class name, e.g. EulerDiscreteScheduler or DDIMScheduler (default: the model's own)",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses a seed derived from (seed, i)")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    p.add_argument("--size", default=None, help="resize every input to N (square) or WxH pixels first")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    p.set_defaults(func=run_img2img_command)


def run_img2img_command(args: argparse.Namespace) -> int:
    """Handle ``bksdm img2img``: run the job, then print what was translated and what was skipped.

    Returns:
        The exit code: 0 (at least one image was written; otherwise the job raises).

    Raises:
        Img2ImgError: Bad options, no readable input image, or outputs that already exist.
        TeacherNotFoundError: ``--model`` is neither a pipeline folder nor a reachable hub repo.
    """
    options = Img2ImgOptions(
        image=args.image,
        prompt=args.prompt,
        out=args.out,
        model=args.model,
        unet=args.unet,
        negative_prompt=args.negative_prompt,
        strength=args.strength,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        batch_size=args.batch_size,
        size=args.size,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
    )
    run = run_img2img(options, on_skip=lambda reason: print(f"bksdm img2img: skipped {reason}", file=sys.stderr))
    print(
        f"translated {len(run.written)} of {run.inputs} images to {args.out} "
        f"(strength {run.strength:g}: {run.steps_run} of {run.steps} steps, guidance {run.guidance_scale:g}); "
        f"{len(run.skipped)} skipped (unreadable, or too small or too large)"
    )
    for skipped in run.skipped:
        print(f"  skipped {skipped['input']}")
    return 0

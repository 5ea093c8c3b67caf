"""``bksdm adapt controlnet``: a teacher's ControlNet pruned for a student
(:func:`bksdm.use.adapters.controlnet_job.adapt_controlnet`), optionally distilled briefly
(:mod:`bksdm.use.adapters.controlnet_kd`)."""

from __future__ import annotations

import argparse

__all__ = ["add_adapt_controlnet"]


def add_adapt_controlnet(group: argparse._SubParsersAction) -> None:
    """Add ``adapt controlnet`` to the ``bksdm adapt`` group."""
    from bksdm.use.adapters.controlnet import MID_BLOCK_MODES
    from bksdm.use.adapters.controlnet_kd import CONTROL_COLUMN, ControlNetKDSettings

    d = ControlNetKDSettings(data="")
    p = group.add_parser(
        "controlnet",
        help="prune a teacher's ControlNet with the student's plan",
        description="Prune a ControlNet made for the teacher with the plan that made the student, so that its "
        "residuals match the student's skip connections; optionally distil it briefly against the teacher and its "
        "ControlNet. Writes a ControlNetModel folder that stock StableDiffusionControlNetPipeline takes with the "
        "student's U-Net.",
    )
    p.add_argument("--student", required=True, help="student pipeline folder (from bksdm prune or distill)")
    p.add_argument("--controlnet", required=True, help="the teacher's ControlNet: a diffusers ControlNetModel folder")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--teacher", default=None, help="the teacher, when the student's bksdm_plan.yaml names another path")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (and the distillation's run)")
    p.add_argument(
        "--controlnet-mid",
        choices=MID_BLOCK_MODES,
        default="keep",
        help="the block of the mid residual for a student without a mid block: keep the ControlNet's mid block "
        "(default), or only its first ResNet",
    )
    kd = p.add_argument_group("brief distillation (student + carried ControlNet against teacher + its ControlNet)")
    kd.add_argument("--distill-steps", type=int, default=0, help="optimizer steps (default 0: prune only)")
    kd.add_argument(
        "--data",
        default=None,
        help="images, captions and control images: a folder with metadata.csv/.jsonl (or hf:NAME)",
    )
    kd.add_argument("--image-column", default=d.image_column)
    kd.add_argument("--caption-column", default=d.caption_column)
    kd.add_argument("--control-column", default=CONTROL_COLUMN, help="column of the control image (%(default)s)")
    kd.add_argument("--batch-size", type=int, default=d.batch_size)
    kd.add_argument("--lr", type=float, default=d.lr)
    kd.add_argument("--resolution", type=int, default=None, help="training side in px (default: the teacher's)")
    kd.add_argument("--lambda-task", type=float, default=d.lambda_task, help="weight of the diffusion loss beside KD")
    kd.add_argument("--seed", type=int, default=d.seed)
    kd.add_argument("--run-dir", default=None, help="checkpoints and logs (default: OUT-kd beside --out)")
    kd.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="0: only at the end")
    kd.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from bksdm.use.adapters.controlnet_job import adapt_controlnet
    from bksdm.use.adapters.controlnet_kd import ControlNetKDSettings, KDSettingsError

    distill = None
    if args.distill_steps or args.data:
        if not (args.distill_steps and args.data):
            raise KDSettingsError("--distill-steps N and --data DIR go together: give both to distil, neither to prune")
        distill = ControlNetKDSettings(
            data=args.data,
            steps=args.distill_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            resolution=args.resolution,
            image_column=args.image_column,
            caption_column=args.caption_column,
            control_column=args.control_column,
            lambda_task=args.lambda_task,
            seed=args.seed,
            run_dir=args.run_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            checkpoint_every=args.checkpoint_every,
        )
    adapt_controlnet(
        student=args.student,
        controlnet=args.controlnet,
        out=args.out,
        teacher=args.teacher,
        overwrite=args.overwrite,
        mid_block=args.controlnet_mid,
        distill=distill,
    )
    return 0

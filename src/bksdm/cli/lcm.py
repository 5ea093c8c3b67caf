"""``bksdm lcm``: latent consistency distillation of a U-Net pipeline into a few-step student.

The job is :func:`bksdm.train.lcm.lcm`, configured by its recipe (:func:`bksdm.train.lcm_config.load_lcm_config`:
a YAML file plus dotted overrides). A run stopped by SIGTERM raises :class:`bksdm.train.runtime.TrainingStopped`,
which :func:`bksdm.cli.main.main` turns into its exit status.
"""

from __future__ import annotations

import argparse

from bksdm.cli.train import add_recipe_command

__all__ = ["add_lcm"]


def add_lcm(sub: argparse._SubParsersAction) -> None:
    """Add the ``lcm`` sub-command to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    add_recipe_command(
        sub,
        "lcm",
        help="distil a U-Net pipeline into a few-step latent consistency model (full LCM or LCM-LoRA)",
        description="Latent consistency distillation (LCM, arXiv 2310.04378) of an SD-v1/v2 pipeline or a bksdm "
        "student: its own U-Net, with classifier-free guidance over lcm.guidance_min..max, is the ODE-solver teacher. "
        "model.mode=full writes OUT/student, a pipeline with LCMScheduler (1-8 steps); model.mode=lora writes the "
        "same pipeline plus pytorch_lora_weights.safetensors for load_lora_weights. Settings come from a YAML "
        "recipe (configs/lcm/) and/or dotted key=value overrides, e.g. train.max_steps=100 lcm.loss=l2. Multi-GPU: "
        "accelerate launch -m bksdm.cli lcm --config ...",
        config_help="YAML recipe (defaults: the LCM paper's objective)",
        run=_run_lcm,
    )


def _run_lcm(args: argparse.Namespace, overrides: list[str]) -> str:
    from bksdm.train.lcm import lcm
    from bksdm.train.lcm_config import load_lcm_config

    return f"LCM student written to {lcm(load_lcm_config(args.config, overrides))}"

"""``bksdm adapt lora|controlnet``: carry a teacher's adapters onto a student made from it.

Each sub-command parses its own arguments in its own module (:mod:`bksdm.cli.adapt_lora`,
:mod:`bksdm.cli.adapt_controlnet`) and calls one library job in :mod:`bksdm.use.adapters`.
"""

from __future__ import annotations

import argparse

__all__ = ["add_adapt"]


def add_adapt(sub: argparse._SubParsersAction) -> None:
    """Add the ``adapt`` command group to the ``bksdm`` parser.

    Args:
        sub: The sub-parsers object of the ``bksdm`` parser.
    """
    from bksdm.cli.adapt_controlnet import add_adapt_controlnet
    from bksdm.cli.adapt_lora import add_adapt_lora

    p = sub.add_parser(
        "adapt",
        help="carry a teacher's LoRA or ControlNet onto a student pruned from it",
        description="Map an adapter made for the teacher onto a student through the weight map of the plan that "
        "made the student (its bksdm_plan.yaml): adapters of kept blocks move to the student's addresses, those of "
        "removed blocks are dropped and listed. The output loads in stock diffusers.",
    )
    group = p.add_subparsers(dest="adapt_command", required=True)
    add_adapt_lora(group)
    add_adapt_controlnet(group)

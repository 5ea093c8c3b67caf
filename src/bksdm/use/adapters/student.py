"""Tracing a student back to its teacher and plan: what every ``bksdm adapt`` command checks before it reads weights.

A student folder written by ``bksdm prune`` (or distilled from one) holds ``bksdm_plan.yaml``: the teacher it was
made from and the plan. Resolving that plan against the teacher's denoiser config gives the weight map
(``teacher_key``) through which adapters move; the student's own config must be what the plan makes of that teacher,
or the map would put adapters on the wrong modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bksdm.families import family_of
from bksdm.families.base import Family
from bksdm.loading import PLAN_FILE, TeacherNotFoundError, check_pipeline_ref, load_denoiser_config, load_plan
from bksdm.plan.spec import Plan
from bksdm.plan.surgery import Resolved, shapes_of

__all__ = ["REPORT_FILE", "StudentError", "TracedStudent", "check_student", "teacher_config_of", "trace_student"]

REPORT_FILE = "adapt_report"
"""Stem of the report every ``bksdm adapt`` command writes beside its output (``.json`` and ``.md``)."""


class StudentError(ValueError):
    """The student cannot take a carried adapter: no plan file, or not what its plan makes from its teacher."""


@dataclass(frozen=True)
class TracedStudent:
    """A student folder with its teacher's config, its plan resolved against it, and its own denoiser config."""

    folder: Path
    plan_file: Path
    provenance: dict[str, Any]
    """``bksdm_plan.yaml`` as written by prune (``teacher``, ``family``, ``plan``, ...)."""
    teacher_ref: str
    teacher_config: dict[str, Any]
    family: Family
    plan: Plan
    resolved: Resolved
    student_config: dict[str, Any]


def trace_student(
    student: str | os.PathLike, teacher: str | os.PathLike | None, what: str, hint: str = ""
) -> TracedStudent:
    """Reads the student's plan file, finds its teacher's config and checks the student is its plan's student.

    Args:
        student: The student pipeline folder.
        teacher: The teacher, when the one the plan file records cannot be found (``--teacher``); None: that one.
        what: What the command does, for the message about a missing plan file ("maps a LoRA onto").
        hint: More for that message (what to do instead).

    Raises:
        StudentError: No plan file, or the student's denoiser is not what the plan makes from the teacher.
        TeacherNotFoundError: The student or the teacher cannot be found.
    """
    folder = Path(student)
    check_pipeline_ref(folder, "--student")
    plan_file = folder / PLAN_FILE
    if not plan_file.is_file():
        raise StudentError(
            f"--student {folder} has no {PLAN_FILE}: bksdm {what} a student made by bksdm prune (or distilled from "
            f"one), whose plan file says which teacher block each student block came from{hint}"
        )
    provenance = yaml.safe_load(plan_file.read_text()) or {}
    teacher_ref = str(teacher) if teacher else str(provenance.get("teacher", ""))
    teacher_config = teacher_config_of(teacher_ref, plan_file, given=teacher is not None)
    family = family_of(teacher_config)
    plan = load_plan(folder)
    resolved = family.resolve(plan, teacher_config)
    student_config = load_denoiser_config(folder)
    check_student(family, resolved.student_config(), student_config, folder, teacher_ref)
    return TracedStudent(
        folder, plan_file, provenance, teacher_ref, teacher_config, family, plan, resolved, student_config
    )


def teacher_config_of(ref: str, plan_file: Path, given: bool) -> dict[str, Any]:
    """The teacher's denoiser config (no weights).

    Raises:
        TeacherNotFoundError: It cannot be found; the message offers ``--teacher`` when it came from the plan file.
    """
    if not ref:
        raise TeacherNotFoundError(f"{plan_file} names no teacher; pass --teacher with the teacher's folder or hub id")
    try:
        return load_denoiser_config(ref)
    except TeacherNotFoundError as err:
        if given:
            raise TeacherNotFoundError(f"--teacher {ref}: {err}") from None
        raise TeacherNotFoundError(
            f"the teacher {plan_file} records, {ref}, cannot be read ({err}); pass --teacher with the teacher's folder "
            "or hub id"
        ) from None


def check_student(family: Family, planned: dict[str, Any], actual: dict[str, Any], student: Path, teacher: str) -> None:
    """Refuses a student whose denoiser is not the one its plan makes from this teacher (tensor names and shapes).

    Raises:
        StudentError: Naming a few differing tensors.
    """
    with torch.device("meta"):
        want, have = shapes_of(family.build(planned)), shapes_of(family.build(actual))
    wrong = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if wrong:
        examples = ", ".join(f"{k} {list(have[k]) if k in have else '(none)'}" for k in wrong[:3])
        raise StudentError(
            f"--student {student} is not what its plan makes from the teacher {teacher}: {len(wrong)} tensors of its "
            f"{family.denoiser} differ ({examples}); pass --teacher with the teacher it was made from"
        )

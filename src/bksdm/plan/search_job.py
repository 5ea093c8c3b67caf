"""The search job (``bksdm plan search``): a scores folder + a budget → an ordinary plan YAML.

The search itself is :func:`bksdm.plan.search.search`. This job reads the scores, rebuilds the teacher's units from
the recorded config (no weights are loaded), prices each unit (parameters, or MACs per step), checks each candidate's
exact cost on a student built on the meta device, and writes the plan with a comment header saying how it was chosen.

A latency budget has no additive price per unit, so MACs stand in for it: the search runs with a MAC budget, the
chosen student's step latency is measured on the device (random weights: latency does not depend on their values)
against the teacher's, and while it is over budget the MAC budget is tightened by the overshoot (plus 0.01) and the
search run again, at most :data:`LATENCY_ROUNDS` times.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bksdm import __version__
from bksdm.artifacts import write_text
from bksdm.devices import resolve_device, resolve_dtype
from bksdm.families import family_of
from bksdm.loading import load_denoiser_config
from bksdm.plan.removable import unit_space
from bksdm.plan.score_job import load_scores
from bksdm.plan.search import BudgetError, Scores, SearchResult, parse_budget, search
from bksdm.plan.spec import Plan, plan_to_dict
from bksdm.plan.units import UnitSpace
from bksdm.profiling import count_params, measure_latency

logger = logging.getLogger(__name__)

LATENCY_ROUNDS = 6
"""Searches a latency budget may take (each tightening the MAC budget by the measured overshoot)."""


class ScoresMismatchError(ValueError):
    """The scores were measured on another teacher (or an older unit listing) than the one asked for."""


@dataclass
class SearchOptions:
    """What ``bksdm plan search`` looks for.

    Attributes:
        scores: A folder written by ``bksdm plan score``.
        budget: ``params=F``, ``macs=F`` or ``latency=F``: the student keeps at most F of the teacher's.
        out: The plan YAML to write.
        keep: Units (or module addresses) the plan must keep.
        drop: Units the plan must remove.
        teacher: The teacher the plan is for; checked against the one the scores were measured on (None: that one).
        device: Where a latency budget is measured (None: CUDA when available).
        dtype: The dtype it is measured in (None: fp16 on CUDA, fp32 elsewhere).
        name: The plan's name (default ``searched-<kind>-<fraction>``).
        command: The command line, recorded in the header.
    """

    scores: str | Path
    budget: str
    out: str | Path
    keep: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    teacher: str | None = None
    device: str | None = None
    dtype: str | None = None
    name: str | None = None
    command: str = ""


def scores_space(record: dict[str, Any], teacher: str | None = None) -> tuple[UnitSpace, Scores]:
    """The teacher's units rebuilt from a scores record, with their scores.

    Raises:
        ScoresMismatchError: ``teacher``'s denoiser config differs from the recorded one, or the recorded units are
            not the ones this bksdm lists for that config.
    """
    config = record["teacher_config"]
    if teacher is not None:
        given = {k: v for k, v in load_denoiser_config(teacher).items() if not k.startswith("_") or k == "_class_name"}
        differ = sorted(k for k in set(given) | set(config) if given.get(k) != config.get(k))
        if differ:
            raise ScoresMismatchError(
                f"the scores were measured on {record['teacher']}, whose denoiser differs from {teacher}'s "
                f"({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}): score this teacher with "
                "`bksdm plan score`"
            )
    space = unit_space(config, int(record["resolution"]), int(record["vae_scale"]))
    recorded, listed = [u["address"] for u in record["units"]], [u.address for u in space.units]
    if recorded != listed:
        raise ScoresMismatchError(
            f"the scores list the units {', '.join(recorded[:2])}, ... but bksdm {__version__} lists "
            f"{', '.join(listed[:2])}, ... for their teacher ({record['teacher']}): score it again with "
            "`bksdm plan score`"
        )
    ties = {u: a.tie for a in space.ablations if a.tie for u in a.units}
    pairs = {frozenset(p["units"]): float(p["ablation"]) for p in record.get("pairs", [])}
    return space, Scores({u["address"]: float(u["ablation"]) for u in record["units"]}, pairs, ties)


def student_denoiser(space: UnitSpace, plan: Plan) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The plan's student built on the meta device, and its config."""
    family = family_of(space.config)
    config = family.resolve(plan, space.config).student_config()
    with torch.device("meta"):
        return family.build(config), config


def student_costs(space: UnitSpace, plan: Plan) -> dict[str, int]:
    """The student's exact parameters and MACs per step (at the teacher's resolution)."""
    family = family_of(space.config)
    model, config = student_denoiser(space, plan)
    macs = family.step_macs(config, space.resolution, space.vae_scale).conv_linear
    return {"params": count_params(model), "macs": macs}


def step_latency(space: UnitSpace, config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> float:
    """Seconds of one denoiser step at batch 1 and the teacher's resolution (random weights): the fastest of 10 timed
    calls after 3 warm-ups, the one least disturbed by other load (a median swung by 2x on a shared 2-core CPU)."""
    family = family_of(space.config)
    model = family.build(config).to(device=device, dtype=dtype).eval()
    inputs = family.mac_inputs(config, space.resolution, device, space.vae_scale)
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    if "added_cond_kwargs" in inputs:
        inputs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in inputs["added_cond_kwargs"].items()}
    with torch.no_grad():
        return measure_latency(lambda: model(**inputs), warmup=3, repeats=10, device=device).min


def search_plan(options: SearchOptions) -> dict[str, Any]:
    """Searches the plan and writes it (see the module docstring).

    Returns:
        A summary: the plan, the removed units, the predicted loss, the student's params and MACs (and latency) with
        their fractions of the teacher's, and the path written.

    Raises:
        BudgetError: A malformed or impossible budget, contradictory pins; UnitError: an unknown unit in the pins;
            ScoresMismatchError: scores of another teacher; FileNotFoundError: no scores there; WriteFailed.
    """
    budget = parse_budget(options.budget)
    record = load_scores(options.scores)
    space, scores = scores_space(record, options.teacher)
    for name in [*options.keep, *options.drop]:
        space.find(name)  # an unknown pin fails before any work
    name = options.name or f"searched-{budget.kind}-{budget.fraction:g}"
    description = f"lowest predicted loss with {budget} of the teacher's, from the scores in {options.scores}"
    kind = "params" if budget.kind == "params" else "macs"
    cost = {u.address: float(u.params if kind == "params" else u.macs) for u in space.units}
    teacher_cost = float(space.teacher_params if kind == "params" else space.teacher_macs)

    def run(fraction: float) -> SearchResult:
        return search(
            space, scores, cost, teacher_cost, fraction, lambda plan: student_costs(space, plan)[kind],
            keep=options.keep, drop=options.drop, name=name, description=description,
        )  # fmt: skip

    latency: dict[str, Any] | None = None
    if budget.kind == "latency":
        result, latency = _latency_search(space, budget.fraction, run, options)
    else:
        result = run(budget.fraction)
    costs = student_costs(space, result.plan)
    summary = {
        "plan": plan_to_dict(result.plan),
        "units": sorted(result.units),
        "predicted_loss": result.predicted_loss,
        "budget": str(budget),
        "params": {"student": costs["params"], "teacher": space.teacher_params},
        "macs": {"student": costs["macs"], "teacher": space.teacher_macs, "resolution": space.resolution},
        "latency": latency,
        "exhaustive": result.exhaustive,
        "tried": result.tried,
        "out": str(options.out),
    }
    write_text(options.out, _header(summary, record, options) + yaml.safe_dump(summary["plan"], sort_keys=False))
    logger.info("wrote %s", options.out)
    return summary


def _latency_search(space: UnitSpace, target: float, run, options: SearchOptions):
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    teacher = 0.0
    proxy, rounds = target, []
    for _ in range(LATENCY_ROUNDS):
        result = run(proxy)
        _, config = student_denoiser(space, result.plan)
        teacher = step_latency(space, dict(space.config), device, dtype)  # again each round: the load drifts
        ratio = step_latency(space, config, device, dtype) / teacher
        rounds.append({"macs_fraction": round(proxy, 4), "latency_fraction": round(ratio, 4)})
        if ratio <= target:
            return result, {"teacher_s": teacher, "fraction": ratio, "rounds": rounds, "device": str(device)}
        proxy -= ratio - target + 0.01
        if proxy <= 0:
            break
    raise BudgetError(
        f"no plan found whose measured step latency on {device} is at most {target:g} of the teacher's "
        f"({teacher * 1000:.2f} ms); rounds (MAC budget -> latency): "
        + ", ".join(f"{r['macs_fraction']:g} -> {r['latency_fraction']:.3f}" for r in rounds)
    )


def _header(summary: dict[str, Any], record: dict[str, Any], options: SearchOptions) -> str:
    p, m = summary["params"], summary["macs"]
    lines = [
        f"bksdm plan search (bksdm {__version__}): the valid plan with the lowest predicted loss",
        f"within {summary['budget']} of the teacher's denoiser",
        f"scores: {os.fspath(options.scores)} (teacher {record['teacher']}, {record['family']}, "
        f"scored with bksdm {record.get('bksdm_version', '?')})",
        f"predicted loss: {summary['predicted_loss']:.4g} (sum of the removed units' ablation losses)",
        f"student parameters: {p['student']:,} of {p['teacher']:,} ({p['student'] / p['teacher']:.4f})",
        f"student MACs per step at {m['resolution']} px: {m['student']:,} of {m['teacher']:,} "
        f"({m['student'] / m['teacher']:.4f})",
    ]
    if summary["latency"]:
        lat = summary["latency"]
        lines.append(f"measured step latency: {lat['fraction']:.3f} of the teacher's ({lat['device']})")
    lines.append("removed units: " + (", ".join(summary["units"]) or "none"))
    if options.keep or options.drop:
        lines.append(f"pins: keep {', '.join(options.keep) or '-'}; drop {', '.join(options.drop) or '-'}")
    how = "every combination enumerated" if summary["exhaustive"] else "Pareto fronts of the groups combined"
    lines.append(f"search: {how}; {summary['tried']} candidate(s) checked")
    if options.command:
        lines.append(f"command: {options.command}")
    return "".join(f"# {line}\n" for line in lines)

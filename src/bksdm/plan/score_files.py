"""The files of a scores folder: ``scores.json`` (everything), ``scores.csv`` (one row per unit), ``scores.md`` (units
ranked per stage, the tied pairs, the presets' predicted losses, the additivity check) and ``scores.png`` (a bar
chart). :func:`write_score_files` writes them into a folder that the caller makes atomic."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bksdm.plan.render import human, markdown_table

CSV_COLUMNS = (
    "stage", "rank", "address", "kind", "ablation", "similarity", "params", "macs", "measured", "removed_by",
)  # fmt: skip


def write_score_files(folder: Path, record: Mapping[str, Any]) -> None:
    """Writes the four files of a scores folder into ``folder``."""
    (folder / "scores.json").write_text(json.dumps(record, indent=2, allow_nan=False), encoding="utf-8")
    (folder / "scores.csv").write_text(scores_csv(record), encoding="utf-8")
    (folder / "scores.md").write_text(scores_markdown(record), encoding="utf-8")
    scores_chart(record, folder / "scores.png")


def removed_by(record: Mapping[str, Any]) -> dict[str, list[str]]:
    """Unit -> the presets that remove it (itself, or a unit containing it)."""
    contains = {u["address"]: u["contains"] for u in record["units"]}
    out: dict[str, list[str]] = {}
    for preset in record.get("presets") or []:
        for unit in preset["units"]:
            for address in [unit, *contains.get(unit, [])]:
                out.setdefault(address, []).append(preset["name"])
    return out


def ranked(record: Mapping[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The units grouped by stage (in model order), each group sorted by ablation loss, lowest first."""
    stages: dict[str, list[dict[str, Any]]] = {}
    for unit in record["units"]:
        stages.setdefault(unit["stage"], []).append(unit)
    return [(stage, sorted(units, key=lambda u: u["ablation"])) for stage, units in stages.items()]


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def scores_csv(record: Mapping[str, Any]) -> str:
    """One row per unit, ranked per stage (``rank`` 1 = the lowest ablation loss of its stage)."""
    presets = removed_by(record)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for stage, units in ranked(record):
        for rank, u in enumerate(units, start=1):
            similarity = "" if u["similarity"] is None else f"{u['similarity']:.6g}"
            row = [stage, rank, u["address"], u["kind"], f"{u['ablation']:.6g}", similarity, u["params"], u["macs"]]
            writer.writerow([*row, u["measured"], ";".join(presets.get(u["address"], []))])
    return buffer.getvalue()


def scores_markdown(record: Mapping[str, Any]) -> str:
    """The human report of a scores folder."""
    cal = record["calibration"]
    sampling = cal.get("sampling")
    how = (
        f"each drawn by the teacher ({sampling['steps']} steps, guidance {sampling['guidance']:g}, "
        f"{sampling['resolution']} px)"
        if sampling
        else "the cache's latents"
    )
    lines = [
        f"# Unit scores of {record['teacher']}",
        "",
        f"bksdm {record['bksdm_version']}; {record['family']} teacher, {human(record['teacher_params'])} parameters, "
        f"{human(record['teacher_macs'])} MACs per step at {record['resolution']} px.",
        "",
        f"Calibration: {cal['num_prompts']} prompts from {cal['source']} x {cal['seeds']} seed(s), {how}, noised at "
        f"timesteps {', '.join(f'{t:g}' for t in cal['timesteps'])}: {cal['inputs']} inputs, seed {cal['seed']}, "
        f"{cal['dtype']} on {cal['device']}; {record['timing']['total_s']:.1f} s in all.",
        "",
        "**Ablation loss**: the mean relative squared change of the teacher's prediction when the unit alone is "
        "removed (a real student, as `bksdm prune` builds it): 0 = no change, 1 = a change as large as the "
        "prediction. Units measured in pairs (a down layer goes with an up layer of the mirrored stage) carry their "
        "least-squares share of the pair losses; the pairs are listed below. **Similarity**: 1 - cos(input, output) "
        "of the unit in the teacher (— where the shapes differ). Lower means safer to remove.",
    ]
    presets = removed_by(record)
    for stage, units in ranked(record):
        rows = [
            [
                rank,
                f"`{u['address']}`",
                u["kind"],
                _number(u["ablation"]),
                _number(u["similarity"]),
                human(u["params"]),
                human(u["macs"]),
                ", ".join(presets.get(u["address"], [])) or "",
            ]
            for rank, u in enumerate(units, start=1)
        ]
        header = ["rank", "unit", "kind", "ablation loss", "similarity", "params", "MACs/step", "removed by"]
        lines += ["", f"## {stage}", "", markdown_table(header, rows)]
    if record.get("pairs"):
        rows = [[f"`{p['units'][0]}`", f"`{p['units'][1]}`", _number(p["ablation"])] for p in record["pairs"]]
        lines += ["", "## Measured pairs", "", markdown_table(["unit", "tied unit", "ablation loss"], rows)]
    if record.get("presets"):
        rows = [
            [p["name"], _number(p["predicted"]), f"{p['params']:.3f}", ", ".join(f"`{u}`" for u in p["units"])]
            for p in record["presets"]
        ]
        header = ["preset", "predicted loss", "params (of teacher)", "removed units"]
        lines += ["", "## Presets", "", markdown_table(header, rows)]
    lines += _validation_markdown(record.get("validation"))
    return "\n".join(lines) + "\n"


def _validation_markdown(validation: Mapping[str, Any] | None) -> list[str]:
    if not validation:
        return []
    rows = [
        [len(p["units"]), _number(p["predicted"]), _number(p["measured"]), ", ".join(f"`{u}`" for u in p["units"])]
        for p in validation["plans"]
    ]
    rho = validation["spearman"]
    return [
        "",
        "## Additivity check",
        "",
        f"{len(rows)} random valid multi-unit plans (seed {validation['seed']}): measured ablation loss against the "
        f"predicted one (the sum of the removed units' scores). Spearman rank correlation: "
        f"**{'—' if rho is None else f'{rho:.3f}'}**.",
        "",
        markdown_table(["units", "predicted", "measured", "removed units"], rows),
    ]


KIND_COLORS = {
    "down layer": "#4c72b0",
    "up layer": "#55a868",
    "mid block": "#c44e52",
    "innermost stage": "#8172b2",
    "attention block": "#ccb974",
    "block": "#64b5cd",
}


def scores_chart(record: Mapping[str, Any], path: Path) -> None:
    """Horizontal bars per unit in model order: ablation loss (log scale when it spans >100x) and similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = record["units"]
    names = [u["address"] for u in units]
    height = max(3.0, min(0.22 * len(units) + 1.2, 24.0))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    colors = [KIND_COLORS.get(u["kind"], "#888888") for u in units]
    ablation = [max(u["ablation"], 0.0) for u in units]
    positions = list(range(len(units)))
    left.barh(positions, ablation, color=colors)
    positive = [a for a in ablation if a > 0]
    if positive and max(positive) / min(positive) > 100:
        left.set_xscale("log")
    left.set_xlabel("ablation loss (relative squared change)")
    similarity = [u["similarity"] if u["similarity"] is not None else 0.0 for u in units]
    right.barh(positions, similarity, color=colors)
    right.set_xlabel("similarity score (1 - cos)")
    left.set_yticks(positions, names, fontsize=7)
    left.invert_yaxis()
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=c) for k, c in KIND_COLORS.items() if any(u["kind"] == k for u in units)
    ]
    labels = [k for k in KIND_COLORS if any(u["kind"] == k for u in units)]
    right.legend(handles, labels, fontsize=7, loc="best")
    fig.suptitle(f"unit scores of {Path(str(record['teacher'])).name} (lower: safer to remove)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

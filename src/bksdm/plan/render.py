"""Text renderings of plans and prune results, for terminals and markdown reports. Pure: returns strings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bksdm.plan.resolved import ResolvedPlan
from bksdm.plan.spec import Plan
from bksdm.plan.stacks import ResolvedStacks

DENOISER_LABELS = {"unet": "U-Net", "transformer": "transformer"}
"""How reports name a denoiser, by its pipeline attribute."""


def human(n: float, unit: str = "") -> str:
    """``859520964`` → ``"859.5M"``; ``338.7e9`` → ``"338.7G"``."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}{unit}"
    return f"{n:g}{unit}"


def block_rows(
    resolved: ResolvedPlan | ResolvedStacks,
    params: Mapping[str, int] | None = None,
    macs: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per teacher block: address, student address (None = removed), params and MACs if given."""
    rows = []
    for teacher, student in resolved.block_fates():
        row: dict[str, Any] = {"teacher": teacher, "student": student}
        if params is not None:
            row["params"] = params.get(teacher, 0)
        if macs is not None:
            row["macs"] = macs.get(teacher, 0)
        rows.append(row)
    return rows


def format_plan(
    resolved: ResolvedPlan | ResolvedStacks,
    rows: Sequence[Mapping[str, Any]] | None = None,
    teacher: str = "",
    macs_at: str = "",
) -> str:
    """A terminal view of a resolved plan: per stage (U-Net) or stack (transformer), each block kept (and where it
    goes) or removed; ``macs_at`` says at what resolution the rows' MACs were counted."""
    rows = rows if rows is not None else block_rows(resolved)
    plan = resolved.plan
    lines = [f"plan {plan.name}" + (f": {plan.description}" if plan.description else "")]
    if teacher:
        lines.append(f"teacher {teacher}")
    if macs_at and "macs" in rows[0]:
        lines.append(macs_at)
    width = max(len(r["teacher"]) for r in rows) + 2
    has_numbers = "params" in rows[0]
    stage = None
    for row in rows:
        parts = row["teacher"].split(".")
        # A U-Net block groups under its stage (down_blocks.1), a transformer block under its stack.
        current = parts[0] if parts[0] == "mid_block" or len(parts) == 2 else ".".join(parts[:2])
        if current != stage:
            stage = current
            lines.append("")
        mark = f"kept    → {row['student']}" if row["student"] else "removed"
        numbers = ""
        if has_numbers:
            numbers = f"{human(row['params']):>8} params"
            if "macs" in row:
                numbers += f"  {human(row['macs']):>8} MACs"
        lines.append(f"  {row['teacher']:<{width}}{mark:<40}{numbers}")
    kept_removed = _count(rows)
    lines += ["", f"{kept_removed[0]} blocks kept, {kept_removed[1]} removed; {resolved.summary()}"]
    if has_numbers:
        removed = sum(r["params"] for r in rows if r["student"] is None)
        lines.append(f"removed parameters: {removed:,}")
    lines.append(
        "feature-KD pairs (teacher ↔ student): "
        + ", ".join(
            (f"{p.teacher} ↔ {p.student}" if p.teacher != p.student else p.teacher)
            + (f" ({p.stream})" if p.stream else "")
            for p in resolved.feature_pairs()
        )
    )
    return "\n".join(lines)


def _count(rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    kept = sum(1 for r in rows if r["student"])
    return kept, len(rows) - kept


def _pairs_table(pairs: Sequence[Mapping[str, Any]]) -> str:
    """Feature-KD pairs as a markdown table; a ``stream`` column when the pairs name one (transformer blocks)."""
    streams = any(p.get("stream") for p in pairs)
    header = ["teacher module", "student module", "channels", "scale"] + (["stream"] if streams else [])
    rows = []
    for p in pairs:
        row = [f"`{p['teacher']}`", f"`{p['student']}`", p["channels"], f"1/{p['downscale']}"]
        rows.append(row + ([p.get("stream") or ""] if streams else []))
    return markdown_table(header, rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_presets(groups: Mapping[str, Mapping[str, Plan]]) -> str:
    """The presets, one line each, under a heading per group (``bksdm plan list``)."""
    width = max(len(name) for presets in groups.values() for name in presets) + 2
    blocks = []
    for heading, presets in groups.items():
        blocks.append("\n".join([f"{heading}:", *(f"  {n:<{width}}{p.description}" for n, p in presets.items())]))
    return "\n\n".join(blocks)


def prune_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable prune report (``prune_report.md``) from the JSON report's content.

    Rows are labelled by the denoiser (``U-Net`` or ``transformer``); the attention-products row says "not
    counted" when the MAC counter saw no attention call it knows (FLUX.1's attention class).
    """
    denoiser = report.get("denoiser") or {"attribute": "unet", **report["unet"]}
    label = DENOISER_LABELS.get(denoiser["attribute"], denoiser["attribute"])
    t, s = denoiser["teacher"], denoiser["student"]

    def ratio(a: int, b: int) -> str:
        return f"{100 * (1 - b / a):.1f}% smaller" if a else ""

    if t["macs_with_attention"] > t["macs"]:
        with_attention = [
            human(t["macs_with_attention"]),
            human(s["macs_with_attention"]),
            ratio(t["macs_with_attention"], s["macs_with_attention"]),
        ]
    else:
        with_attention = ["not counted", "not counted", ""]
    totals = markdown_table(
        ["", "teacher", "student", "change"],
        [
            [f"{label} parameters", f"{t['params']:,}", f"{s['params']:,}", ratio(t["params"], s["params"])],
            [
                f"{label} MACs / step @{report['resolution']}px (conv+linear)",
                human(t["macs"]),
                human(s["macs"]),
                ratio(t["macs"], s["macs"]),
            ],
            [f"{label} MACs / step incl. attention products", *with_attention],
            [
                f"whole model parameters ({label} + text encoders + VAE decoder)",
                f"{report['whole']['teacher']:,}",
                f"{report['whole']['student']:,}",
                ratio(report["whole"]["teacher"], report["whole"]["student"]),
            ],
        ],
    )
    if report.get("resolution_note"):
        totals += f"\n\nMACs are counted at {report['resolution_note']}."
    blocks = markdown_table(
        ["teacher block", "in the student", "params", "MACs"],
        [
            [
                f"`{r['teacher']}`",
                f"`{r['student']}`" if r["student"] else "**removed**",
                f"{r['params']:,}",
                human(r["macs"]),
            ]
            for r in report["blocks"]
        ],
    )
    changes = markdown_table(
        ["config key", "teacher", "student"],
        [[f"`{k}`", f"`{v[0]}`", f"`{v[1]}`"] for k, v in report["config_changes"].items()],
    )
    pairs = _pairs_table(report["feature_pairs"])
    w = report["weights"]
    random_note = (
        f" {len(w['random_init'])} student tensors start from random weights (shape differs): "
        + ", ".join(f"`{k}`" for k in w["random_init"])
        + "."
        if w["random_init"]
        else ""
    )
    return (
        "\n\n".join(
            [
                f"# bksdm prune: {report['plan']['name']}",
                f"Teacher `{report['teacher']}`, plan `{report['plan']['name']}`"
                + (f" ({report['plan'].get('description')})" if report["plan"].get("description") else "")
                + ".",
                "## Totals",
                totals,
                "## Blocks",
                blocks,
                f"Weights: {w['copied']} student tensors copied from the teacher ({w['init']} init); "
                f"{w['unused_teacher_tensors']} teacher tensors belong to removed blocks.{random_note}",
                "## Config changes",
                changes,
                "## Feature-distillation pairs",
                pairs,
                "## Use it",
                "```python\nfrom diffusers import DiffusionPipeline\n"
                f'pipe = DiffusionPipeline.from_pretrained("{report.get("out", ".")}")\n```',
            ]
        )
        + "\n"
    )

"""``bksdm report``: one markdown + HTML page comparing models (e.g. a teacher and its base/small/tiny students).

Inputs, per model ``NAME``:

- ``--model NAME=DIR``: a ``bksdm generate`` output folder (images, ``manifest.jsonl``, ``settings.json``),
  usually holding ``evaluation.json`` from ``bksdm evaluate``; or directly an evaluation JSON file;
- ``--evaluation NAME=FILE`` (optional): the evaluation JSON when it is elsewhere;
- ``--pipeline NAME=REF`` (optional): the pipeline to profile (folder or hub id); by default the model (and
  the student U-Net, ``--unet``) recorded in the folder's ``settings.json``; a U-Net or a transformer (SD3,
  FLUX.1) pipeline, whose denoiser's figures fill the same columns (``denoiser_params``, ``denoiser_macs``).

Outputs in ``OUT``: ``report.md``, ``report.html``, ``report.json`` (every number), ``grid.png`` (one row per
model, one column per prompt, on prompts *and seeds* every model shares, so differences are the model's) and
``chart.png`` (a bar chart per figure). Profile figures come from :mod:`bksdm.eval.profile` (parameters and MACs
counted on weightless copies; latency only with ``--latency``).
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from bksdm.artifacts import MANIFEST_FILE, SETTINGS_FILE, atomic_file, write_text
from bksdm.eval.evaluate import EVALUATION_FILE
from bksdm.eval.image_sets import EvaluationError, ImageRecord, find_images
from bksdm.eval.tables import METRIC_LABELS
from bksdm.plan.render import human, markdown_table

__all__ = ["ReportError", "ReportOptions", "collect_model", "parse_named", "write_report"]

logger = logging.getLogger(__name__)


class ReportError(ValueError):
    """A user error in the report's inputs."""


@dataclass
class ReportOptions:
    """What ``bksdm report`` compares and how."""

    models: dict[str, str]
    """Name → generate output folder (or an evaluation JSON file), in display order; the first is the baseline."""
    evaluations: dict[str, str] = field(default_factory=dict)
    pipelines: dict[str, str] = field(default_factory=dict)
    profile: bool = True
    """Count parameters and MACs of each model's pipeline (cheap: no weights are read)."""
    latency: bool = False
    """Also time the components (loads the weights)."""
    steps: int = 25
    columns: int = 8
    """Prompts in the image grid."""
    title: str = "bksdm report"
    device: str = "cpu"


def parse_named(items: Sequence[str], option: str) -> dict[str, str]:
    """``["teacher=out/t", "tiny=out/s"]`` → ``{"teacher": "out/t", "tiny": "out/s"}`` (order kept).

    Raises:
        ReportError: An item without ``=``, an empty name, or a name given twice.
    """
    named: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ReportError(f"{option} {item!r}: expected NAME=PATH, e.g. {option} teacher=out/teacher")
        if name.strip() in named:
            raise ReportError(f"{option}: the name {name.strip()!r} is given twice")
        named[name.strip()] = value.strip()
    return named


# --------------------------------------------------------------------------------------- collecting


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value (a figure that came out {constant} is no figure)")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        # Python's json reads NaN and Infinity, which JSON does not have: a report would show them as figures.
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_json)
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise ReportError(f"cannot read {what} {path}: {err}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{what} {path} is not a JSON object (it holds a {type(data).__name__})")
    return data


def collect_model(name: str, source: str, evaluation: str | None, pipeline: str | None) -> dict[str, Any]:
    """Everything the report shows of one model: its evaluation, generation settings, images and pipeline."""
    path = Path(source)
    entry: dict[str, Any] = {"name": name, "source": str(path), "evaluation": None, "generation": None}
    records: list[ImageRecord] = []
    if path.is_file():
        evaluation = evaluation or str(path)
    elif path.is_dir():
        if not (path / MANIFEST_FILE).is_file():
            # Without it the images have no prompts or seeds: the grid would pair them by file name alone, and
            # the report's "same prompts and seeds" would be unchecked.
            raise ReportError(
                f"--model {name}={source}: {path} has no {MANIFEST_FILE}, the prompt and seed of each image that "
                f"bksdm generate writes there; give the folder bksdm generate wrote, or only the figures: "
                f"--model {name}={path / EVALUATION_FILE}"
            )
        if (path / SETTINGS_FILE).is_file():
            settings = _read_json(path / SETTINGS_FILE, "generation settings").get("settings")
            entry["generation"] = settings if isinstance(settings, dict) else None
        if evaluation is None and (path / EVALUATION_FILE).is_file():
            evaluation = str(path / EVALUATION_FILE)
        try:
            records = find_images(path)
        except EvaluationError as err:
            logger.warning("%s: no images for the grid (%s)", name, err)
    else:
        raise ReportError(f"--model {name}={source}: no such folder or file")
    if evaluation is not None:
        if not Path(evaluation).is_file():
            raise ReportError(f"{name}: evaluation file {evaluation} not found (run bksdm evaluate first)")
        entry["evaluation"] = _read_json(Path(evaluation), "evaluation")
        metrics = entry["evaluation"].get("metrics")
        if not isinstance(metrics, dict):
            raise ReportError(f"{name}: {evaluation} is not a bksdm evaluate result (no 'metrics')")
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ReportError(
                    f"{name}: evaluation {evaluation}: metric {key!r} is {value!r}, not a number; run bksdm "
                    "evaluate again"
                )
        entry["evaluation_file"] = evaluation
    generation = entry["generation"] or {}
    entry["pipeline"] = pipeline or generation.get("model")
    entry["unet"] = None if pipeline else generation.get("unet")
    entry["records"] = records
    return entry


def _profile(entry: dict[str, Any], options: ReportOptions) -> dict[str, Any] | None:
    """Params / MACs (and latency) of the model's pipeline, with its student U-Net when one was swapped in.

    Any denoiser family: :func:`bksdm.eval.components.load_components` builds the pipeline's denoiser (U-Net or
    transformer) and :func:`bksdm.eval.profile.profile_components` counts it by its family.
    """
    import torch

    from bksdm.eval.components import load_components
    from bksdm.eval.profile import profile_components
    from bksdm.plan.archs import build_unet

    ref, unet_ref = entry["pipeline"], entry["unet"]
    if ref is None:
        return None
    if unet_ref is not None and (Path(unet_ref) / "model_index.json").is_file():
        ref, unet_ref = unet_ref, None  # a student pipeline folder: profile it whole
    parts = load_components(model=ref, materialize=options.latency, device=options.device)
    if unet_ref is not None:  # generate takes --unet for U-Net models only
        from diffusers import UNet2DConditionModel

        folder = Path(unet_ref)
        folder = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
        if options.latency:
            parts.unet = UNet2DConditionModel.from_pretrained(folder).to(options.device)
        else:
            parts.unet = build_unet(dict(UNet2DConditionModel.load_config(folder)), device="meta")
    device = torch.device(options.device) if options.latency else None
    result = profile_components(
        parts.unet, parts.text_encoders, parts.vae, parts.resolution,
        latency=options.latency, steps=options.steps, device=device,
    )  # fmt: skip
    result["pipeline"] = ref if unet_ref is None else f"{ref} + U-Net {unet_ref}"
    if "unet_params" in result:  # a U-Net's figures under the names every family's have
        result.setdefault("family", "unet")
        result.setdefault("denoiser_params", result["unet_params"])
        result.setdefault("denoiser_macs", result["unet_macs"])
    return result


# ------------------------------------------------------------------------------------------ figures

# (key, label, source, format) of the columns of the summary table, in order; source "eval" or "profile".
_COLUMNS: list[tuple[str, str, str, Callable[[float], str]]] = [
    ("fid", "FID ↓", "eval", lambda v: f"{v:.2f}"),
    ("is", "IS ↑", "eval", lambda v: f"{v:.2f}"),
    ("clip_score", "CLIP score ↑", "eval", lambda v: f"{v:.2f}"),
    ("clip_cosine", "CLIP cosine ↑", "eval", lambda v: f"{v:.4f}"),
    ("kid", "KID ↓", "eval", lambda v: f"{v:.4f}"),
    ("shapes_prompt_accuracy", "prompt accuracy ↑", "eval", lambda v: f"{v:.3f}"),
    ("shapes_frechet_distance", "shapes Fréchet ↓", "eval", lambda v: f"{v:.2f}"),
    ("denoiser_params", "denoiser params", "profile", lambda v: f"{int(v):,}"),
    ("denoiser_macs", "denoiser MACs/step", "profile", lambda v: human(v)),
    ("whole_params", "whole params", "profile", lambda v: f"{int(v):,}"),
    ("image_cfg_s", "s/image (CFG)", "profile", lambda v: f"{v:.3f}"),
]


def _label(label: str, entries: list[dict[str, Any]]) -> str:
    """A column's label; the denoiser's read "U-Net" when every profiled model has one."""
    families = {e["profile"].get("family") for e in entries if e.get("profile")}
    return label.replace("denoiser", "U-Net") if families == {"unet"} else label


def _value(entry: dict[str, Any], key: str, source: str) -> float | None:
    data = (entry["evaluation"] or {}).get("metrics", {}) if source == "eval" else entry.get("profile") or {}
    value = data.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _summary(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and keys of the columns at least one model has."""
    present = [c for c in _COLUMNS if any(_value(e, c[0], c[2]) is not None for e in entries)]
    header = ["model", *[_label(c[1], entries) for c in present], "images"]
    rows = []
    base = entries[0]
    for e in entries:
        cells = [e["name"]]
        for key, _, source, fmt in present:
            v = _value(e, key, source)
            text = fmt(v) if v is not None else "–"
            b = _value(base, key, source)
            if v is not None and b and e is not base and source == "profile":
                text += f" ({v / b:.0%})"
            cells.append(text)
        cells.append(str((e["evaluation"] or {}).get("count", len(e["records"])) or "–"))
        rows.append(cells)
    return header, rows, [c[0] for c in present]


def _chart(entries: list[dict[str, Any]], keys: list[str], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [c for c in _COLUMNS if c[0] in keys]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    names = [e["name"] for e in entries]
    for ax, (key, label, source, _) in zip(axes.flat, panels, strict=False):
        values = [_value(e, key, source) for e in entries]
        ax.bar(range(len(names)), [v if v is not None else 0 for v in values], color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(_label(label, entries), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    try:
        with atomic_file(path) as partial:
            fig.savefig(partial, format="png")
    finally:
        plt.close(fig)
    return path


def _key(record: ImageRecord) -> tuple:
    return (record.prompt, record.seed) if record.prompt is not None else (record.file.name,)


def _grid(entries: list[dict[str, Any]], columns: int, path: Path) -> list[tuple[str | None, int | None]]:
    """Image grid on the prompts and seeds every model with images shares; returns the (prompt, seed) columns."""
    from bksdm.train.validation import image_grid

    with_images = [e for e in entries if e["records"]]
    if not with_images or columns < 1:
        return []
    by_key = [{_key(r): r for r in e["records"]} for e in with_images]
    shared = [k for k in by_key[0] if all(k in m for m in by_key[1:])]
    if not shared:
        return []
    count = min(columns, len(shared))  # spread over the shared prompts (with fewer than --columns: all of them)
    picks = [shared[round(i * (len(shared) - 1) / max(1, count - 1))] for i in range(count)]
    picks = list(dict.fromkeys(picks))
    first = _open_rgb(by_key[0][picks[0]].file)
    side = min(256, max(first.size)) if first is not None else 256
    columns = [[_open_rgb(m[k].file) for m in by_key] for k in picks]
    kept = [(k, column) for k, column in zip(picks, columns, strict=True) if all(im is not None for im in column)]
    if not kept:
        return []
    rows = [
        [column[i].resize((side, side), Image.Resampling.BICUBIC) for _, column in kept] for i in range(len(by_key))
    ]
    with atomic_file(path) as partial:
        image_grid(rows, [e["name"] for e in with_images]).save(partial, format="PNG")
    return [(by_key[0][k].prompt, by_key[0][k].seed) for k, _ in kept]


def _open_rgb(path: Path) -> Image.Image | None:
    """The image as RGB, or None (with a warning) when it cannot be read: the grid leaves its column out."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:  # PIL raises many types on malformed input
        logger.warning("grid: leaving out unreadable image %s (%s: %s)", path, type(err).__name__, err)
        return None


# ------------------------------------------------------------------------------------------ writing


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sources(entries: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "images", "evaluation", "pipeline profiled", "generation"]
    rows = []
    for e in entries:
        g = e["generation"] or {}
        gen = ", ".join(
            f"{k} {g[k]}" for k in ("scheduler", "steps", "guidance_scale", "height", "seed", "resize") if k in g
        )
        rows.append([
            e["name"], e["source"], e.get("evaluation_file", "–"),
            (e.get("profile") or {}).get("pipeline", e["pipeline"] or "–"), gen or "–",
        ])  # fmt: skip
    return header, rows


def write_report(
    out: str | Path, options: ReportOptions, on_stage: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Collect every model's figures and images and write the report files into ``out``.

    Returns:
        The content of ``report.json``.

    Raises:
        ReportError: Missing folders or files, names that match no ``--model``.
    """
    say = on_stage or (lambda message: None)
    if not options.models:
        raise ReportError("give at least one --model NAME=DIR")
    for option, named in (("--evaluation", options.evaluations), ("--pipeline", options.pipelines)):
        unknown = [n for n in named if n not in options.models]
        if unknown:
            raise ReportError(f"{option} {unknown[0]}: no --model of that name (models: {', '.join(options.models)})")
    if isinstance(options.columns, bool) or not isinstance(options.columns, int) or options.columns < 1:
        raise ReportError(f"--columns {options.columns}: the image grid needs at least 1 prompt (default 8)")
    if isinstance(options.steps, bool) or not isinstance(options.steps, int) or options.steps < 1:
        raise ReportError(f"--steps {options.steps}: the latency needs at least 1 denoising step (default 25)")
    entries = [
        collect_model(n, src, options.evaluations.get(n), options.pipelines.get(n)) for n, src in options.models.items()
    ]
    if options.profile:
        for e in entries:
            if e["pipeline"] is not None:
                say(f"profiling {e['name']} ({e['pipeline']})")
                e["profile"] = _profile(e, options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows, keys = _summary(entries)
    say("drawing the chart and the image grid")
    chart = _chart(entries, keys, out / "chart.png")
    columns = _grid(entries, options.columns, out / "grid.png")
    src_header, src_rows = _sources(entries)
    notes = [
        "↓ lower is better, ↑ higher is better. FID and KID: Inception-v3 pool features (pytorch-fid's input "
        "convention) against the reference statistics; IS: torch-fidelity's definition (10 splits); CLIP score: "
        "torchmetrics' max(100·mean cosine, 0), CLIP cosine: the plain mean cosine the BK-SDM paper prints; "
        "prompt accuracy and shapes Fréchet: the shapes world's classifier. Percentages: of the first model.",
    ]
    metric_names = sorted({k for e in entries for k in ((e["evaluation"] or {}).get("metrics") or {})})
    extra = [k for k in metric_names if k not in keys]
    md = [f"# {options.title}", "", markdown_table(header, rows), "", *notes, ""]
    if chart:
        md += ["![figures](chart.png)", ""]
    if columns:
        md += ["## Images (same prompts and seeds)", "", "![grid](grid.png)", ""]
        md += [f"{i + 1}. {p}" + (f" (seed {s})" if s is not None else "") for i, (p, s) in enumerate(columns)]
        md.append("")
    elif sum(1 for e in entries if e["records"]) > 1:
        md += ["No image grid: the models' folders share no prompt with the same seed.", ""]
    if extra:
        md += ["## All evaluation figures", ""]
        md.append(
            markdown_table(
                ["metric", *[e["name"] for e in entries]],
                [
                    [METRIC_LABELS.get(k, (k, ""))[0], *[_fmt(_value(e, k, "eval")) for e in entries]]
                    for k in metric_names
                ],
            )
        )
        md.append("")
    md += ["## Sources", "", markdown_table(src_header, src_rows), ""]
    write_text(out / "report.md", "\n".join(md))

    body = [
        f"<h1>{html.escape(options.title)}</h1>",
        _html_table(header, rows),
        *[f"<p>{html.escape(n)}</p>" for n in notes],
    ]
    if chart:
        body.append('<img src="chart.png" alt="figures">')
    if columns:
        body += ["<h2>Images (same prompts and seeds)</h2>", '<img src="grid.png" alt="grid">', "<ol>"]
        body += [f"<li>{html.escape(str(p))}" + (f" (seed {s})" if s is not None else "") + "</li>" for p, s in columns]
        body.append("</ol>")
    body += ["<h2>Sources</h2>", _html_table(src_header, src_rows)]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(options.title)}</title>"
    page += f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    write_text(out / "report.html", page)

    report = {
        "title": options.title,
        "models": {
            e["name"]: {
                "source": e["source"],
                "metrics": (e["evaluation"] or {}).get("metrics"),
                "count": (e["evaluation"] or {}).get("count"),
                "profile": e.get("profile"),
                "generation": e["generation"],
            }
            for e in entries
        },
        "grid": [{"prompt": p, "seed": s} for p, s in columns],
        "files": sorted(p.name for p in out.iterdir() if p.suffix in (".md", ".html", ".png")),
    }
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.6g}"

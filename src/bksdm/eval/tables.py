"""What the eval jobs print: the terminal tables of ``bksdm evaluate`` and ``bksdm profile``, and the display name
of every evaluation figure (which ``bksdm report`` shares)."""

from __future__ import annotations

import textwrap
from typing import Any

__all__ = ["METRIC_LABELS", "format_profile", "format_results"]


METRIC_LABELS = {
    "fid": ("FID", "lower is better"),
    "kid": ("KID", "lower is better"),
    "kid_std": ("KID std", ""),
    "is": ("Inception Score", "higher is better"),
    "is_std": ("IS std", ""),
    "clip_score": ("CLIP score (torchmetrics, 0-100)", "higher is better"),
    "clip_cosine": ("CLIP cosine (the paper's)", "higher is better"),
    "shapes_prompt_accuracy": ("shapes prompt accuracy", "higher is better"),
    "shapes_shape_accuracy": ("shapes: shape read right", "higher is better"),
    "shapes_color_accuracy": ("shapes: colour read right", "higher is better"),
    "shapes_size_accuracy": ("shapes: size read right", "higher is better"),
    "shapes_position_accuracy": ("shapes: position read right", "higher is better"),
    "shapes_frechet_distance": ("shapes Fréchet distance", "lower is better"),
}
"""Display name and direction of each metric key (others are shown by their key)."""


def format_results(result: dict[str, Any]) -> str:
    """The terminal table of an :func:`evaluate` result."""
    rows = [(METRIC_LABELS.get(k, (k, ""))[0], f"{v:.6g}", METRIC_LABELS.get(k, ("", ""))[1])
            for k, v in result["metrics"].items()]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    lines = [f"bksdm evaluate: {result['count']} images in {result['images']}", ""]
    if result.get("skipped"):
        lines[0] += f" ({len(result['skipped'])} unreadable, skipped: see 'skipped' in the JSON)"
    lines += [f"  {name:<{width}}  {value:>12}  {note}".rstrip() for name, value, note in rows]
    lines += ["", "  " + ", ".join(f"{k}: {v}" for k, v in result["networks"].items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- bksdm profile


def _macs(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms" if s >= 1e-2 else f"{s * 1e3:.3f} ms"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _aligned(rows: list[list[str]]) -> list[str]:
    """Rows as lines: the first column left-aligned, the others right-aligned, each as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]).rstrip()
        for row in rows
    ]


def _share(value: float) -> str:
    return f"{100 * value:.1f}%"


def _per_image_lines(result: dict[str, Any], den: str) -> list[str]:
    """Where one image goes: each part's calls, MACs and (timed) seconds with their shares, beside the shares of one
    measured stock pipeline call when there is one; then the figure without guidance and the teacher's MACs."""
    end = result.get("end_to_end")
    guided = end["classifier_free"] if end else True
    image, other = (
        (result["per_image_cfg"], result["per_image"]) if guided else (result["per_image"], result["per_image_cfg"])
    )
    timed = "image_s" in image
    labels = {"text_encoders": "text encoders", "denoiser": den, "vae_decode": "VAE decode"}
    rows = [["part", "calls", "MACs", "MACs share"] + ["time", "time share"] * timed + ["measured share"] * bool(end)]
    for name, part in image["parts"].items():
        row = [
            labels[name],
            f"{part['calls']} x batch {part['batch']}",
            _macs(part["macs"]),
            _share(part["macs_share"]),
        ]
        row += [_seconds(part["s"]), _share(part["share"])] if timed else []
        rows.append(row + ([_share(end["shares"][name])] if end else []))
    if end:
        rows.append(
            ["other (scheduler, post-processing)", "", "", ""] + [""] * (2 * timed) + [_share(end["shares"]["other"])]
        )
    rows.append(["image", "", _macs(image["image_macs"]), "100.0%"])
    rows[-1] += ([_seconds(image["image_s"]), "100.0%"] if timed else []) + (["100.0%"] if end else [])

    how = (
        f"with classifier-free guidance ({result['guidance_mode'].replace('denoiser', den)})"
        if guided
        else "without guidance"
    )
    figures = [f"{_seconds(image['image_s'])} composed"] if timed else []
    figures += [f"{_seconds(end['s'])} measured end to end"] if end else []
    lines = [
        f"per image, {result['steps']} steps {how}" + (f": {', '.join(figures)}" if figures else ""),
        *_aligned(rows),
    ]
    figure = f"{_macs(other['image_macs'])} MACs" + (f", {_seconds(other['image_s'])} composed" if timed else "")
    notes = [f"{'without' if guided else 'with'} guidance: {figure}."]
    if timed:
        notes.append(
            f"Composed: each part timed on its own with synthetic inputs ({result['warmup']} warm-up + "
            f"{result['repeats']} timed calls, medians) times its calls."
        )
    if end:
        ran = f" ({end['scheduler']} ran {end['steps_run']})" if end["steps_run"] != end["steps"] else ""
        notes.append(
            f"Measured: one stock {end['pipeline']} call, {end['steps']} steps{ran}, guidance "
            f"{end['guidance_scale']:g}, seed {end['seed']}, to PIL: {end['measured_over_composed']:.2f}x the "
            f"composed time; {den} share at the steps it ran, 'other' is what no part accounts for."
        )
    elif result.get("end_to_end_note"):
        notes.append(f"End to end: {result['end_to_end_note']}.")
    if result.get("macs_ratio_to_teacher"):
        ratio = result["macs_ratio_to_teacher"]
        notes.append(
            f"MACs vs the teacher (the time ratio they predict): {den} step {ratio['denoiser_step']:.3f}x, image "
            f"{ratio['image_cfg']:.3f}x with guidance, {ratio['image']:.3f}x without."
        )
    lines += [wrapped for note in notes for wrapped in textwrap.wrap(note, 116, subsequent_indent="  ")]
    return [*lines, ""]


def format_profile(result: dict[str, Any]) -> str:
    """Render a :func:`bksdm.eval.profile.profile_components` result (plus ``source``/``plan``) as a table.

    Args:
        result: The dict ``bksdm profile --json`` prints.

    Returns:
        An aligned, multi-line table: one row per component, then the per-image figures and the device.
    """
    timed = bool(result.get("latency"))
    header = ["component", "params", "MACs conv+linear", "MACs incl. attention"]
    header += ["latency median (min)"] if timed else []

    def row(label: str, params: int | None, macs: int, macs_att: int, times: dict[str, Any], key: str) -> list[str]:
        cells = [label, "" if params is None else f"{params:,}", _macs(macs), _macs(macs_att)]
        if timed:
            cells.append(f"{_seconds(times[f'{key}_s'])} (min {_seconds(times[f'{key}_min_s'])})")
        return cells

    r = result
    # U-Nets keep their unet_* keys; every family has denoiser_* (transformers only those).
    den = "U-Net" if r.get("family", "unet") == "unet" else "transformer"
    k = "unet" if "unet_params" in r else "denoiser"
    rows = [
        row(name, enc["params"], enc["macs"], enc["macs_with_attention"], enc, "latency")
        for name, enc in r["text_encoders"].items()
    ]
    rows.append(row(f"{den} step", r[f"{k}_params"], r[f"{k}_macs"], r[f"{k}_macs_with_attention"], r, f"{k}_step"))
    # MACs scale linearly with the batch, so the guided step (batch 2) costs exactly twice.
    rows.append(
        row(
            f"{den} step, CFG (batch 2)",
            None,
            2 * r[f"{k}_macs"],
            2 * r[f"{k}_macs_with_attention"],
            r,
            f"{k}_step_cfg",
        )
    )
    if r.get("onnx"):
        rows += [
            row(
                "U-Net step, ONNX Runtime", None, r["unet_macs"], r["unet_macs_with_attention"], r["onnx"], "unet_step"
            ),
            row(
                "U-Net step, CFG, ONNX Runtime",
                None,
                2 * r["unet_macs"],
                2 * r["unet_macs_with_attention"],
                r["onnx"],
                "unet_step_cfg",
            ),
        ]
    rows.append(
        row(
            "VAE decoder",
            r["vae_decoder_params"],
            r["vae_decoder_macs"],
            r["vae_decoder_macs_with_attention"],
            r,
            "vae_decode",
        )
    )
    rows.append([f"whole ({den} + text + VAE dec.)", f"{r['whole_params']:,}"] + [""] * (len(header) - 2))

    side, latent = result["resolution"], result["latent_size"]
    title = f"bksdm profile: {result.get('source', '?')}"
    if result.get("plan"):
        title += f", plan {result['plan']}"
    lines = [f"{title}, {side}x{side} px (latent {latent}x{latent})", "", *_aligned([header, *rows]), ""]
    lines += _per_image_lines(result, den)
    if timed:
        if result.get("onnx"):
            onnx = result["onnx"]
            lines += [
                f"with the ONNX Runtime U-Net: {_seconds(onnx['image_s'])} without guidance, "
                f"{_seconds(onnx['image_cfg_s'])} with (U-Net step at "
                f"{result['unet_step_s'] / onnx['unet_step_s']:.2f}x PyTorch's speed, "
                f"{result['unet_step_cfg_s'] / onnx['unet_step_cfg_s']:.2f}x with guidance)",
                f"  {onnx['onnx_dir']}: onnxruntime {onnx['onnxruntime_version']}, {onnx['provider']}, "
                f"{onnx['threads']} threads as torch, same inputs; text encoder and VAE decoder from PyTorch",
            ]
        lines.append(f"peak memory: {_bytes(result['peak_memory_bytes'])}, {result['peak_memory_method']}")
    else:
        lines.append("latency: not measured (--no-latency)")
    lines.append(f"device: {result['device']}, {result['dtype']}, torch {result['torch_version']}")
    tokens = " / ".join(str(e.get("tokens", 77)) for e in r["text_encoders"].values()) or "77"
    lines += [
        f"MACs: one forward at batch 1 ({den}: one step; text encoders: {tokens} tokens); 'conv+linear' is the",
        "  BK-SDM paper's count, 'incl. attention' adds the attention products QK^T and AV",
    ]
    return "\n".join(lines)

"""ONNX export of a pipeline's networks (see networks.py), with a parity check against PyTorch (see runtime.py).

``bksdm export onnx`` writes one folder per network in the layout of optimum's ``ORTStableDiffusionPipeline``
and of diffusers' ``OnnxStableDiffusionPipeline`` (``unet/model.onnx``, ``text_encoder/model.onnx``,
``vae_decoder/model.onnx``, optionally ``vae_encoder/model.onnx``; each next to the network's ``config.json``),
plus the tokenizer, the scheduler and a ``model_index.json``, so the folder describes itself:

=================  ==========================================================  =================================
network            inputs (dtype, shape)                                       outputs
=================  ==========================================================  =================================
``unet``           ``sample`` (f32, B x C x h x w), ``timestep`` (f32, T: 1     ``out_sample`` (f32, B x C x h x w)
                   or B), ``encoder_hidden_states`` (f32, B x L x D)
``text_encoder``   ``input_ids`` (int32, B x L)                                ``last_hidden_state``,
                                                                               ``pooler_output``
``vae_decoder``    ``latent_sample`` (f32, B x 4 x h x w), *unscaled*: divide   ``sample`` (f32, B x 3 x H x W)
                   by ``scaling_factor`` first, as pipelines do
``vae_encoder``    ``sample`` (f32, B x 3 x H x W) in [-1, 1]                   ``latent_sample``: the latent
                                                                               distribution's mean, unscaled
=================  ==========================================================  =================================

The names and dtypes are optimum's and diffusers' (int32 token ids, a timestep of length 1 broadcast over the
batch); the timestep is float so that schedulers with fractional timesteps (Euler, DPM-Solver) work. Batch,
sequence length and latent size are dynamic; the latent side must be a multiple of 2 ** (number of U-Net
downsamplers), recorded in the report.

The parity check runs each exported network in ONNX Runtime (CPU) and in PyTorch on the same seeded random
inputs, at the example shape and at a second shape (another batch size, latent size and sequence length), and
reports the largest absolute difference per output. Writing is atomic: the folder appears complete or not at
all. The heavy lifting is ``torch.onnx.export``; ``onnx``, ``onnxruntime`` (and ``onnxscript``, for the dynamo
exporter) come with ``pip install bksdm[onnx]``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bksdm.use.onnx.networks import NetworkSpec, network_specs, side_multiple
from bksdm.use.onnx.runtime import ONNX_FILE, REPORT_FILE, ExportError, onnx_session, require_onnx

logger = logging.getLogger(__name__)

__all__ = [
    "COMPONENTS",
    "DEFAULT_COMPONENTS",
    "EXPORTERS",
    "ExportError",
    "check_exportable",
    "export_onnx",
    "format_export",
    "parse_components",
]

COMPONENTS = ("unet", "text_encoder", "vae_decoder", "vae_encoder")
"""Networks ``bksdm export onnx`` can write, by the folder name optimum and diffusers use."""

DEFAULT_COMPONENTS = ("unet", "text_encoder", "vae_decoder")
"""What a text-to-image pipeline runs (the VAE encoder is only needed for image-to-image)."""

EXPORTERS = ("torchscript", "dynamo")
"""``torch.onnx.export`` back ends: the TorchScript tracer (default here) or the torch.export-based one."""

DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}

EXTERNAL_DATA_SUFFIX = "_data"

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Bytes of weights above which a network's tensors go to ``model.onnx_data`` (protobuf files stop at 2 GiB)."""

DEFAULT_TOLERANCE = 1e-3
"""Largest absolute ONNX Runtime vs PyTorch difference accepted by the parity check (fp32)."""


def parse_components(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"unet,text_encoder"`` -> ``("unet", "text_encoder")``; ``None`` -> :data:`DEFAULT_COMPONENTS`.

    Raises:
        ExportError: An unknown or repeated name, or none at all.
    """
    if spec is None:
        return DEFAULT_COMPONENTS
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n) for n in spec]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names or len(set(names)) != len(names):
        raise ExportError(
            f"--components {spec!r}: give a comma-separated list of distinct names from {', '.join(COMPONENTS)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return tuple(n for n in COMPONENTS if n in names)  # a fixed order, whatever the user's


# ------------------------------------------------------------------------------------------- export + check


def _export_one(spec: NetworkSpec, path: Path, opset: int, exporter: str) -> None:
    """Trace ``spec.module`` at its example shape and write the graph (weights inside or next to it)."""
    gen = torch.Generator().manual_seed(0)
    example = spec.inputs(*spec.example, gen)
    names = list(example)
    kwargs: dict[str, Any] = {}
    if exporter == "dynamo":
        auto = torch.export.Dim.AUTO
        kwargs["dynamic_shapes"] = {name: dict.fromkeys(spec.dynamic[name], auto) for name in names}
    else:
        kwargs["dynamic_axes"] = {**spec.dynamic, **{o: {0: "batch"} for o in spec.outputs}}
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python-level shape check in diffusers (constant for the traced graph);
        # the report's dynamic-shape parity check is what shows whether they matter.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module.eval(),
            tuple(example.values()),
            str(path),
            input_names=names,
            output_names=list(spec.outputs),
            opset_version=opset,
            dynamo=exporter == "dynamo",
            **kwargs,
        )


def _repack(tmp_file: Path, final: Path, threshold: int) -> bool:
    """Re-save an exported graph as ``model.onnx`` (+ one ``model.onnx_data`` when large); True if external."""
    onnx, _ = require_onnx()
    model = onnx.load(str(tmp_file))  # also reads whatever external tensors the exporter wrote
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size > threshold
    final.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(final),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=final.name + EXTERNAL_DATA_SUFFIX,
        size_threshold=0,
    )
    return external


def _max_abs_difference(got: np.ndarray, reference: np.ndarray) -> float:
    """The largest absolute difference; infinity when either side holds a NaN or an infinity.

    ``max`` over a NaN depends on the order of its arguments, so a NaN output could otherwise pass the check.
    """
    difference = np.abs(got.astype(np.float64) - reference)
    if not np.isfinite(difference).all():
        return float("inf")
    return float(difference.max())


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so the report stays strict JSON (null)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _parity(spec: NetworkSpec, session, seed: int) -> list[dict[str, Any]]:
    """Run PyTorch and ONNX Runtime on the same random inputs at both shapes; the largest differences."""
    checks = []
    for k, (batch, side) in enumerate((spec.example, spec.second)):
        gen = torch.Generator().manual_seed(seed + k)
        inputs = spec.inputs(batch, side, gen)
        with torch.no_grad():
            reference = spec.module(*inputs.values())
        reference = reference if isinstance(reference, tuple) else (reference,)
        got = session.run(list(spec.outputs), {name: t.numpy() for name, t in inputs.items()})
        errors = {
            name: _max_abs_difference(g, r.double().numpy())
            for name, g, r in zip(spec.outputs, got, reference, strict=True)
        }
        checks.append(
            {
                "input_shapes": {name: list(t.shape) for name, t in inputs.items()},
                "max_abs_error": errors,
                "max_abs_reference": {
                    name: float(r.abs().max()) for name, r in zip(spec.outputs, reference, strict=True)
                },
            }
        )
    return checks


def check_exportable(model: str | os.PathLike) -> None:
    """Refuse, from the denoiser's config alone (no weights read), a pipeline this exporter does not handle.

    It writes SD-v1/v2 U-Nets in the layout of optimum's ``ORTStableDiffusionPipeline``; SDXL's U-Net takes extra
    conditioning and SD3 / FLUX.1 have a transformer, with other inputs (pooled projections, FLUX's packed tokens,
    rotary ids and guidance). Hugging Face optimum exports all three (its ONNX configs cover the SD3 and FLUX
    transformers), so the message points there.

    Raises:
        ExportError: An SDXL, SD3 or FLUX.1 pipeline.
        TeacherNotFoundError: ``model`` is neither a local folder nor a reachable hub repo.
    """
    from bksdm.families import family_of
    from bksdm.loading import load_denoiser_config

    config = load_denoiser_config(model)  # a missing folder or hub id fails here, before any weights are read
    if family_of(config).denoiser != "unet":
        raise ExportError(
            f"{model} is a {config.get('_class_name', 'diffusion transformer')} pipeline (SD3 / FLUX.1); bksdm "
            "export onnx handles SD-v1/v2 pipelines and their students. For diffusion transformers use Hugging "
            f"Face optimum: pip install 'optimum[onnxruntime]', then optimum-cli export onnx --model {model} OUT"
        )
    if config.get("addition_embed_type") is not None:
        raise ExportError(
            f"{model} is an SDXL-style pipeline (U-Net addition_embed_type={config['addition_embed_type']!r}); "
            "bksdm export onnx handles SD-v1/v2 pipelines and their students. For SDXL use optimum: "
            "optimum-cli export onnx --model MODEL OUT"
        )


def export_onnx(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    opset: int | None = None,
    exporter: str = "torchscript",
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
    seed: int = 0,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export a pipeline's networks to ONNX, check them against PyTorch, and write a self-describing folder.

    Args:
        model: A diffusers SD-v1/v2 pipeline folder or hub id (a student from ``bksdm prune``/``distill`` too).
        out: Output folder, written atomically.
        components: Which networks (see :data:`COMPONENTS`).
        opset: ONNX opset (default 17 for the TorchScript exporter, 18 for dynamo).
        exporter: ``"torchscript"`` or ``"dynamo"`` (see :data:`EXPORTERS`).
        tolerance: Parity threshold on the largest absolute difference; the report says whether each
            network passed (the files are written either way, for inspection).
        overwrite: Replace a non-empty ``out``.
        seed: Seed of the random parity inputs.
        external_data_threshold: Weight bytes above which tensors go to ``model.onnx_data``.
        on_stage: Called with a short description before each slow stage.

    Returns:
        The report, also written to ``out/export_report.json``: per network its files, input and output
        names, dynamic axes, parity checks (``max_abs_error`` per output at two shapes) and ``passed``.

    Raises:
        ExportError: Bad options, a missing onnx package, or an unsupported pipeline (SDXL; SD3 and FLUX.1, whose
            denoiser is a transformer: the message points to optimum).
        OutputExistsError: ``out`` is not empty and ``overwrite`` is false.
        TeacherNotFoundError: ``model`` is neither a pipeline folder nor a reachable hub repo.
    """
    from bksdm import __version__
    from bksdm.artifacts import atomic_dir
    from bksdm.loading import load_pipeline
    from bksdm.plan.prune import check_output_dir

    check_exportable(model)  # before onnx is asked for: no install helps a pipeline this exporter does not handle
    onnx, ort = require_onnx()
    stage = on_stage or logger.info
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter '{exporter}'; use one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401  (torch's dynamo exporter builds its graphs with it)
        except ImportError:
            raise ExportError(
                "--exporter dynamo needs the onnxscript package: pip install 'bksdm[onnx]' (or pip install onnxscript)"
            ) from None
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    if not 14 <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset {opset}: use 14 to {onnx.defs.onnx_opset_version()} (onnx {onnx.__version__})")
    if not (np.isfinite(tolerance) and tolerance > 0):
        raise ExportError(f"--tolerance must be a positive finite number, e.g. {DEFAULT_TOLERANCE:g}; got {tolerance}")
    components = parse_components(components)
    out = Path(out)
    check_output_dir(out, overwrite)

    stage(f"loading {model}")
    pipe = load_pipeline(model, dtype=torch.float32, device="cpu")
    specs = network_specs(pipe, components)
    report: dict[str, Any] = {
        "source": str(model),
        "exporter": exporter,
        "opset": opset,
        "tolerance": tolerance,
        "seed": seed,
        "latent_side_multiple": side_multiple(pipe.unet.config),
        "vae_scale_factor": 2 ** (len(pipe.vae.config.block_out_channels) - 1),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "versions": {
            "bksdm": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "python": platform.python_version(),
        },
        "components": {},
    }
    with atomic_dir(out) as tmp:  # a full disk or read-only folder: WriteFailed, and ``out`` as it was
        for spec in specs:
            stage(f"exporting {spec.name} ({exporter}, opset {opset})")
            raw = tmp / ".raw" / spec.name
            raw.mkdir(parents=True)
            _export_one(spec, raw / ONNX_FILE, opset, exporter)
            target = tmp / spec.name / ONNX_FILE
            external = _repack(raw / ONNX_FILE, target, external_data_threshold)
            shutil.rmtree(raw)
            spec.save_config(target.parent)
            stage(f"checking {spec.name} against PyTorch")
            session = onnx_session(target)
            checks = _parity(spec, session, seed)
            worst = max(e for c in checks for e in c["max_abs_error"].values())
            report["components"][spec.name] = {
                "file": f"{spec.name}/{ONNX_FILE}",
                "external_data": f"{spec.name}/{ONNX_FILE}{EXTERNAL_DATA_SUFFIX}" if external else None,
                "bytes": sum(p.stat().st_size for p in target.parent.glob(ONNX_FILE + "*")),
                "inputs": {i.name: {"dtype": i.type, "shape": list(i.shape)} for i in session.get_inputs()},
                "outputs": list(spec.outputs),
                "parity": checks,
                "max_abs_error": worst,
                "passed": worst <= tolerance,
            }
        shutil.rmtree(tmp / ".raw", ignore_errors=True)
        _write_pipeline_files(pipe, tmp, components)
        report["passed"] = all(c["passed"] for c in report["components"].values())
        report["out"] = str(out)
        (tmp / REPORT_FILE).write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    return report


def _write_pipeline_files(pipe, folder: Path, components: Sequence[str]) -> None:
    """Tokenizer, scheduler and a ``model_index.json`` that diffusers' ``OnnxStableDiffusionPipeline`` reads."""
    import diffusers

    index: dict[str, Any] = {"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
    for name in COMPONENTS:
        index[name] = ["diffusers", "OnnxRuntimeModel"] if name in components else [None, None]
    if getattr(pipe, "tokenizer", None) is not None:
        pipe.tokenizer.save_pretrained(folder / "tokenizer")
        index["tokenizer"] = ["transformers", type(pipe.tokenizer).__name__]
    pipe.scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(pipe.scheduler).__name__]
    index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def format_export(report: dict[str, Any]) -> str:
    """Render an export report as a table: one row per network with its size and parity error.

    Args:
        report: What :func:`export_onnx` returns.

    Returns:
        Multi-line text.
    """
    header = ["network", "file", "size", "checked at (first input)", "max |ORT - PyTorch|", ""]
    rows = []
    for name, c in report["components"].items():
        shapes = ", ".join("x".join(map(str, next(iter(check["input_shapes"].values())))) for check in c["parity"])
        size = c["bytes"] / 2**20
        rows.append(
            [name, c["file"], f"{size:.1f} MiB", shapes, f"{c['max_abs_error']:.2e}", "ok" if c["passed"] else "FAIL"]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"bksdm export onnx: {report['source']} -> {report['out']} ({report['exporter']} exporter, opset "
        f"{report['opset']})",
        "",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines += [
        "",
        "parity: ONNX Runtime (CPU) vs PyTorch (fp32) on the same seeded random inputs, at the traced shape and at",
        f"  another batch, latent size and sequence length; tolerance {report['tolerance']:g}",
        f"latent sides must be multiples of {report['latent_side_multiple']}; the VAE scales by "
        f"{report['vae_scale_factor']} (scaling_factor {report['vae_scaling_factor']:g}: divide latents by it "
        "before vae_decoder)",
        f"report: {report['out']}/{REPORT_FILE}",
    ]
    return "\n".join(lines)

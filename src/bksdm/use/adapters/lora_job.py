"""``bksdm adapt lora``: a LoRA trained on the teacher, carried onto a student pruned from it.

Only configs and the LoRA file are read: the teacher's and the student's denoisers and the student's text encoders
are built on the meta device (shapes, no weights), so the job takes seconds even for SDXL or FLUX.1. Every check runs
before anything is written: the student must have the ``bksdm_plan.yaml`` that made it and be that plan's student of
its teacher, and the LoRA must be a LoRA whose every module and shape the teacher has. The mapping itself is
:func:`bksdm.use.adapters.lora_map.map_lora`; the output is written atomically with the student pipeline class's own
``save_lora_weights`` (:func:`bksdm.use.lora.write_lora`), so ``pipe.load_lora_weights(out)`` loads it in stock
diffusers, with a report (``adapt_report.json`` / ``.md``) of what moved and what was dropped.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from bksdm import __version__
from bksdm.artifacts import atomic_dir
from bksdm.families.base import Family
from bksdm.plan.prune import check_output_dir
from bksdm.plan.render import markdown_table
from bksdm.use.adapters.lora_map import LoraError, LoraMapping, LoraPart, check_part, map_lora, split_parts
from bksdm.use.adapters.student import REPORT_FILE, trace_student
from bksdm.use.lora import LORA_FILE, write_lora

logger = logging.getLogger(__name__)

__all__ = ["REPORT_FILE", "adapt_lora"]

"""The report's name in the output folder (``.json`` and ``.md``)."""
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")


def adapt_lora(
    student: str | os.PathLike,
    lora: str | os.PathLike,
    out: str | os.PathLike,
    teacher: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Maps ``lora`` (trained on the student's teacher) onto ``student`` and writes it to ``out``.

    Args:
        student: A student pipeline folder with its ``bksdm_plan.yaml`` (from ``bksdm prune``, ``distill``, ``demo``).
        lora: A ``.safetensors`` LoRA (diffusers/peft or kohya-style), or a folder holding one.
        out: The output folder: ``pytorch_lora_weights.safetensors`` and the report; written atomically.
        teacher: The teacher (folder or hub id) when the one the plan file records cannot be found.
        overwrite: Replace a non-empty ``out``.

    Returns:
        The report (also written as ``out/adapt_report.json`` and ``.md``).

    Raises:
        StudentError: The student has no plan file or is not its plan's student; nothing is written.
        LoraError: The LoRA is not a LoRA, or not one for this teacher; nothing is written.
        TeacherNotFoundError: The student or the teacher cannot be found.
        OutputExistsError: ``out`` is not empty and ``overwrite`` is False.
    """
    out = Path(out)
    traced = trace_student(student, teacher, "maps a LoRA onto")
    student, teacher_ref, teacher_config = traced.folder, traced.teacher_ref, traced.teacher_config
    family, plan, resolved, student_config = traced.family, traced.plan, traced.resolved, traced.student_config
    check_output_dir(out, overwrite)
    file = lora_file(Path(lora))

    pipeline_class = pipeline_class_of(student)
    state_dict, alphas, metadata, source_format = read_lora(pipeline_class, file, teacher_config)
    components = tuple(pipeline_class._lora_loadable_modules)
    parts = split_parts(state_dict, alphas, metadata, components, family.denoiser)
    for component, part in parts.items():
        if component != family.denoiser:
            problems = check_part(part, text_encoder_weights(student, component), f"the student's {component}")
            if problems:
                raise LoraError(f"this LoRA's {component} part does not fit the student's: " + "; ".join(problems[:4]))
    mapping = map_lora(
        parts, family.denoiser, resolved, weight_shapes(family, teacher_config), weight_shapes(family, student_config)
    )
    if not mapping.parts:
        raise LoraError("every adapter of this LoRA is on a block the student does not have: nothing to carry")
    report = build_report(mapping, parts, family.denoiser, teacher_ref, student, file, source_format, plan.name)
    report["out"] = str(out)
    with atomic_dir(out) as tmp:
        write_lora(tmp, pipeline_class, {c: p.tensors for c, p in mapping.parts.items()},
                   {c: p.config for c, p in mapping.parts.items()})  # fmt: skip
        (tmp / f"{REPORT_FILE}.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        (tmp / f"{REPORT_FILE}.md").write_text(report_markdown(report))
    logger.info("wrote %s", out / LORA_FILE)
    return report


# ---- inputs -------------------------------------------------------------------------------------------------


def lora_file(path: Path) -> Path:
    """The LoRA file ``--lora`` names: a ``.safetensors`` file, or a folder's ``pytorch_lora_weights.safetensors``
    (or its only ``.safetensors``). Pickled ``.bin`` files are refused: loading one can run arbitrary code.

    Raises:
        LoraError: No such file, or no single safetensors file in the folder.
    """
    if path.is_dir():
        if (path / LORA_FILE).is_file():
            return path / LORA_FILE
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise LoraError(f"--lora {path}: a folder with {len(found)} .safetensors files; give the LoRA file itself")
        return found[0]
    if not path.is_file():
        raise LoraError(f"--lora {path}: no such file or folder")
    if path.suffix != ".safetensors":
        raise LoraError(f"--lora {path}: not a .safetensors file (pickled LoRAs are not read: they can run code)")
    return path


def pipeline_class_of(student: Path) -> type:
    """The diffusers pipeline class the student's ``model_index.json`` names, which must load LoRAs.

    Raises:
        LoraError: The class is unknown to diffusers or has no LoRA loader.
    """
    import diffusers

    name = json.loads((student / "model_index.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "save_lora_weights") or not hasattr(cls, "lora_state_dict"):
        raise LoraError(f"--student {student} is a {name or 'pipeline'} pipeline, which does not load LoRAs")
    return cls


def read_lora(pipeline_class: type, file: Path, teacher_config: dict[str, Any]):
    """The LoRA as the pipeline class's ``lora_state_dict`` reads it (kohya files converted by diffusers).

    Returns:
        ``(state_dict, network_alphas or None, metadata or None, format)``, format ``kohya``, ``peft`` or
        ``diffusers`` from the file's own key names.

    Raises:
        LoraError: The file cannot be read as a LoRA.
    """
    from diffusers.configuration_utils import FrozenDict
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from safetensors import SafetensorError, safe_open

    kwargs: dict[str, Any] = {"weight_name": file.name, "use_safetensors": True, "return_lora_metadata": True}
    if "return_alphas" in inspect.signature(pipeline_class.lora_state_dict).parameters:
        kwargs["return_alphas"] = True  # FLUX
    if issubclass(pipeline_class, StableDiffusionXLLoraLoaderMixin):
        kwargs["unet_config"] = FrozenDict(teacher_config)  # as SDXL's load_lora_weights passes it (kohya blocks)
    try:
        with safe_open(str(file), "pt") as handle:
            keys = list(handle.keys())
        result = pipeline_class.lora_state_dict(str(file.parent), **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise LoraError(f"--lora {file}: cannot be read as a LoRA ({type(err).__name__}: {err})") from None
    state_dict, alphas, metadata = result if len(result) == 3 else (result[0], None, result[1])
    kind = "kohya" if any(k.startswith(KOHYA_PREFIXES) for k in keys) else None
    kind = kind or ("peft" if any(".lora_A." in k for k in keys) else "diffusers")
    return state_dict, alphas or None, metadata or None, kind


def weight_shapes(family: Family, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Module address → its weight's shape, for a denoiser built from ``config`` on the meta device."""
    with torch.device("meta"):
        return module_weights(family.build(config))


def module_weights(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Module address → its weight's shape, for every module of ``model`` with a ``weight`` tensor."""
    weights = ((name, getattr(module, "weight", None)) for name, module in model.named_modules())
    return {name: tuple(w.shape) for name, w in weights if isinstance(w, torch.Tensor)}


def text_encoder_weights(student: Path, component: str) -> dict[str, tuple[int, ...]]:
    """Module address → weight shape of the student's text encoder ``component``, built on the meta device.

    A CLIP text model that transformers builds without its ``text_model`` level (transformers 5) is also listed under
    ``text_model.`` names, which diffusers' loader strips from older LoRAs.
    """
    import transformers

    library, name = json.loads((student / "model_index.json").read_text()).get(component) or (None, None)
    if library != "transformers" or not hasattr(transformers, name):
        raise LoraError(f"this LoRA has a {component} part, and the student's {component} is not a transformers model")
    cls = getattr(transformers, name)
    config = transformers.AutoConfig.from_pretrained(student / component)
    with torch.device("meta"):
        model = cls(config)
    weights = module_weights(model)
    if not hasattr(model, "text_model"):
        weights |= {f"text_model.{n}": s for n, s in weights.items()}
    return weights


# ---- the report ---------------------------------------------------------------------------------------------


def build_report(
    mapping: LoraMapping,
    parts: dict[str, LoraPart],
    denoiser: str,
    teacher: str,
    student: Path,
    file: Path,
    source_format: str,
    plan: str,
) -> dict[str, Any]:
    """What was carried and what was dropped, per component, with the dropped adapters listed."""
    components = {}
    for name, part in parts.items():
        kept = mapping.parts.get(name)
        components[name] = {
            "adapters": len(part.modules()),
            "kept": len(kept.modules()) if kept else 0,
            "params": part.params(),
            "kept_params": kept.params() if kept else 0,
            "rank": part.config.get("r"),
            "alpha": part.config.get("lora_alpha"),
        }
    moved = {t: s for t, s in mapping.moved.items() if t != s}
    adapters = sum(c["adapters"] for c in components.values())
    return {
        "bksdm_version": __version__,
        "teacher": teacher,
        "student": str(student),
        "plan": plan,
        "lora": str(file),
        "format": source_format,
        "file": LORA_FILE,
        "denoiser": denoiser,
        "components": components,
        "adapters": {
            "total": adapters,
            "kept": adapters - len(mapping.dropped),
            "dropped": len(mapping.dropped),
            "moved": len(moved),
        },  # fmt: skip
        "params": {
            "total": mapping.total_params,
            "dropped": mapping.dropped_params,
            "dropped_share": mapping.dropped_share,
        },
        "dropped": [vars(d) for d in mapping.dropped],
        "moved": moved,
    }


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the totals, each component, and the dropped adapters by removed block."""
    a, p = report["adapters"], report["params"]
    by_block: dict[str, list[int]] = {}
    for d in report["dropped"]:
        entry = by_block.setdefault(d["block"], [0, 0])
        entry[0] += 1
        entry[1] += d["params"]
    rows = [[f"`{name}`", c["adapters"], c["kept"], f"{c['params']:,}", c["rank"], c["alpha"]]
            for name, c in report["components"].items()]  # fmt: skip
    lines = [
        "# bksdm adapt lora",
        "",
        f"LoRA `{report['lora']}` ({report['format']} format), trained on `{report['teacher']}`, carried onto the "
        f"student `{report['student']}` (plan `{report['plan']}`): `{report['file']}`, which "
        "`pipe.load_lora_weights(folder)` loads in stock diffusers.",
        "",
        f"- adapters: {a['kept']} of {a['total']} kept ({a['moved']} moved to another address), {a['dropped']} dropped"
        f" with the blocks the student does not have",
        f"- parameters dropped: {p['dropped']:,} of {p['total']:,} ({p['dropped_share']:.1%})",
        "",
        markdown_table(["component", "adapters", "kept", "params", "rank", "alpha"], rows),
        "",
    ]
    if by_block:
        lines += [
            "## Dropped adapters, by removed block",
            "",
            markdown_table(
                ["removed block", "adapters", "params"], [[f"`{b}`", n, f"{q:,}"] for b, (n, q) in by_block.items()]
            ),
            "",
        ]
    return "\n".join(lines)

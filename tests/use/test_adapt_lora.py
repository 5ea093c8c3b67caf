"""``bksdm adapt lora``: a teacher's LoRA carried onto its students through the plan's weight map.

Teacher LoRAs here are made with peft on the real modules (attention, resnet convolutions, projections), their B
matrices set to random values as after training, and saved with diffusers' ``save_lora_weights``; every output is
loaded with stock ``load_lora_weights`` and compared with the teacher's, adapter by adapter (delta W = B @ A * scale).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from bksdm.cli import main
from bksdm.families import family_of
from bksdm.loading import PLAN_FILE, load_denoiser_config, load_plan
from bksdm.plan.prune import prune
from bksdm.plan.surgery import shapes_of
from bksdm.use.lora import LORA_FILE, UNET_LORA_TARGETS, load_lora, save_lora, text_encoder_lora_problem, write_lora
from bksdm.world.teacher import TEACHER_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj", "ff.net.2")
"""Attention, resnet and projection modules: LoRAs beyond attention (LCM-LoRA's kind) exercise every key format."""
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
"""CLIP modules kohya-ss's LoRAs adapt."""
DIT_TARGETS = {"sd3": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj"), "flux": ("to_q", "to_k", "to_v", "proj_mlp")}


def load(folder: Path):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_lora(model: torch.nn.Module, targets, seed: int, **config) -> None:
    """A peft adapter on ``targets`` whose B is random (a trained adapter, not the identity a new one is)."""
    model.add_adapter(LoraConfig(**{"r": 4, "lora_alpha": 2, "init_lora_weights": "gaussian", **config},
                                 target_modules=list(targets)))  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1


def teacher_lora(teacher: Path, out: Path, targets, **config) -> Path:
    """A LoRA on ``teacher``'s denoiser, written in diffusers' format with its pipeline class."""
    pipe = load(teacher)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    add_lora(denoiser, targets, seed=1, **config)
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    config = denoiser.peft_config["default"].to_dict()
    write_lora(out, type(pipe), {name: get_peft_model_state_dict(denoiser)}, {name: config})
    return out


def deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapted module → delta W (B @ A * scale) of its loaded adapter, as peft applies it."""
    return {n: m.get_delta_weight(m.active_adapters[0]) for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def sources(student: Path) -> dict[str, str]:
    """Teacher module → the student module its weight was copied to, from the student's plan (independently of the
    job: the student's own tensors, mapped with the resolved plan's ``teacher_key``)."""
    config = load_denoiser_config(student)
    teacher = yaml.safe_load((student / PLAN_FILE).read_text())["teacher"]
    family = family_of(config)
    resolved = family.resolve(load_plan(student), load_denoiser_config(teacher))
    with torch.device("meta"):
        keys = [k.removesuffix(".weight") for k in shapes_of(family.build(config)) if k.endswith(".weight")]
    return {resolved.teacher_key(k + ".weight").removesuffix(".weight"): k for k in keys}


def removed_blocks(student: Path) -> list[str]:
    config = load_denoiser_config(yaml.safe_load((student / PLAN_FILE).read_text())["teacher"])
    resolved = family_of(config).resolve(load_plan(student), config)
    return [address for address, to in resolved.block_fates() if to is None]


def adapt(student: Path, lora: Path, out: Path, *extra: str) -> int:
    return main(["adapt", "lora", "--student", str(student), "--lora", str(lora), "--out", str(out), *extra])


def module_of(key: str) -> str:
    return key.split(".", 1)[1].rsplit(".lora_", 1)[0]


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict[str, Path]:
    """The bundled shapes teacher pruned to bk-small and bk-tiny."""
    root = tmp_path_factory.mktemp("students")
    return {plan: Path(prune(None, plan, root / plan)["out"]) for plan in ("bk-small", "bk-tiny")}


@pytest.fixture(scope="module")
def wide_lora(tmp_path_factory) -> Path:
    """A LoRA on the bundled teacher's attention, resnet convolutions and projections, with a rank and an alpha
    pattern (proj_in rank 2, conv1 alpha 8), saved with ``save_lora``."""
    return teacher_lora(TEACHER_DIR, tmp_path_factory.mktemp("wide"), WIDE_TARGETS,
                        rank_pattern={"proj_in": 2}, alpha_pattern={"conv1": 8})  # fmt: skip


@pytest.fixture(scope="module")
def attention_lora(tmp_path_factory) -> Path:
    """A LoRA on the bundled teacher's attention projections only: what ``bksdm dreambooth --lora`` trains."""
    return teacher_lora(TEACHER_DIR, tmp_path_factory.mktemp("attention"), UNET_LORA_TARGETS)


# ------------------------------------------------------------------------------------------------ mapping


def check_carried(student: Path, teacher: Path, lora: Path, out: Path) -> dict:
    """Loads the teacher LoRA on the teacher and the carried one on the student with stock diffusers; checks that
    every kept adapter's delta W equals its source's, that every tensor of the output loads, and that the dropped
    adapters are exactly those of the removed blocks. Returns the report."""
    report = json.loads((out / "adapt_report.json").read_text())
    t_pipe, s_pipe = load(teacher), load(student)
    t_pipe.load_lora_weights(lora)
    s_pipe.load_lora_weights(out)
    name = report["denoiser"]
    t_deltas, s_deltas = deltas(getattr(t_pipe, name)), deltas(getattr(s_pipe, name))
    removed = removed_blocks(student)
    dropped = [m for m in t_deltas if any(m.startswith(b + ".") for b in removed)]
    assert dropped and sorted(d["module"] for d in report["dropped"]) == sorted(dropped)
    to = sources(student)
    assert set(s_deltas) == {to[m] for m in t_deltas if m not in dropped}
    for module, delta in t_deltas.items():
        if module not in dropped:
            assert torch.equal(s_deltas[to[module]], delta), module
    written = {k.split(".", 1)[1]: v for k, v in load_file(out / LORA_FILE).items()}
    loaded = get_peft_model_state_dict(getattr(s_pipe, name), adapter_name="default_0")
    assert loaded.keys() == written.keys() and all(torch.equal(loaded[k], written[k]) for k in written)
    source = load_file(lora / LORA_FILE)
    share = sum(v.numel() for k, v in source.items() if module_of(k) in dropped) / sum(
        v.numel() for v in source.values()
    )
    assert report["params"]["dropped_share"] == pytest.approx(share, abs=1e-12)
    assert report["adapters"] == {"total": len(t_deltas), "kept": len(t_deltas) - len(dropped), "dropped": len(dropped),
                                  "moved": sum(to[m] != m for m in t_deltas if m not in dropped)}  # fmt: skip
    return report


@pytest.mark.parametrize("plan", ["bk-small", "bk-tiny"])
def test_kept_adapters_carry_the_teachers_delta_and_removed_ones_are_listed(
    plan, students, wide_lora, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    assert adapt(students[plan], wide_lora, out) == 0
    report = check_carried(students[plan], TEACHER_DIR, wide_lora, out)
    assert f"{report['adapters']['kept']} of {report['adapters']['total']} adapters carried" in capsys.readouterr().out
    # Moved: bk-small's up stages keep layers 0 and 2 as student layers 0 and 1, so layer 2's adapters move: its
    # resnet's 2 (conv1, time_emb_proj) in 4 stages and its attention's 10 (proj_in, 8 projections, ff) in the 3 with
    # attention. bk-tiny drops the innermost stage, so its 3 up stages each move down one index, both layers.
    assert report["adapters"]["moved"] == {"bk-small": 4 * 2 + 3 * 10, "bk-tiny": 3 * 2 * (2 + 10)}[plan]
    blocks = {d["block"] for d in report["dropped"]}
    assert "mid_block" in blocks and "up_blocks.1.attentions.1" in blocks
    assert (out / "adapt_report.md").read_text().count("`mid_block`") == 1


@pytest.mark.parametrize("layout", ["sd-v2", "sdxl"])
def test_other_unet_teachers(layout, tiny_sd2_dir, tiny_sdxl_dir, tmp_path) -> None:
    teacher = {"sd-v2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}[layout]
    student = Path(prune(str(teacher), "bk-small", tmp_path / "student")["out"])
    lora = teacher_lora(teacher, tmp_path / "lora", WIDE_TARGETS)
    assert adapt(student, lora, tmp_path / "out") == 0
    check_carried(student, teacher, lora, tmp_path / "out")


@pytest.mark.parametrize("layout", ["sd3", "flux"])
def test_transformer_students(layout, tiny_dit_dirs, tmp_path) -> None:
    teacher = tiny_dit_dirs[layout]
    student = Path(prune(str(teacher), "keep-half", tmp_path / "student")["out"])
    lora = teacher_lora(teacher, tmp_path / "lora", DIT_TARGETS[layout])
    assert adapt(student, lora, tmp_path / "out") == 0
    report = check_carried(student, teacher, lora, tmp_path / "out")
    assert report["denoiser"] == "transformer" and report["adapters"]["moved"] > 0


def test_the_teacher_lora_as_is_loads_only_in_part_on_bk_small_and_fails_on_bk_tiny(
    students, attention_lora, wide_lora
) -> None:
    """What stock diffusers does without the remap: on bk-small an attention LoRA loads with no error, but the adapters
    of the removed blocks are skipped (a logged warning) and those of moved blocks land on the wrong block; LoRAs on
    resnets, and bk-tiny's shifted up stages, fail on a size mismatch."""
    teacher = load(TEACHER_DIR)
    teacher.load_lora_weights(attention_lora)
    t_deltas = deltas(teacher.unet)
    small = load(students["bk-small"])
    small.load_lora_weights(attention_lora)  # no error
    s_deltas = deltas(small.unet)
    to = sources(students["bk-small"])
    came_from = {s: t for t, s in to.items()}
    assert (len(t_deltas), len(s_deltas)) == (128, 72)  # 56 adapters silently skipped
    misplaced = [m for m in s_deltas if came_from[m] != m]
    assert len(misplaced) == 24  # the second kept attention of every up stage
    for module in misplaced:  # the adapter of the teacher's block of that name, not of the block it came from
        assert torch.equal(s_deltas[module], t_deltas[module]) and not torch.equal(
            s_deltas[module], t_deltas[came_from[module]]
        )
    for lora, student in ((wide_lora, "bk-small"), (attention_lora, "bk-tiny")):
        with pytest.raises(RuntimeError, match="size mismatch"):
            load(students[student]).load_lora_weights(lora)


# ------------------------------------------------------------------------------------------ kohya files


def kohya_name(component: str, module: str) -> str:
    """kohya-ss's name of a module: its diffusers address with ``_`` for ``.`` under ``lora_unet_`` / ``lora_te_``
    (CLIP's modules under ``text_model``, as kohya-ss saves them)."""
    if component == "unet":
        return "lora_unet_" + module.replace(".", "_")
    return "lora_te_" + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")


def test_a_kohya_file_maps_exactly_as_its_diffusers_twin(tiny_sd_dir, tmp_path) -> None:
    """The same adapters (U-Net and text encoder, alpha 2 at rank 4) in kohya-ss's format and in diffusers': the
    carried files hold the same tensors, with the same rank and alpha for every module."""
    pipe = load(tiny_sd_dir)
    add_lora(pipe.unet, WIDE_TARGETS, seed=3)
    # The text encoder's adapters as a transformers-4 CLIP names them (peft cannot add them to transformers 5's CLIP
    # before peft 0.22): rank 4 on every layer's attention projections and MLP, as kohya-ss trains them.
    generator = torch.Generator().manual_seed(4)
    text = {}
    adapted = [(n, m) for n, m in pipe.text_encoder.named_modules() if n.endswith(TEXT_TARGETS)]
    for name, module in adapted:
        key = "text_model." + name.removeprefix("text_model.")
        text[f"{key}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator)
        text[f"{key}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator)
    twin = tmp_path / "diffusers"
    configs = {"unet": pipe.unet.peft_config["default"].to_dict(),
               "text_encoder": {"r": 4, "lora_alpha": 2, "target_modules": list(TEXT_TARGETS)}}  # fmt: skip
    write_lora(twin, type(pipe), {"unet": get_peft_model_state_dict(pipe.unet), "text_encoder": text}, configs)
    kohya = {}
    for key, value in load_file(twin / LORA_FILE).items():
        component, rest = key.split(".", 1)
        module, suffix = rest.rsplit(".lora_", 1)
        name = kohya_name(component, module)
        kohya[f"{name}.{'lora_down' if suffix.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(2.0)
    (tmp_path / "kohya").mkdir()
    save_file(kohya, tmp_path / "kohya" / "my_lora.safetensors")
    student = Path(prune(str(tiny_sd_dir), "bk-tiny", tmp_path / "student")["out"])
    assert adapt(student, twin, tmp_path / "from-diffusers") == 0
    assert adapt(student, tmp_path / "kohya" / "my_lora.safetensors", tmp_path / "from-kohya") == 0
    a, b = (json.loads((tmp_path / f / "adapt_report.json").read_text()) for f in ("from-diffusers", "from-kohya"))
    assert (a["format"], b["format"]) == ("peft", "kohya")
    assert a["dropped"] == b["dropped"] and a["moved"] == b["moved"]
    assert a["components"]["text_encoder"] == b["components"]["text_encoder"] | {"alpha": 2}
    assert b["components"]["text_encoder"]["kept"] == len(adapted) == 6 * pipe.text_encoder.config.num_hidden_layers

    def carried(folder: str) -> dict[str, tuple[torch.Tensor, tuple[int, float]]]:
        from diffusers import StableDiffusionPipeline

        from bksdm.use.adapters.lora_map import rank_and_alpha, split_parts

        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(tmp_path / folder), return_lora_metadata=True
        )
        parts = split_parts(state, alphas, metadata, ("unet", "text_encoder"), "unet")
        return {f"{c}.{k.removeprefix('text_model.')}": (v, rank_and_alpha(p.config, module_of(f"{c}.{k}")))
                for c, p in parts.items() for k, v in p.tensors.items()}  # fmt: skip

    x, y = carried("from-diffusers"), carried("from-kohya")
    assert x.keys() == y.keys() and len(x) > 0
    for key, (tensor, rank_alpha) in x.items():
        assert torch.equal(tensor, y[key][0]) and rank_alpha == y[key][1] == (4, 2.0), key


# ---------------------------------------------------------------------------------------------- save_lora


def test_save_lora_writes_every_target_in_one_format_that_stock_diffusers_loads(tmp_path) -> None:
    """With targets beyond attention, every tensor loads (diffusers' older key format, mixed with peft's for the
    non-attention modules, made ``load_lora_weights`` skip every attention adapter)."""
    pipe = load(TEACHER_DIR)
    add_lora(pipe.unet, WIDE_TARGETS, seed=5)
    file = save_lora(tmp_path, pipe.unet)
    stored = load_file(file)
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in stored)
    fresh = load(TEACHER_DIR)
    fresh.load_lora_weights(tmp_path)
    loaded = get_peft_model_state_dict(fresh.unet, adapter_name="default_0")
    assert {f"unet.{k}" for k in loaded} == set(stored) and len(stored) == 2 * len(deltas(pipe.unet))
    other = load(TEACHER_DIR)
    add_lora(other.unet, WIDE_TARGETS, seed=6)
    load_lora(file, other.unet)  # a checkpoint read back exactly
    again = get_peft_model_state_dict(other.unet)
    assert all(torch.equal(again[k.removeprefix("unet.")], v) for k, v in stored.items())


# --------------------------------------------------------------------------------------------- refusals


def test_refusals_say_why_before_writing_anything(students, attention_lora, tiny_sd_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    small = students["bk-small"]

    def refused(student: Path, lora: Path, *extra: str, target: Path = out) -> str:
        assert adapt(student, lora, target, *extra) == 2
        assert not target.exists() or target == busy
        return capsys.readouterr().err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "exists and is not empty" in refused(small, attention_lora, target=busy)
    assert (busy / "keep.txt").read_text() == "mine"
    # Another teacher's LoRA: the tiny SD pipeline's modules and widths are not the shapes teacher's.
    other = teacher_lora(tiny_sd_dir, tmp_path / "other", UNET_LORA_TARGETS)
    err = refused(small, other)
    assert "this LoRA is not for the student's teacher" in err and "do not fit its weight" in err
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    weights = load_file(attention_lora / LORA_FILE)
    save_file({k.replace("down_blocks.0.attentions.0", "down_blocks.0.attentions.7"): v for k, v in weights.items()},
              renamed / LORA_FILE)  # fmt: skip
    assert (
        "down_blocks.0.attentions.7.transformer_blocks.0.attn1.to_q: the teacher's unet has no such module"
        in refused(small, renamed)
    )
    # A student with no plan file: the teacher itself.
    assert "has no bksdm_plan.yaml" in refused(TEACHER_DIR, attention_lora)
    # Not LoRAs: a model's weights, a text file, a pickle.
    assert "are not LoRA weights" in refused(small, small / "unet" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    assert "cannot be read as a LoRA" in refused(small, tmp_path / "notes.safetensors")
    (tmp_path / "old.bin").write_bytes(b"\x80\x04")
    assert "not a .safetensors file" in refused(small, tmp_path / "old.bin")
    assert "no such file or folder" in refused(small, tmp_path / "missing.safetensors")
    # A student whose recorded teacher is gone: --teacher is offered, and works.
    moved = tmp_path / "moved-student"
    shutil.copytree(small, moved)
    record = yaml.safe_load((moved / PLAN_FILE).read_text())
    (moved / PLAN_FILE).write_text(yaml.safe_dump(record | {"teacher": str(tmp_path / "gone")}))
    assert "pass --teacher" in refused(moved, attention_lora)
    # ... and a --teacher that is not the student's teacher is refused.
    assert "is not what its plan makes from the teacher" in refused(
        moved, attention_lora, "--teacher", str(tiny_sd_dir)
    )
    # A student whose plan file is another plan's (bk-tiny's record in a bk-small student).
    swapped = tmp_path / "swapped"
    shutil.copytree(small, swapped)
    shutil.copy(students["bk-tiny"] / PLAN_FILE, swapped / PLAN_FILE)
    err = refused(swapped, attention_lora)
    assert "is not what its plan makes from the teacher" in err and "tensors of its unet differ" in err
    assert adapt(moved, attention_lora, out, "--teacher", str(TEACHER_DIR)) == 0
    assert adapt(moved, attention_lora, out, "--teacher", str(TEACHER_DIR), "--overwrite") == 0


@pytest.mark.skipif(text_encoder_lora_problem() is not None, reason="peft too old for text-encoder LoRA")
def test_text_encoder_part_is_kept_as_is_and_loads(students, tmp_path) -> None:
    pipe = load(TEACHER_DIR)
    add_lora(pipe.unet, UNET_LORA_TARGETS, seed=7)
    add_lora(pipe.text_encoder, ("q_proj", "k_proj"), seed=8)
    save_lora(tmp_path / "lora", pipe.unet, pipe.text_encoder)
    assert adapt(students["bk-small"], tmp_path / "lora", tmp_path / "out") == 0
    student = load(students["bk-small"])
    student.load_lora_weights(tmp_path / "out")
    assert all(torch.equal(deltas(student.text_encoder)[m], d) for m, d in deltas(pipe.text_encoder).items())

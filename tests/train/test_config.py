"""The distill config: paper defaults, YAML quirks, overrides, one error listing every problem, shipped recipes."""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import bksdm.train.config as config_module
from bksdm.train.config import (
    DistillConfig,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    validate_config,
)
from bksdm.train.settings import ConfigError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "distill").glob("sd-v*.yaml"))
"""The paper's recipes (SD-v1.4, SD-v2.1); the transformer and SDXL ones are checked in test_sdxl_recipe.py."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.problems


def test_defaults_are_the_papers_recipe() -> None:
    cfg = load_config(None)
    assert cfg == DistillConfig()
    o, t, d, lo, m = cfg.optim, cfg.train, cfg.data, cfg.loss, cfg.model
    assert (o.lr, o.adam_beta1, o.adam_beta2, o.weight_decay, o.adam_epsilon) == (5e-5, 0.9, 0.999, 1e-2, 1e-8)
    assert (o.lr_scheduler, o.lr_warmup_steps, o.max_grad_norm, o.scale_lr, o.use_8bit_adam) == (
        "constant",
        0,
        1.0,
        False,
        False,
    )
    assert (t.batch_size, t.gradient_accumulation_steps, t.total_batch_size()) == (64, 4, 256)
    assert t.total_batch_size(num_processes=2) == 512
    assert (t.max_steps, t.mixed_precision, t.gradient_checkpointing, t.seed) == (50000, "fp16", True, 1234)
    assert (t.use_ema, t.ema_decay) == (True, 0.9999)
    assert (d.resolution, d.center_crop, d.random_flip) == (512, True, True)
    assert (lo.lambda_task, lo.lambda_out, lo.lambda_feat) == (1.0, 1.0, 1.0)
    assert (m.plan, m.init, m.allow_partial_init, m.student) == ("bk-small", "teacher", False, None)
    assert len(t.validation_prompts) == 4 and t.trackers == []
    assert (t.validation_steps, t.validation_guidance) == (25, 7.5)  # the paper's evaluation sampler


def test_teacher_dtype_auto_follows_mixed_precision() -> None:
    assert TrainConfig().resolved_teacher_dtype() == "fp16"
    assert TrainConfig(mixed_precision="bf16").resolved_teacher_dtype() == "bf16"
    assert TrainConfig(mixed_precision="no").resolved_teacher_dtype() == "fp32"
    assert TrainConfig(mixed_precision="no", teacher_dtype="fp16").resolved_teacher_dtype() == "fp16"


def test_every_field_has_an_attribute_docstring() -> None:
    tree = ast.parse(inspect.getsource(config_module))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for cls in (DistillConfig, *config_module.SECTIONS.values()):
        body = classes[cls.__name__].body
        documented = {
            stmt.target.id
            for stmt, nxt in zip(body, body[1:], strict=False)
            if isinstance(stmt, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        }
        assert {f.name for f in fields(cls)} <= documented, cls.__name__


def test_yaml_numeric_strings_become_floats(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        optim: {lr: 5e-5, weight_decay: 1e-2, adam_epsilon: 1E-8, max_grad_norm: 2}
        loss: {lambda_feat: 0}
        """,
    )
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == "5e-5"  # the PyYAML quirk this guards against
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.adam_epsilon) == (5e-5, 1e-2, 1e-8)
    assert type(cfg.optim.lr) is float and type(cfg.optim.max_grad_norm) is float and cfg.optim.max_grad_norm == 2.0
    assert type(cfg.loss.lambda_feat) is float and cfg.loss.lambda_feat == 0.0
    assert cfg.train == TrainConfig()  # untouched sections keep their defaults


def test_overrides_apply_on_top_of_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {max_steps: 100, resume: latest}\nmodel: {teacher: a/b}\n")
    cfg = load_config(
        path,
        [
            "train.max_steps=10",
            "optim.lr=1e-4",
            'train.validation_prompts=["a cat", "b"]',
            "train.resume=null",
            "train.trackers=[tensorboard]",
            "data.train=shards/{00000..00009}.tar",
            "model.revision=1234",  # YAML would read an int; a string field keeps the text
            "loss.lambda_out = 0.5",
            "data.center_crop=false",
        ],
    )
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.train.resume) == (10, 1e-4, None)
    assert cfg.train.validation_prompts == ["a cat", "b"] and cfg.train.trackers == ["tensorboard"]
    assert cfg.data.train == "shards/{00000..00009}.tar" and cfg.model.revision == "1234"
    assert (cfg.loss.lambda_out, cfg.data.center_crop, cfg.model.teacher) == (0.5, False, "a/b")
    assert load_config(None, ["loss.lambda_task=0"]).loss.lambda_task == 0.0  # overrides work without a file


def test_every_problem_is_listed_together_with_its_dotted_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        model: {init: copy, plan: bk-smal, variant: ""}
        data: {resolution: 500, num_workers: -1, max_samples: 0, center_crop: 1}
        loss: {lambda_task: 0, lambda_out: 0, lambda_feat: 0}
        optim: {adam_beta1: fast, adam_beta2: 1.0, lr_scheduler: cosine_annealing, lr: 0}
        train:
          max_steps: true
          batch_size: 64.0
          mixed_precision: fp32
          ema_decay: 1.5
          keep_checkpoints: 0
          trackers: [wandb, mlflow]
          validation_prompts: [a cat, 3]
          output_dir: null
          learning_rate: 1e-4
          lr: 1e-4
          max_step: 5
        trian: {}
        """,
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, ["train.seed=-1", "optim.adam_beta_1=0.5", "max_steps=3", "train.max_steps"])
    problems = problems_of(excinfo)
    expected = [
        # overrides
        "train.seed (override): must be in [0, 2**32), got -1",
        "optim.adam_beta_1: unknown key; did you mean 'adam_beta1'?",
        "max_steps: an override key must be SECTION.KEY; did you mean 'train.max_steps'?",
        "train.max_steps: an override must be KEY=VALUE",
        # structure
        "trian: unknown section; did you mean 'train'?",
        "train.max_step: unknown key; did you mean 'max_steps'?",
        "train.lr: unknown key; did you mean 'optim.lr'?",
        "train.learning_rate: unknown key; known keys: output_dir, max_steps",
        # types
        "optim.adam_beta1: expected a number, got 'fast'",
        "train.max_steps: expected a whole number, got true",
        "train.batch_size: expected a whole number, got 64.0",
        "data.center_crop: expected true or false, got 1",
        "train.validation_prompts: expected a list of non-empty strings, got ['a cat', 3]",
        "train.output_dir: expected a non-empty string, got null",
        "model.variant: expected a non-empty string or null, got ''",
        # choices
        "model.init: 'copy' is not one of teacher, random",
        "optim.lr_scheduler: 'cosine_annealing' is not one of constant, constant_with_warmup, linear, cosine",
        "train.mixed_precision: 'fp32' is not one of no, fp16, bf16; full precision is 'no'",
        "train.trackers: 'mlflow' is not one of tensorboard, wandb",
        # ranges
        "data.resolution: must be a positive multiple of 8, got 500",
        "data.num_workers: must be >= 0, got -1",
        "data.max_samples: must be >= 1 (or null for all), got 0",
        "optim.lr: must be > 0, got 0",
        "optim.adam_beta2: must be in [0, 1), got 1.0",
        "train.ema_decay: must be in [0, 1), got 1.5",
        "train.keep_checkpoints: must be >= 1, got 0",
        # cross-field
        "model.plan: 'bk-smal' is neither a preset",
        "did you mean 'bk-small'?",
        "loss: lambda_task, lambda_out and lambda_feat are all 0",
    ]
    for text in expected:
        assert any(text in p for p in problems), f"missing {text!r} in:\n" + "\n".join(problems)
    assert len(problems) == len(expected) - 1  # the plan's "did you mean" is part of its own problem
    message = str(excinfo.value)
    assert message.startswith(f"invalid config {path} ({len(problems)} problems):")
    assert "optim.adam_beta1: expected a number, got 'fast'" in message


def test_cross_field_rules() -> None:
    cases = {
        "optim.lr_warmup_steps: 100 has no effect with lr_scheduler 'constant'": ["optim.lr_warmup_steps=100"],
        "optim.lr_warmup_steps: 100 is longer than train.max_steps (10)": [
            "optim.lr_warmup_steps=100",
            "optim.lr_scheduler=linear",
            "train.max_steps=10",
        ],
        "model.init: 'random' conflicts with model.student": ["model.init=random", "model.student=out/s"],
        "data.train: 'hf:' needs a dataset name": ["data.train=hf:"],
        "train.trackers: lists a tracker twice": ["train.trackers=[wandb, wandb]"],
    }
    for text, overrides in cases.items():
        with pytest.raises(ConfigError) as excinfo:
            load_config(None, overrides)
        assert len(problems_of(excinfo)) == 1 and text in problems_of(excinfo)[0], problems_of(excinfo)
    ok = load_config(None, ["optim.lr_scheduler=constant_with_warmup", "optim.lr_warmup_steps=500"])
    assert ok.optim.lr_warmup_steps == 500
    assert load_config(None, ["model.student=out/s", "model.plan=not-a-plan"]).model.student == "out/s"


def test_plan_may_be_an_existing_file(tmp_path: Path) -> None:
    plan = tmp_path / "my-plan.yaml"
    plan.write_text("base: bk-base\n")
    assert load_config(None, [f"model.plan={plan}"]).model.plan == str(plan)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "- a\n- b\n"), ["nope"])
    assert len(problems_of(excinfo)) == 2 and "a config must be a mapping of sections" in problems_of(excinfo)[1]
    with pytest.raises(ConfigError, match=r"train: expected a mapping of keys, got 5"):
        load_config(write(tmp_path, "train: 5\n"))
    assert load_config(write(tmp_path, "# only a comment\n")) == DistillConfig()
    assert load_config(write(tmp_path, "train:\nloss:\n"), ["train.max_steps=7"]).train.max_steps == 7


def test_save_and_load_round_trip_exactly(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "model.teacher=stabilityai/stable-diffusion-2-1",
            "model.revision=fp16-branch",
            "data.train=hf:lambdalabs/naruto-blip-captions",
            "data.max_samples=1000",
            "optim.lr=3.3e-7",
            "optim.weight_decay=0",
            "loss.lambda_feat=0.25",
            "train.validation_prompts=['a: quoted, \"prompt\"', 'ünïcode']",
            "train.trackers=[tensorboard, wandb]",
            "train.resume=latest",
        ],
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    first = path.read_text()
    assert list(yaml.safe_load(first)) == ["model", "data", "loss", "optim", "train"]
    assert list(yaml.safe_load(first)["optim"])[:2] == ["lr", "adam_beta1"]  # declaration order, not sorted
    save_config(load_config(path), path)
    assert path.read_text() == first  # stable: saving the reloaded config gives the same bytes
    assert not list(path.parent.glob(".*tmp"))
    assert load_config(save_config(DistillConfig(), tmp_path / "d.yaml")) == DistillConfig()


def test_config_from_dict_does_not_modify_its_input() -> None:
    data = {"train": {"max_steps": 3}}
    cfg = config_from_dict(data, ["train.max_steps=4", "loss.lambda_out=0"])
    assert cfg.train.max_steps == 4 and data == {"train": {"max_steps": 3}}


def test_validate_config_checks_configs_built_in_code() -> None:
    good = DistillConfig(model=ModelConfig(teacher="x/y", plan="bk-tiny"))
    assert validate_config(good) == good
    bad = DistillConfig(train=TrainConfig(batch_size=0, mixed_precision="bf61"))
    with pytest.raises(ConfigError) as excinfo:
        validate_config(bad)
    assert problems_of(excinfo) == [
        "train.batch_size: must be >= 1, got 0",
        "train.mixed_precision: 'bf61' is not one of no, fp16, bf16; did you mean 'bf16'?",
    ]


# name → (teacher, plan, data folder, resolution, batch per device, accumulation)
RECIPE_FACTS = {
    "sd-v1.4-bk-base": ("CompVis/stable-diffusion-v1-4", "bk-base", "preprocessed_212k", 512, 64, 4),
    "sd-v1.4-bk-small": ("CompVis/stable-diffusion-v1-4", "bk-small", "preprocessed_212k", 512, 64, 4),
    "sd-v1.4-bk-tiny": ("CompVis/stable-diffusion-v1-4", "bk-tiny", "preprocessed_212k", 512, 64, 4),
    "sd-v1.4-bk-small-2m": ("CompVis/stable-diffusion-v1-4", "bk-small", "preprocessed_2256k", 512, 64, 4),
    "sd-v2.1-base-bk-small": ("stabilityai/stable-diffusion-2-1-base", "bk-small", "preprocessed_212k", 512, 64, 2),
    "sd-v2.1-bk-small": ("stabilityai/stable-diffusion-2-1", "bk-small", "preprocessed_212k", 768, 32, 4),
}


def test_every_documented_recipe_is_shipped() -> None:
    assert sorted(p.stem for p in RECIPES) == sorted(RECIPE_FACTS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_loads_with_the_papers_values(path: Path) -> None:
    cfg = load_config(path)
    teacher, plan, folder, resolution, batch, accumulation = RECIPE_FACTS[path.stem]
    assert (cfg.model.teacher, cfg.model.plan, cfg.model.init) == (teacher, plan, "teacher")
    assert cfg.data.train == f"data/laion_aes/{folder}"
    assert (cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip) == (resolution, True, True)
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation_steps) == (batch, accumulation)
    assert cfg.train.total_batch_size() == (128 if "v2" in path.stem else 256)
    assert cfg.train.output_dir == f"runs/{path.stem}"
    # everything else is the paper's recipe, i.e. the defaults
    assert cfg.optim == DistillConfig().optim and cfg.loss == DistillConfig().loss
    assert (cfg.train.max_steps, cfg.train.mixed_precision, cfg.train.seed) == (50000, "fp16", 1234)
    assert cfg.train.gradient_checkpointing and cfg.train.use_ema and cfg.train.ema_decay == 0.9999
    header = path.read_text().split("\n\n")[0]
    rel = f"configs/distill/{path.name}"
    assert f"accelerate launch -m bksdm.cli distill --config {rel}" in header
    assert f"bksdm distill --config {rel}" in header
    assert "yours to provide" in header and f"data/laion_aes/{folder}" in header


def test_settings_serve_another_schema_with_aliases_and_typed_values(tmp_path) -> None:
    """The machinery under the distill config (bksdm.train.settings) takes any tree of sections: another recipe's
    schema, its legacy names (as overrides, flags and flat YAML keys) and values already typed by a parser."""
    from dataclasses import dataclass, field

    from bksdm.train.settings import Schema, load_settings, save_settings

    @dataclass
    class Optim:
        lr: float = 1e-4
        weight_decay: float = 1e-2

    @dataclass
    class Run:
        steps: int = 10
        prompts: list[str] = field(default_factory=lambda: ["a"])
        sizes: list[int] = field(default_factory=list)
        mode: str = "lora"

    @dataclass
    class Recipe:
        optim: Optim = field(default_factory=Optim)
        run: Run = field(default_factory=Run)

    def cross(s: Recipe, problems: list[str]) -> None:
        if s.run.mode == "full" and s.optim.lr > 1e-3:
            problems.append("optim.lr: too high for full fine-tuning")

    schema = Schema(
        root=Recipe,
        choices={"run.mode": ("lora", "full")},
        ranges={"run.steps": (lambda v: v >= 1, "must be >= 1")},
        cross_checks=cross,
        aliases={"adam_weight_decay": "optim.weight_decay", "max_train_steps": "run.steps"},
    )
    path = write(tmp_path, "adam_weight_decay: 1e-3\nrun:\n  mode: full\n")
    got = load_settings(
        schema, path, ["max_train_steps=7", "optim.lr=5e-5"], values={"--adam-weight-decay": 0.5, "run.sizes": (1, 2)}
    )
    assert got == Recipe(Optim(lr=5e-5, weight_decay=0.5), Run(steps=7, sizes=[1, 2], mode="full"))
    save_settings(schema, got, tmp_path / "saved.yaml")
    assert load_settings(schema, tmp_path / "saved.yaml") == got
    with pytest.raises(ConfigError) as excinfo:
        load_settings(schema, None, ["run.mode=ful", "max_train_steps=0", "optim.lr=1e-2", "run.size=[1]"])
    assert problems_of(excinfo) == [
        "run.size: unknown key; did you mean 'sizes'?",
        "run.mode (override): 'ful' is not one of lora, full; did you mean 'full'?",
        "run.steps (override): must be >= 1, got 0",
    ]
    with pytest.raises(ConfigError) as excinfo:
        load_settings(schema, None, ["run.mode=full", "optim.lr=1e-2", "run.sizes=[1.5]"])
    assert problems_of(excinfo) == [
        "run.sizes (override): expected a list of whole numbers, got [1.5]",
        "optim.lr: too high for full fine-tuning",
    ]

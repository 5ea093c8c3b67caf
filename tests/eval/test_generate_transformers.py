"""``bksdm generate``, ``evaluate`` and ``report`` on tiny stock SD3 and FLUX.1 pipelines (bksdm.world.tiny_dit):
images, manifest, seeds, resume, the sampling defaults of each pipeline class, the memory estimate of a transformer
call, and the user errors only transformers have (--unet, a negative prompt for FLUX, sides not multiples of 16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from bksdm.cli import main
from bksdm.eval.generate import prompt_seed
from bksdm.eval.inception import InceptionV3, torch_fidelity_input
from bksdm.loading import load_denoiser_config
from bksdm.memory import (
    TEXT_TOKENS,
    TRANSFORMER_TENSORS_PER_WIDTH,
    VAE_TENSORS_PER_CHANNEL,
    transformer_activation_bytes,
)
from bksdm.sampling import classifier_free, pipeline_bytes, sampling_defaults, steps_run
from bksdm.world.tiny_dit import build_tiny_dit_pipeline

PROMPTS = ["a red circle at the top left", "a blue square", "a small green triangle on the right"]
STOCK = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tiny_dit_dirs) -> dict[str, Path]:
    """The saved tiny SD3, FLUX.1-dev and FLUX.1-schnell pipelines (seed 0)."""
    return {layout: tiny_dit_dirs[layout] for layout in ("sd3", "flux", "flux-schnell")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def generate(model: Path, prompts: Path, out: Path, *extra: str) -> int:
    return main(["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), *extra])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


NAMES = [f"{i:06d}.png" for i in range(len(PROMPTS))]


@pytest.mark.parametrize("layout", ["sd3", "flux"])
def test_generate_writes_the_stock_pipelines_images_and_resumes(layout, models, prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--steps", "2", "--height", "128", "--width", "128", "--batch-size", "1"]
    assert generate(models[layout], prompt_file, out, *argv) == 0
    assert "(3 generated, 0 already there" in capsys.readouterr().out
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(e["prompt"], e["seed"], e["file"]) for e in manifest] == [
        (p, prompt_seed(0, i), n) for i, (p, n) in enumerate(zip(PROMPTS, NAMES, strict=True))
    ]
    settings = json.loads((out / "settings.json").read_text())["settings"]
    guidance = {"sd3": 7.0, "flux": 3.5}[layout]  # the table's, since no --guidance was given
    assert (settings["steps"], settings["guidance_scale"], settings["height"], settings["unet"]) == (
        2,
        guidance,
        128,
        None,
    )
    assert settings["scheduler"] == "FlowMatchEulerDiscreteScheduler"

    # Each image is what the stock pipeline draws for its prompt from the documented seed.
    pipe = STOCK[layout].from_pretrained(models[layout])
    pipe.set_progress_bar_config(disable=True)
    for i in (0, 2):
        generator = torch.Generator().manual_seed(prompt_seed(0, i))
        image = pipe(PROMPTS[i], num_inference_steps=2, guidance_scale=guidance, generator=generator,
                     height=128, width=128).images[0]  # fmt: skip
        assert np.array_equal(np.asarray(image), pixels(out / NAMES[i])), i
    assert np.abs(pixels(out / NAMES[0]).astype(int) - pixels(out / NAMES[1])).mean() > 1  # prompts matter

    # A rerun skips every image; a deleted one is drawn again, identical.
    before = {n: (out / n).read_bytes() for n in NAMES}
    assert generate(models[layout], prompt_file, out, *argv) == 0
    assert "(0 generated, 3 already there" in capsys.readouterr().out
    (out / NAMES[1]).unlink()
    assert generate(models[layout], prompt_file, out, *argv) == 0
    assert "(1 generated, 2 already there" in capsys.readouterr().out
    assert {n: (out / n).read_bytes() for n in NAMES} == before
    assert not list(out.glob(".*"))  # no partial file left
    # The same folder with other settings is refused rather than mixed.
    assert generate(models[layout], prompt_file, out, "--steps", "3", "--height", "128", "--width", "128") == 2


def test_defaults_per_pipeline_class(models, tmp_path) -> None:
    """SD3: 28 steps at CFG 7.0 and its native 128 px (sample_size 16 x 8); FLUX.1-dev 28 at guidance 3.5 and
    schnell 4 at 0, at 1024 px (FluxPipeline's size: the transformer records none)."""
    expected = {"sd3": (28, 7.0, None), "flux": (28, 3.5, 1024), "flux-schnell": (4, 0.0, 1024)}
    for layout, (steps, guidance, side) in expected.items():
        d = sampling_defaults(models[layout], denoiser=load_denoiser_config(models[layout]))
        assert (d.steps, d.guidance_scale, d.height, d.width) == (steps, guidance, side, side), layout
        assert d.embedded_guidance == layout.startswith("flux")
        i2i = sampling_defaults(models[layout], "image-to-image", load_denoiser_config(models[layout]))
        assert (i2i.steps, i2i.strength) == ({"sd3": 50}.get(layout, steps), 0.8)

    one = tmp_path / "one.txt"
    one.write_text(PROMPTS[0] + "\n")
    assert generate(models["sd3"], one, tmp_path / "sd3", "--steps", "1") == 0  # no size given: the native one
    assert Image.open(tmp_path / "sd3" / NAMES[0]).size == (128, 128)
    assert generate(models["flux-schnell"], one, tmp_path / "schnell", "--steps", "1") == 0
    settings = json.loads((tmp_path / "schnell" / "settings.json").read_text())["settings"]
    assert (settings["guidance_scale"], settings["height"], settings["width"]) == (0.0, 1024, 1024)
    assert Image.open(tmp_path / "schnell" / NAMES[0]).size == (1024, 1024)


def test_flow_img2img_step_count_and_guidance_kinds() -> None:
    # diffusers' get_timesteps: SD's pipelines run int(steps x strength), the flow ones round up.
    assert [steps_run(10, s) for s in (0.3, 0.25, 0.05)] == [3, 2, 0]
    assert [steps_run(10, s, "sd3") for s in (0.3, 0.25, 0.05, 1.0)] == [3, 3, 1, 10]
    assert steps_run(4, 0.8, "flux-schnell") == 4
    sd3, flux = build_tiny_dit_pipeline("sd3"), build_tiny_dit_pipeline("flux")
    assert classifier_free(sd3, 7.0) and not classifier_free(sd3, 1.0)
    assert not classifier_free(flux, 3.5)  # FLUX.1-dev's guidance is an input of its transformer


def test_memory_estimate_of_a_transformer_call() -> None:
    """Tokens (2x2 latent patches + the text) x attention width x the measured factor, against the VAE term."""
    pipe = build_tiny_dit_pipeline("sd3")
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim  # 16
    side, batch = 1024, 2
    tokens = (side // 8) ** 2 // 4 + TEXT_TOKENS
    transformer = TRANSFORMER_TENSORS_PER_WIDTH * tokens * width * 2 * batch * 4  # CFG doubles the batch
    vae = VAE_TENSORS_PER_CHANNEL * 16 * side * side * batch * 4  # fp32
    images = 3 * side * side * batch * 9
    assert pipeline_bytes(pipe, side, side, batch, True) == max(transformer, vae) + images

    # The peaks measured on real widths (bksdm.memory's docstring), fp32, CPU: the estimate covers each, within 2x.
    sd3 = {"num_attention_heads": 24, "attention_head_dim": 64}  # SD3-medium: 1536 wide
    flux = {"num_attention_heads": 24, "attention_head_dim": 128}  # FLUX.1: 3072 wide
    measured_mib = [(sd3, 512, 2, 309), (sd3, 1024, 1, 453), (flux, 512, 1, 452), (flux, 1024, 1, 956)]
    for config, px, b, mib in measured_mib:
        estimate = transformer_activation_bytes(config, (px // 8) ** 2, b) / 2**20
        assert mib <= estimate <= 2 * mib, (config, px, b, estimate)


@pytest.mark.parametrize(
    ("layout", "extra", "message"),
    [
        ("flux", ["--unet", "{sd3}"], "has no U-Net to replace"),
        ("flux", ["--negative-prompt", "blurry"], "FLUX.1 models take no negative prompt"),
        ("sd3", ["--height", "120"], "not a multiple of 16"),
        ("sd3", ["--steps", "0"], "needs at least 1 denoising step"),
    ],
)
def test_user_errors_exit_2_and_write_nothing(layout, extra, message, models, prompt_file, tmp_path, capsys):
    extra = [e.format(sd3=models["sd3"]) for e in extra]
    assert generate(models[layout], prompt_file, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("bksdm generate: error:") and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def generated(models, prompt_file, tmp_path_factory) -> dict[str, Path]:
    """Folders bksdm generate wrote from the tiny SD3 and FLUX.1-dev pipelines."""
    root = tmp_path_factory.mktemp("generated")
    for layout in ("sd3", "flux"):
        argv = ["--steps", "2", "--height", "128", "--width", "128"]
        assert generate(models[layout], prompt_file, root / layout, *argv) == 0
    return {layout: root / layout for layout in ("sd3", "flux")}


def test_evaluate_and_report_on_transformer_folders(generated, models, tmp_path, capsys) -> None:
    # A narrow FID Inception with random weights stands for the real one (as in test_evaluate.py).
    torch.manual_seed(0)
    net = InceptionV3(width=1 / 8)
    with torch.no_grad():
        net.fc.weight.mul_(300)
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    net.eval()
    for layout, folder in generated.items():
        code = main(["evaluate", "--images", str(folder), "--metrics", "is", "--is-splits", "1",
                     "--inception-weights", str(weights)])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        result = json.loads((folder / "evaluation.json").read_text())
        assert result["count"] == len(PROMPTS)
        with torch.no_grad():
            batch = torch.stack([torch.from_numpy(pixels(folder / n).copy()).permute(2, 0, 1) for n in NAMES])
            logits = (net.pool_features(torch_fidelity_input(batch)) @ net.fc.weight.T).double()
        p, log_p = logits.softmax(1), logits.log_softmax(1)
        expected = (p * (log_p - p.mean(0, keepdim=True).log())).sum(1).mean().exp().item()  # one split
        assert result["metrics"]["is"] == pytest.approx(expected, rel=1e-6), layout

    out = tmp_path / "report"
    code = main(["report", "--model", f"sd3={generated['sd3']}", "--model", f"flux={generated['flux']}",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    for layout in ("sd3", "flux"):
        profile = report["models"][layout]["profile"]
        transformer = STOCK[layout].from_pretrained(models[layout]).transformer
        assert profile["family"] == layout
        assert profile["denoiser_params"] == sum(p.numel() for p in transformer.parameters())
        assert profile["denoiser_macs"] > 0
        assert report["models"][layout]["metrics"]["is"] > 0
    assert [c["prompt"] for c in report["grid"]] == PROMPTS  # both folders share every prompt and seed
    text = (out / "report.md").read_text()
    assert "denoiser params" in text and "U-Net params" not in text

"""``bksdm img2img``, ``serve`` and ``export onnx`` with tiny stock SD3 and FLUX.1 pipelines (bksdm.world.tiny_dit).

img2img runs the stock img2img variants (StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline) at the input's size
and honours the strength as diffusers counts it; the demo's JSON API serves transformer models; ONNX export
refuses them, pointing to optimum, before reading any weights.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
from PIL import Image

from bksdm.cli import main
from bksdm.eval.generate import generate_images
from bksdm.sampling import SamplingError, steps_run
from bksdm.use.img2img import Img2ImgError, image_seed, img2img_pipeline, translate
from bksdm.use.serve.app import DemoApp, SamplingSettings, default_sampling, load_models
from bksdm.use.serve.server import make_server

PROMPT = "a big blue square at the top left"
IMG2IMG = {"sd3": StableDiffusion3Img2ImgPipeline, "flux": FluxImg2ImgPipeline}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tiny_dit_dirs) -> dict[str, Path]:
    """The saved tiny SD3, FLUX.1-dev and FLUX.1-schnell pipelines (seed 0)."""
    return {layout: tiny_dit_dirs[layout] for layout in ("sd3", "flux", "flux-schnell")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Two noise images: one of the tiny pipelines' 128 px, one 136x100 (no multiple of 16)."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for name, (width, height) in (("a.png", (128, 128)), ("b.png", (136, 100))):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- img2img -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sd3", "flux"])
def test_img2img_uses_the_stock_variant_at_the_input_size(layout, models, inputs, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["img2img", "--model", str(models[layout]), "--image", str(inputs), "--prompt", PROMPT, "--out", str(out)]
    assert main([*argv, "--steps", "4", "--strength", "0.6", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "3 of 4 steps" in printed  # 4 x 0.6 = 2.4, which the flow pipelines round up
    # The input's size, rounded down to 16 (the VAE's 8 x the 2x2 patches); the stock variants alone would draw
    # at their native size (128 here, 1024 for FLUX) whatever the input.
    assert Image.open(out / "a.png").size == (128, 128)
    assert Image.open(out / "b.png").size == (128, 96)
    record = json.loads((out / "img2img.json").read_text())
    assert (record["steps"], record["denoising_steps_run"], record["guidance_scale"]) == (
        4,
        3,
        7.0 if layout == "sd3" else 3.5,
    )
    assert [e["seed"] for e in record["images"]] == [image_seed(3, 0), image_seed(3, 1)]

    # The library call behind it: the stock img2img class, the same pixels from the same seeds.
    pipe = img2img_pipeline(models[layout])
    assert type(pipe) is IMG2IMG[layout]
    originals = [Image.open(inputs / name).convert("RGB") for name in ("a.png", "b.png")]
    guidance = record["guidance_scale"]
    again = translate(pipe, originals, PROMPT, [image_seed(3, 0), image_seed(3, 1)], strength=0.6, steps=4,
                      guidance_scale=guidance, batch_size=1)  # fmt: skip
    for name, image in zip(("a.png", "b.png"), again, strict=True):
        assert np.array_equal(_pixels(image), _pixels(Image.open(out / name))), name


@pytest.mark.parametrize("layout", ["sd3", "flux"])
def test_img2img_honours_the_strength(layout, models, inputs) -> None:
    pipe = img2img_pipeline(models[layout])
    calls: list[float] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(float(kwargs["timestep"].flatten()[0])), with_kwargs=True
    )
    image = Image.open(inputs / "a.png").convert("RGB")
    made, timesteps = {}, {}
    try:
        for strength in (0.25, 0.5, 1.0):
            calls.clear()
            (made[strength],) = translate(pipe, [image], PROMPT, [0], strength=strength, steps=8, guidance_scale=3.0)
            timesteps[strength] = list(calls)
    finally:
        hook.remove()
    # One transformer call per step run (SD3 batches the guided pair into one call), the last steps of the schedule.
    assert {s: len(t) for s, t in timesteps.items()} == {s: steps_run(8, s, layout) for s in (0.25, 0.5, 1.0)}
    assert {s: len(t) for s, t in timesteps.items()} == {0.25: 2, 0.5: 4, 1.0: 8}
    assert timesteps[0.25] == timesteps[1.0][-2:] and timesteps[0.5] == timesteps[1.0][-4:]
    # Strength 1 starts from pure noise: sigma 1, which SD3 passes as timestep 1000 and FLUX as 1.
    assert timesteps[1.0][0] == pytest.approx({"sd3": 1000.0, "flux": 1.0}[layout])
    assert np.abs(_pixels(made[0.25]) - _pixels(made[1.0])).mean() > 1
    for strength in (0.0, 1.5, float("nan")):
        with pytest.raises(Img2ImgError, match="--strength"):
            translate(pipe, [image], PROMPT, [0], strength=strength, steps=8)


@pytest.mark.parametrize(
    ("layout", "extra", "message"),
    [
        ("sd3", ["--strength", "0"], "--strength must be in (0, 1]"),
        ("sd3", ["--unet", "{flux}"], "has no U-Net to replace"),
        ("flux", ["--negative-prompt", "blurry"], "FLUX.1 models take no negative prompt"),
    ],
)
def test_img2img_user_errors_exit_2(layout, extra, message, models, inputs, tmp_path, capsys) -> None:
    extra = [e.format(flux=models["flux"]) for e in extra]
    argv = ["img2img", "--model", str(models[layout]), "--image", str(inputs), "--prompt", PROMPT]
    assert main([*argv, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bksdm img2img: error:") and message in err, err
    assert not (tmp_path / "out").exists()


# --- serve ---------------------------------------------------------------------------------------------------


def _request(url: str, body: object = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as response:
        assert response.status == 200
        return json.loads(response.read())


def _decode(data_url: str) -> np.ndarray:
    import base64
    import io

    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))).convert("RGB"))


def test_serve_api_generates_with_transformer_models(models) -> None:
    settings = SamplingSettings(steps=2, guidance_scale=3.5, height=128, width=128)
    app = DemoApp(load_models(str(models["sd3"]), [str(models["flux"])]), settings)
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        info = _request(server.url + "api/models")
        first = _request(server.url + "api/generate", {"prompt": "a red circle", "seed": 11})
        second = _request(server.url + "api/generate", {"prompt": "a red circle", "seed": 11})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    params = [sum(p.numel() for p in m.pipe.transformer.parameters()) for m in app.models]
    assert [(m["name"], m["denoiser"], m["denoiser_params"]) for m in info["models"]] == [
        ("teacher", "transformer", params[0]),
        ("student", "transformer", params[1]),
    ]
    assert all("unet_params" not in m for m in info["models"])
    for a, b, model in zip(first["models"], second["models"], app.models, strict=True):
        assert (a["width"], a["height"]) == (128, 128) and a["image"] == b["image"]  # same request, same PNG
        (expected,) = generate_images(model.pipe, ["a red circle"], [11], steps=2, guidance_scale=3.5,
                                      height=128, width=128)  # fmt: skip
        assert np.array_equal(_decode(a["image"]), np.asarray(expected))
    assert not np.array_equal(_decode(first["models"][0]["image"]), _decode(first["models"][1]["image"]))

    with pytest.raises(SamplingError, match="multiple of 16"):  # refused when the app starts, not per request
        DemoApp(app.models, SamplingSettings(steps=2, height=120, width=128))


def test_serve_defaults_per_pipeline_class(models) -> None:
    assert default_sampling(str(models["sd3"])) == SamplingSettings(28, 7.0)  # native size: None
    assert default_sampling(str(models["flux"])) == SamplingSettings(28, 3.5, 1024, 1024)
    assert default_sampling(str(models["flux-schnell"])) == SamplingSettings(4, 0.0, 1024, 1024)
    assert default_sampling(str(models["flux"]), 2, None, 128, 128) == SamplingSettings(2, 3.5, 128, 128)


# --- export --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "denoiser"), [("sd3", "SD3Transformer2DModel"), ("flux", "FluxTransformer2DModel")])
def test_export_refuses_transformers_and_points_to_optimum(layout, denoiser, models, tmp_path, capsys) -> None:
    # Without the transformer's weights: the refusal comes from its config alone, before anything is loaded.
    model = tmp_path / layout
    shutil.copytree(models[layout], model)
    for weights in (model / "transformer").glob("*.safetensors"):
        weights.unlink()
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--model", str(model), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("bksdm export onnx: error:") or err.startswith("bksdm export: error:"), err
    assert denoiser in err and "Hugging Face optimum" in err
    assert f"optimum-cli export onnx --model {model} OUT" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [layout]  # nothing written, not even a partial folder

"""``bksdm profile`` for diffusion transformers (issue 13, item 6): the published SD3 / SD3.5 / FLUX.1 architectures
built on the meta device, transformer plans, timing of tiny transformer pipeline folders, and the attention MACs of
joint (SD3, FLUX double) and single (FLUX) blocks against hand computations on the tiny configs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bksdm.cli import main
from bksdm.families import family_of
from bksdm.loading import load_plan
from bksdm.plan.archs import ALL_ARCHS, ARCHS, build_denoiser, build_text_encoders, build_vae, get_arch
from bksdm.plan.dit_archs import TRANSFORMER_ARCHS
from bksdm.plan.prune import vae_decoder_params
from bksdm.profiling import count_macs, count_params
from bksdm.world.tiny_dit import save_tiny_dit_pipeline, tiny_dit_config

PUBLISHED = {
    "sd3-medium": 2_028_328_000,
    "sd3.5-medium": 2_243_171_520,
    "sd3.5-large": 8_056_627_520,
    "flux.1-dev": 11_901_408_320,
    "flux.1-schnell": 11_891_178_560,
}
CLIP_L = 123_060_480
CLIP_L_PROJECTED = CLIP_L + 768 * 768
BIGG = 694_659_840
T5_XXL = 4_762_310_656
VAE_16CH_DECODER = 49_545_475


def _profile(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["profile", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _fail(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["profile", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


# --- the published architectures, on the meta device ----------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), list(PUBLISHED.items()))
def test_published_transformer_params(name: str, expected: int, capsys: pytest.CaptureFixture[str]) -> None:
    out = _profile(capsys, "--arch", name, "--no-latency")
    assert out["denoiser_params"] == expected
    assert "unet_params" not in out and out["latency"] is False
    assert out["resolution"] == 1024 and out["latent_size"] == 128
    sd3 = name.startswith("sd3")
    assert out["family"] == ("sd3" if sd3 else "flux")
    assert out["denoiser_class"] == ("SD3Transformer2DModel" if sd3 else "FluxTransformer2DModel")
    encoders = {k: (e["class"], e["params"], e["tokens"]) for k, e in out["text_encoders"].items()}
    if sd3:
        assert encoders == {
            "text_encoder": ("CLIPTextModelWithProjection", CLIP_L_PROJECTED, 77),
            "text_encoder_2": ("CLIPTextModelWithProjection", BIGG, 77),
            "text_encoder_3": ("T5EncoderModel", T5_XXL, 256),
        }
    else:
        t5_tokens = 512 if name == "flux.1-dev" else 256
        assert encoders == {
            "text_encoder": ("CLIPTextModel", CLIP_L, 77),
            "text_encoder_2": ("T5EncoderModel", T5_XXL, t5_tokens),
        }
    assert out["vae_decoder_params"] == VAE_16CH_DECODER
    assert out["whole_params"] == expected + sum(p for _, p, _ in encoders.values()) + VAE_16CH_DECODER
    assert out["denoiser_macs_with_attention"] > out["denoiser_macs"] > 0


def test_sd3_medium_macs_by_hand() -> None:
    # 1024 px: 128x128 latents in 2x2 patches = 4096 image tokens; text 77 CLIP + 256 T5 tokens; 24 blocks of
    # 24 heads x 64. Every block's joint attention (the last one's too: its text queries are computed, only
    # their outputs are dropped) costs 2 x heads x (4096 + 333)^2 x 64.
    arch = get_arch("sd3-medium")
    count = family_of(arch.denoiser_config).step_macs(arch.denoiser_config, 1024, 8)
    assert count.attention == 24 * 2 * 24 * (4096 + 333) ** 2 * 64
    # Linear layers: per token and block, q/k/v/out (4 d^2) and the 4x MLP (8 d^2) of its stream, d = 1536.
    d, image, text = 1536, 4096, 333
    blocks = 23 * 12 * d * d * (image + text) + (12 * d * d * image + 3 * d * d * text)  # the last: text q/k/v only
    assert 0 < count.conv_linear - blocks < 0.01 * count.conv_linear  # the rest: embeddings, modulation, output


def test_flux_macs_by_hand() -> None:
    arch = get_arch("flux.1-dev")
    count = family_of(arch.denoiser_config).step_macs(arch.denoiser_config, 1024, 8)
    # 64x64 packed tokens + 512 T5 tokens; 19 double + 38 single blocks of 24 heads x 128, all over 4608 tokens.
    assert count.attention == 57 * 2 * 24 * (4096 + 512) ** 2 * 128
    schnell = get_arch("flux.1-schnell")
    count_schnell = family_of(schnell.denoiser_config).step_macs(schnell.denoiser_config, 1024, 8)
    assert count_schnell.attention == 57 * 2 * 24 * (4096 + 256) ** 2 * 128


def test_arch_registry() -> None:
    assert set(ALL_ARCHS) == set(ARCHS) | set(PUBLISHED) and not set(ARCHS) & set(TRANSFORMER_ARCHS)
    flux_dev = get_arch("FLUX.1-dev")
    assert flux_dev.pipeline == "FluxPipeline" and flux_dev.repo == "black-forest-labs/FLUX.1-dev"
    vae = build_vae("sd3.5-large")
    assert (vae.config.latent_channels, vae.config.shift_factor, vae.config.scaling_factor) == (16, 0.0609, 1.5305)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert build_vae("flux.1-schnell").config.shift_factor == 0.1159
    assert vae_decoder_params(vae) == VAE_16CH_DECODER
    assert list(build_denoiser("sd3.5-medium").config.dual_attention_layers) == list(range(13))
    assert type(build_text_encoders("flux.1-dev")["text_encoder_2"]).__name__ == "T5EncoderModel"
    with pytest.raises(ValueError, match="unknown architecture 'sd4'.*flux.1-dev"):
        get_arch("sd4")


# --- plans on the transformer architectures ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd3.5-medium", "flux.1-dev"])
def test_keep_half_plan(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    arch = get_arch(name)
    out = _profile(capsys, "--arch", name, "--plan", "keep-half", "--no-latency")
    student = family_of(arch.denoiser_config).resolve(load_plan("keep-half"), arch.denoiser_config).student_config()
    assert out["plan"] == "keep-half"
    assert out["denoiser_params"] == count_params(build_denoiser(student))
    assert out["denoiser_params"] < PUBLISHED[name] * 0.6
    identity = _profile(capsys, "--arch", name, "--plan", "identity", "--no-latency")
    assert identity["denoiser_params"] == PUBLISHED[name]


def test_blocks_yaml_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "flux-small.yaml"
    plan.write_text("name: flux-small\nblocks:\n  transformer_blocks: first:5\n  single_transformer_blocks: every:2\n")
    out = _profile(capsys, "--arch", "flux.1-schnell", "--plan", str(plan), "--no-latency")
    config = {**get_arch("flux.1-schnell").denoiser_config, "num_layers": 5, "num_single_layers": 19}
    assert out["plan"] == "flux-small" and out["denoiser_params"] == count_params(build_denoiser(config))


def test_unet_plan_on_transformer_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    err = _fail(capsys, "--arch", "sd3-medium", "--plan", "bk-tiny", "--no-latency")
    assert "plan 'bk-tiny' cannot be applied" in err and "U-Net rules, but the teacher is a sd3 transformer" in err


def test_transformer_resolution_must_fit_patches(capsys: pytest.CaptureFixture[str]) -> None:
    assert "multiple of 16" in _fail(capsys, "--arch", "flux.1-dev", "--no-latency", "--resolution", "1000")


def test_unet_results_gain_denoiser_keys(capsys: pytest.CaptureFixture[str]) -> None:
    out = _profile(capsys, "--arch", "sd-v1.4", "--no-latency")
    assert out["denoiser_params"] == out["unet_params"] == 859_520_964
    assert out["denoiser_macs"] == out["unet_macs"] and out["family"] == "unet"


# --- tiny transformer pipeline folders: timing, plans, tables -----------------------------------------------


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_dit")
    return {layout: save_tiny_dit_pipeline(root / layout, layout) for layout in ("sd3", "sd3.5", "flux")}


@pytest.mark.parametrize("layout", ["sd3", "sd3.5", "flux"])
def test_tiny_folder_timed(layout: str, dit_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(dit_dirs[layout])
    args = [folder, "--resolution", "128", "--steps", "2", "--repeats", "2", "--warmup", "0", "--device", "cpu"]
    out = _profile(capsys, *args)
    assert out["latency"] is True and "unet_step_s" not in out
    for key in ("denoiser_step", "denoiser_step_cfg", "text_encoder", "vae_decode"):
        assert out[f"{key}_s"] > 0 and len(out[f"{key}_times_s"]) == 2
    assert out["image_s"] == pytest.approx(out["text_encoder_s"] + 2 * out["denoiser_step_s"] + out["vae_decode_s"])
    expected_cfg = 2 * out["text_encoder_s"] + 2 * out["denoiser_step_cfg_s"] + out["vae_decode_s"]
    assert out["image_cfg_s"] == pytest.approx(expected_cfg)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    assert out["denoiser_params"] == count_params(pipe.transformer)
    assert list(out["text_encoders"]) == [
        n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if n in pipe.components
    ]
    meta = _profile(capsys, folder, "--resolution", "128", "--no-latency")
    for key in (
        "denoiser_params",
        "denoiser_macs",
        "denoiser_macs_with_attention",
        "text_encoder_macs",
        "whole_params",
    ):
        assert meta[key] == out[key], key
    # The counts on the loaded weights equal those of the meta build.
    config = tiny_dit_config(layout)
    real = count_macs(pipe.transformer, **family_of(config).mac_inputs(config, 128, "cpu", 8))
    assert (real.conv_linear, real.total) == (out["denoiser_macs"], out["denoiser_macs_with_attention"])


def test_tiny_folder_plan_timed_and_table(dit_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(dit_dirs["sd3.5"])
    # With timing the student comes from surgery on the loaded teacher: same shapes as the meta build.
    timed = _profile(capsys, folder, "--plan", "keep-half", "--steps", "1", "--repeats", "1", "--warmup", "0")
    meta = _profile(capsys, folder, "--plan", "keep-half", "--no-latency")
    teacher = _profile(capsys, folder, "--no-latency")
    assert timed["denoiser_params"] == meta["denoiser_params"] < teacher["denoiser_params"]
    assert timed["denoiser_step_s"] > 0 and meta["denoiser_macs"] < teacher["denoiser_macs"]
    assert main(["profile", folder, "--no-latency"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if "U-Net" in line]
    header = next(line for line in lines if line.startswith("component "))
    end = header.index("params") + len("params")  # the params column is right-aligned under its header
    for label, params in [
        ("transformer step ", teacher["denoiser_params"]),
        ("text_encoder_3 ", teacher["text_encoders"]["text_encoder_3"]["params"]),
        ("whole (transformer + text + VAE dec.) ", teacher["whole_params"]),
    ]:
        row = next(line for line in lines if line.startswith(label))
        assert row[:end].endswith(f" {params:,}"), row
    assert any("text encoders: 77 / 77 / 256 tokens" in line for line in lines)


def test_onnx_refuses_a_transformer(
    dit_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _fail(capsys, str(dit_dirs["flux"]), "--onnx", str(tmp_path), "--device", "cpu", "--dtype", "fp32")
    assert "flux transformer" in err and "drop --onnx" in err


# --- attention MACs of the tiny configs, by hand ------------------------------------------------------------------

# tiny_dit: 2 heads of 8 channels (width 16); 128 px -> 16x16 latents -> 8x8 = 64 image tokens (SD3's 2x2 patches,
# FLUX's 2x2 packing); text as the pipelines give it: SD3 77 + 256, FLUX.1-dev 512 T5 tokens, schnell 256.
HEADS, HEAD_DIM, WIDTH, IMAGE = 2, 8, 16, 64


def _joint(tokens: int) -> int:
    return 2 * HEADS * tokens * tokens * HEAD_DIM  # QK^T + AV over every token


@pytest.mark.parametrize(
    ("layout", "blocks", "text"),
    [("sd3", 6, 333), ("sd3.5", 6, 333), ("flux", 3 + 6, 512), ("flux-schnell", 3 + 6, 256)],
)
def test_tiny_attention_macs_by_hand(layout: str, blocks: int, text: int) -> None:
    config = tiny_dit_config(layout)
    family = family_of(config)
    count = family.step_macs(config, 128, 8, group_depth=3)
    dual = 3 if layout == "sd3.5" else 0  # SD3.5's first blocks add attn2: image tokens alone
    assert count.attention == blocks * _joint(IMAGE + text) + dual * _joint(IMAGE)
    per = count.attention_per_module
    if layout.startswith("flux"):
        # Double blocks attend over text + image jointly; single blocks over the concatenated sequence: the same.
        assert per["transformer_blocks.0.attn"] == per["single_transformer_blocks.0.attn"] == _joint(IMAGE + text)
    else:
        assert per["transformer_blocks.5.attn"] == _joint(IMAGE + text)  # the context_pre_only block as well
        if dual:
            assert per["transformer_blocks.0.attn2"] == _joint(IMAGE) and "transformer_blocks.3.attn2" not in per
    real = count_macs(build_denoiser(config, device="cpu"), **family.mac_inputs(config, 128, "cpu", 8))
    assert (real.attention, real.conv_linear) == (count.attention, count.conv_linear)


@pytest.mark.parametrize("layout", ["sd3", "sd3.5", "flux"])
def test_tiny_block_linear_macs_by_hand(layout: str) -> None:
    config = tiny_dit_config(layout)
    per = family_of(config).step_macs(config, 128, 8, group_depth=2).per_module
    d2 = WIDTH * WIDTH
    if layout.startswith("flux"):
        tokens = IMAGE + 512
        # Double: two 6d modulations; per token of either stream q/k/v/out (4 d^2) and the 4x GELU MLP (8 d^2).
        assert per["transformer_blocks.0"] == 12 * d2 + 12 * d2 * tokens
        # Single: a 3d modulation; per token q/k/v (3 d^2), MLP in (4 d^2), out over [attention, MLP] (5 d^2).
        assert per["single_transformer_blocks.0"] == 3 * d2 + 12 * d2 * tokens
        return
    text = 333
    joint = 12 * d2 + 12 * d2 * (IMAGE + text)
    # The last block: 6d + 2d modulations; image tokens as every block, text tokens only q/k/v.
    assert per["transformer_blocks.5"] == 8 * d2 + 12 * d2 * IMAGE + 3 * d2 * text
    if layout == "sd3":
        assert per["transformer_blocks.0"] == joint
    else:  # SD3.5 dual blocks: a 9d image modulation instead of 6d, and attn2's q/k/v/out on the image tokens
        assert per["transformer_blocks.0"] == joint + 3 * d2 + 4 * d2 * IMAGE
        assert per["transformer_blocks.3"] == joint


def test_preset_weights_that_do_not_fit_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import bksdm.sampling

    # A machine with 4 GiB free: SD3-medium's pipeline (7.66G parameters) needs 28.5 GiB in fp32, 14.3 in bf16.
    monkeypatch.setattr(bksdm.sampling, "available_memory", lambda device: (4 * 2**30, "available (test)"))
    err = _fail(capsys, "--arch", "sd3-medium", "--device", "cpu", "--dtype", "bf16")
    assert "--arch sd3-medium needs 14.3 GiB for its random bf16 weights, but 4.0 GiB is available (test)" in err
    assert "--no-latency" in err


def test_macs_count_the_text_tokens_the_pipeline_gives() -> None:
    """The bundled SD3-shaped teacher's CLIPs read 16 tokens, so its transformer reads 16 + 256, not SD3's 77 + 256."""
    from bksdm.eval.profile import profile_components
    from bksdm.world.dit_teacher import load_dit_teacher

    pipe = load_dit_teacher()
    encoders = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    result = profile_components(pipe.transformer, encoders, pipe.vae, 64, latency=False)
    assert result["denoiser_text_tokens"] == 16 + 256
    assert {e["tokens"] for e in result["text_encoders"].values()} == {16, 256}
    family, config = family_of(pipe.transformer), dict(pipe.transformer.config)
    assert result["denoiser_macs"] == family.step_macs(config, 64, 4, text_tokens=272).conv_linear
    stock = family.step_macs(config, 64, 4).conv_linear  # 77 + 256 tokens
    hidden, width = config["num_attention_heads"] * config["attention_head_dim"], config["joint_attention_dim"]
    # per text token: the context embedder, then q, k, v, out and a 4x feed-forward in every block but the last,
    # whose text stream stops after k and v
    blocks = config["num_layers"]
    per_token = width * hidden + (blocks - 1) * (4 * hidden * hidden + 8 * hidden * hidden) + 3 * hidden * hidden
    assert stock - result["denoiser_macs"] == (77 - 16) * per_token

"""Inception-v3 as FID and IS use it (the TensorFlow 2015-12-05 graph ported to PyTorch), and its weights.

Why our own definition: pytorch-fid, torch-fidelity and clean-fid all import torchvision, and so does
torchmetrics' FID/IS (through torch-fidelity's package ``__init__``, which imports its CLIP/VGG extractors);
a PyPI torchvision does not import beside every torch build (it does not beside ours), and the network is a
fixed, published graph. So this module defines that graph -- torchvision's Inception3 layout with the
TensorFlow patches FID needs (average pools that ignore padding, a max pool in the last block, 1008 classes)
-- under the *same module names* as pytorch-fid and torch-fidelity, so their weight file loads as it is:
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid) or its byte-identical twin
``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity), both from the torch hub cache where those
libraries keep it. On identical weights, our pool features and logits equal torch-fidelity's
(``tests/eval/test_metrics.py::test_inception_matches_torch_fidelity`` when torch-fidelity's files are at hand).

Two input conventions, one per reference implementation the paper used:

- :func:`pytorch_fid_input` (FID, KID): float images in [0, 1], ``F.interpolate`` bilinear to 299 px,
  scaled to [-1, 1] -- pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``;
- :func:`torch_fidelity_input` (IS): uint8 images, TensorFlow-1 bilinear resize to 299 px,
  ``(x - 128) / 128`` -- torch-fidelity's ``FeatureExtractorInceptionV3``; the IS logits are its
  "logits_unbiased" (the last layer without its bias).

``width`` scales every layer's channels (1 = the real network); tests build narrow ones, save them, and load
them through the same :func:`load_inception` as the real file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FID_WEIGHTS_URL",
    "INPUT_SIZE",
    "WEIGHT_FILES",
    "InceptionV3",
    "InceptionWeightsNotFoundError",
    "default_weight_paths",
    "inception_from_state_dict",
    "load_inception",
    "pytorch_fid_input",
    "resize_bilinear_tf1",
    "torch_fidelity_input",
]

INPUT_SIZE = 299
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
"""pytorch-fid's release of the FID Inception weights (the paper's FID tool)."""
FIDELITY_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
"""torch-fidelity's release of the same weights (the paper's IS tool)."""
WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
"""File names looked for in the torch hub cache (``$TORCH_HOME/hub/checkpoints``), pytorch-fid's first."""


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The Inception-v3 weight file is neither at the given path nor in the cache, and cannot be downloaded."""


# ------------------------------------------------------------------------------------------ the network


class _Conv(nn.Module):
    """Convolution (no bias) + batch norm (eps 1e-3, TensorFlow's) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 average pool leaves the zero padding out of the average (torchvision's counts it).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int, c) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, c(64), 1)
        self.branch5x5_1 = _Conv(cin, c(48), 1)
        self.branch5x5_2 = _Conv(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, c(64), 1)
        self.branch3x3dbl_2 = _Conv(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = _Conv(c(96), c(96), 3, padding=1)
        self.branch_pool = _Conv(cin, c(pool_features), 1)
        self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class _MixedB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int, c) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, c(384), 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, c(64), 1)
        self.branch3x3dbl_2 = _Conv(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = _Conv(c(96), c(96), 3, stride=2)
        self.out_channels = c(384) + c(96) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, cin: int, channels_7x7: int, c) -> None:
        super().__init__()
        c7 = c(channels_7x7)
        self.branch1x1 = _Conv(cin, c(192), 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, c(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, c(192), (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, c(192), 1)
        self.out_channels = 4 * c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            bd = layer(bd)
        bd = self.branch7x7dbl_5(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_tf(x))], 1)


class _MixedD(nn.Module):
    """17 -> 8 reduction."""

    def __init__(self, cin: int, c) -> None:
        super().__init__()
        self.branch3x3_1 = _Conv(cin, c(192), 1)
        self.branch3x3_2 = _Conv(c(192), c(320), 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, c(192), 1)
        self.branch7x7x3_2 = _Conv(c(192), c(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(c(192), c(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(c(192), c(192), 3, stride=2)
        self.out_channels = c(320) + c(192) + cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches; ``max_pool`` in the last one (a quirk of the TF graph)."""

    def __init__(self, cin: int, c, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, c(320), 1)
        self.branch3x3_1 = _Conv(cin, c(384), 1)
        self.branch3x3_2a = _Conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, c(448), 1)
        self.branch3x3dbl_2 = _Conv(c(448), c(384), 3, padding=1)
        self.branch3x3dbl_3a = _Conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, c(192), 1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3: 299x299 inputs in [-1, 1] → 2048 pool features and 1008 class logits.

    Args:
        width: Channel multiplier (1.0 for the real network; narrower ones are for tests).
        num_classes: Output classes of ``fc`` (1008 in the TensorFlow graph).
    """

    def __init__(self, width: float = 1.0, num_classes: int = 1008) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.width = width

        def c(n: int) -> int:
            return max(1, round(n * width))

        self.Conv2d_1a_3x3 = _Conv(3, c(32), 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(c(32), c(32), 3)
        self.Conv2d_2b_3x3 = _Conv(c(32), c(64), 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(c(64), c(80), 1)
        self.Conv2d_4a_3x3 = _Conv(c(80), c(192), 3)
        blocks: list[tuple[str, nn.Module]] = []
        cin = c(192)
        for name, make in (
            ("Mixed_5b", lambda i: _MixedA(i, 32, c)),
            ("Mixed_5c", lambda i: _MixedA(i, 64, c)),
            ("Mixed_5d", lambda i: _MixedA(i, 64, c)),
            ("Mixed_6a", lambda i: _MixedB(i, c)),
            ("Mixed_6b", lambda i: _MixedC(i, 128, c)),
            ("Mixed_6c", lambda i: _MixedC(i, 160, c)),
            ("Mixed_6d", lambda i: _MixedC(i, 160, c)),
            ("Mixed_6e", lambda i: _MixedC(i, 192, c)),
            ("Mixed_7a", lambda i: _MixedD(i, c)),
            ("Mixed_7b", lambda i: _MixedE(i, c, max_pool=False)),
            ("Mixed_7c", lambda i: _MixedE(i, c, max_pool=True)),
        ):
            block = make(cin)
            setattr(self, name, block)
            blocks.append((name, block))
            cin = block.out_channels
        self._mixed = [name for name, _ in blocks]
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (N, 3, 299, 299) in [-1, 1] → pool3 features (N, 2048): FID's space."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for name in self._mixed:
            x = getattr(self, name)(x)  # ... (N, 768, 17, 17) ... (N, 2048, 8, 8)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (N, 2048)

    def logits_unbiased(self, features: torch.Tensor) -> torch.Tensor:
        """Pool features (N, 2048) → class logits (N, 1008) without the bias, torch-fidelity's IS input."""
        return features @ self.fc.weight.T

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images → (pool features, bias-free logits)."""
        feats = self.pool_features(x)
        return feats, self.logits_unbiased(feats)


# -------------------------------------------------------------------------------------------- inputs


def pytorch_fid_input(images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's preprocessing: float (N, 3, H, W) in [0, 1] → bilinear 299x299 in [-1, 1]."""
    if not images.is_floating_point():
        raise ValueError("pytorch_fid_input takes float images in [0, 1] (uint8 / 255, as ToTensor makes them)")
    x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x's ``resize_bilinear(align_corners=False)`` computes it.

    TF1 maps output pixel ``i`` to input coordinate ``i * in / out`` (no half-pixel offset) and clamps the
    upper neighbour at the border; the Inception graph was evaluated on images resized this way, which is
    why torch-fidelity reproduces it for IS (PyTorch's ``interpolate`` uses half-pixel centres).

    Args:
        images: Float tensor (N, C, H, W).
        size: Output side.
    """
    if not images.is_floating_point() or images.ndim != 4:
        raise ValueError(f"need a float (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")

    def grid(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=images.dtype, device=images.device) * torch.tensor(
            n_in / size, dtype=torch.float32
        )
        lo = pos.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, pos - lo.to(pos.dtype)

    y_lo, y_hi, dy = grid(images.shape[2])
    x_lo, x_hi, dx = grid(images.shape[3])
    top, bottom = images[:, :, y_lo, :], images[:, :, y_hi, :]
    top = top[:, :, :, x_lo] + (top[:, :, :, x_hi] - top[:, :, :, x_lo]) * dx.view(1, 1, 1, size)
    bottom = bottom[:, :, :, x_lo] + (bottom[:, :, :, x_hi] - bottom[:, :, :, x_lo]) * dx.view(1, 1, 1, size)
    return top + (bottom - top) * dy.view(1, 1, size, 1)


def torch_fidelity_input(images: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's preprocessing: uint8 (N, 3, H, W) → TF1-bilinear 299x299, ``(x - 128) / 128``."""
    if images.dtype != torch.uint8:
        raise ValueError(f"torch_fidelity_input takes uint8 images, got {images.dtype}")
    return (resize_bilinear_tf1(images.float(), INPUT_SIZE) - 128) / 128


# ------------------------------------------------------------------------------------------- weights


def default_weight_paths() -> list[Path]:
    """Where pytorch-fid and torch-fidelity cache the weights: ``torch.hub.get_dir()/checkpoints/<file>``."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    return [checkpoints / name for name in WEIGHT_FILES]


def _missing_message(looked: list[Path]) -> str:
    target = default_weight_paths()[0]
    return (
        "Inception-v3 weights for FID/IS not found (looked for "
        + ", ".join(str(p) for p in looked)
        + f"). Download\n  {FID_WEIGHTS_URL}\nand put it at\n  {target}\n(the torch hub cache, where pytorch-fid "
        "and torch-fidelity look too; TORCH_HOME moves it), or pass --inception-weights /path/to/that/file. "
        "torch-fidelity's copy of the same weights (weights-inception-2015-12-05-6726825d.pth) works as well."
    )


_WEIGHTS_HINT = (
    "give a state dict of tensors: the .pth that pytorch-fid or torch-fidelity downloads (torch.save of "
    "state_dict()), or a .safetensors file"
)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, read without ever running code from it.

    ``.pth`` files go through ``torch.load(weights_only=True)``, whose unpickler accepts tensors and plain
    containers only: a pickle that would call a function (``__reduce__`` to ``os.system``) is refused before
    anything runs.

    Raises:
        ValueError: The file is not a readable state dict (a pickle of other objects, a corrupt or foreign file).
        OSError: The file cannot be read.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, which would run the file's code: keep only its reason.
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "WeightsUnp")
        lines = [line.strip().rstrip(".") for line in str(err).splitlines() if line.strip()]
        reason = "; ".join(line for line in lines if not line.startswith(boilerplate)) or "not a plain state dict"
        raise ValueError(
            f"{path} holds pickled Python objects other than tensors, and bksdm never unpickles those (it could "
            f"run code; nothing was run): {reason}. {_WEIGHTS_HINT[0].upper()}{_WEIGHTS_HINT[1:]}"
        ) from None
    except Exception as err:  # torch and safetensors raise assorted types on a foreign or corrupt file
        raise ValueError(
            f"{path} cannot be read as a weight file ({type(err).__name__}: {err}); {_WEIGHTS_HINT}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (a mapping of tensors), got {type(state).__name__}")
    return state


def inception_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> InceptionV3:
    """Build the :class:`InceptionV3` a state dict fits (its width and classes read from the tensors) and load it.

    Raises:
        ValueError: The tensors are not an FID Inception-v3's (names or shapes differ).
    """
    try:
        width = state["Conv2d_1a_3x3.conv.weight"].shape[0] / 32
        num_classes = state["fc.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"{source} is not an FID Inception-v3 weight file (no {err} tensor)") from None
    model = InceptionV3(width=width, num_classes=num_classes)
    try:
        # strict: every layer must be filled. A file without BatchNorm's num_batches_tracked counters (older
        # torch) still loads: BatchNorm restores them itself.
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source} does not fit the FID Inception-v3: {err}") from None
    return model.eval().requires_grad_(False)


def load_inception(
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> InceptionV3:
    """The FID Inception-v3 with its weights, from an explicit file, the torch hub cache, or a download.

    Args:
        weights: A ``.pth``/``.pt`` state dict or ``.safetensors`` file. ``None``: the first of
            :func:`default_weight_paths` that exists, else a download of :data:`FID_WEIGHTS_URL` into the cache
            (hash-checked) when ``download`` is true.
        device: Where to put the network.
        download: May fetch the weights (set false, or ``HF_HUB_OFFLINE=1``, on an offline machine).

    Raises:
        InceptionWeightsNotFoundError: No file and no download; the message says what to fetch and where to put it.
        ValueError: The file is not an FID Inception-v3 state dict.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsNotFoundError(_missing_message([path]))
        state = _read_state_dict(path)
        source = str(path)
    else:
        found = [p for p in default_weight_paths() if p.is_file()]
        if found:
            state, source = _read_state_dict(found[0]), str(found[0])
        elif download and os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
            try:
                state = torch.hub.load_state_dict_from_url(
                    FID_WEIGHTS_URL, map_location="cpu", progress=True, check_hash=True, weights_only=True
                )
            except Exception as err:  # no network, HTTP errors, a bad hash: all mean "fetch it yourself"
                raise InceptionWeightsNotFoundError(
                    f"download failed ({err}). " + _missing_message(default_weight_paths())
                ) from err
            source = FID_WEIGHTS_URL
        else:
            raise InceptionWeightsNotFoundError(_missing_message(default_weight_paths()))
    return inception_from_state_dict(state, source).to(device)

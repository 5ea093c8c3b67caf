"""CPU kernels for training: float32 linear layers and frozen convolutions through oneDNN.

On the CPU, :func:`cpu_kernels` routes fp32 linear layers (forward and backward) and the frozen networks'
convolutions through oneDNN instead of PyTorch's defaults: the same products in another kernel, equal to float
rounding. On an AMD EPYC the default fp32 matrix products (MKL) ran at a third to a half of oneDNN's speed,
and every default convolution call re-packed its weights (200 ms for one 1280x1280 3x3 kernel), so the frozen
teacher and VAE pack theirs once, and a trained convolution with a large kernel and few output positions runs
as a matrix product over its unfolded input (no packing at all: the default kernels re-lay out such a weight
three times a step, for the forward, the input gradient and the weight gradient).

The one piece of module state is the memo of oneDNN-packed copies of frozen convolution weights (derived data,
dropped with the weight, rebuilt whenever the weight changes). Set ``BKSDM_ONEDNN=0`` to turn it all off.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["ONEDNN_ENV", "cpu_kernels", "kernel_checkpointing", "student_kernels"]


#: Set ``BKSDM_ONEDNN=0`` to run every layer with PyTorch's default CPU kernels (to compare, or to rule them out).
ONEDNN_ENV = "BKSDM_ONEDNN"


def _mkldnn_op(name: str) -> Any:
    try:
        return getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):  # a PyTorch built without oneDNN
        return None


_LINEAR = _mkldnn_op("_linear_pointwise")
_CONV = _mkldnn_op("_convolution_pointwise")


def _plain_fp32_cpu(*tensors: Tensor | None) -> bool:
    """Dense float32 CPU tensors (or None), no subclass (fake, functional, distributed tensors go the usual way)."""
    for t in tensors:
        if t is None:
            continue
        if type(t) not in (Tensor, nn.Parameter) or t.dtype != torch.float32 or t.device.type != "cpu":
            return False
        if t.layout != torch.strided or t.is_mkldnn:
            return False
    return True


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` by oneDNN's inner product; ``x`` (..., K), ``weight`` (N, K) -> (..., N)."""
    return _LINEAR(x.contiguous(), weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with its forward and both backward products in oneDNN (fp32 throughout)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1]).contiguous()  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _linear(grad2, weight.t(), None).reshape(x.shape)  # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = _linear(grad2.t().contiguous(), x.reshape(-1, x.shape[-1]).t(), None)  # (N, M) @ (M, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b


class _Im2colConv(torch.autograd.Function):
    """A trainable conv2d (groups 1) as one matrix product over unfolded input, forward and backward in oneDNN.

    Where the output has few positions for a large kernel (a U-Net's inner levels at batch 1), the default
    kernels spend most of their time re-laying out the weight (for the forward, again for the input gradient,
    and the weight gradient back); as a matrix product the weight is read where it lies, and nothing is packed.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, settings: tuple) -> Tensor:
        padding, stride, dilation = settings
        out_channels, kernel = weight.shape[0], tuple(weight.shape[-2:])
        cols = F.unfold(x, kernel, dilation, padding, stride)  # (N, C*kh*kw, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N*L, C*kh*kw)
        out = _linear(rows, weight.reshape(out_channels, -1), bias)  # (N*L, O)
        size = _output_size(x, weight, settings)
        ctx.save_for_backward(x, weight)
        ctx.settings, ctx.has_bias = settings, bias is not None
        return out.reshape(x.shape[0], *size, out_channels).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        padding, stride, dilation = ctx.settings
        out_channels, kernel = weight.shape[0], tuple(weight.shape[-2:])
        grad_rows = grad.permute(0, 2, 3, 1).reshape(-1, out_channels).contiguous()  # (N*L, O)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_cols = _linear(grad_rows, weight.reshape(out_channels, -1).t(), None)  # (N*L, C*kh*kw)
            grad_cols = grad_cols.reshape(x.shape[0], -1, grad_cols.shape[1]).transpose(1, 2)
            grad_x = F.fold(grad_cols, tuple(x.shape[-2:]), kernel, dilation, padding, stride)
        if ctx.needs_input_grad[1]:
            cols = F.unfold(x, kernel, dilation, padding, stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            grad_w = _linear(grad_rows.t().contiguous(), rows.t(), None).reshape(weight.shape)  # (O, N*L) @ (N*L, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b, None


#: The unfolded product pays (measured on a 2-core AMD EPYC, one thread, forward + backward) where a large
#: kernel meets few output positions: at most this many output rows (batch x height x width) ...
IM2COL_MAX_ROWS = 256
#: ... and at least this many kernel weights per output row (SD-v1.4's 1280-channel 3x3 at 8x8: 2.6x faster,
#: 640 at 16x16: 1.1x; 320 at 16x16 and anything at 32x32: slower).
IM2COL_MIN_WEIGHTS_PER_ROW = 10_000


def _output_size(x: Tensor, weight: Tensor, settings: tuple) -> list[int]:
    """Height and width of ``conv2d(x, weight)`` with ``settings`` = (padding, stride, dilation)."""
    padding, stride, dilation = settings
    return [
        (x.shape[i] + 2 * padding[i - 2] - dilation[i - 2] * (weight.shape[i] - 1) - 1) // stride[i - 2] + 1
        for i in (2, 3)
    ]


def _unfolds_well(x: Tensor, weight: Tensor, settings: tuple) -> bool:
    height, width = _output_size(x, weight, settings)
    rows = x.shape[0] * height * width
    return 0 < rows <= IM2COL_MAX_ROWS and weight.numel() >= IM2COL_MIN_WEIGHTS_PER_ROW * rows


# id(weight) -> (weak reference, version, data pointer, conv settings and input shape, packed weight)
_PACKED: dict[int, tuple[weakref.ref, int, int, tuple, Tensor]] = {}


def _packed_conv_weight(weight: Tensor, settings: tuple, input_size: tuple[int, ...]) -> Tensor:
    """The oneDNN layout of a frozen convolution weight, packed once per weight, version and input shape."""
    key = id(weight)
    stamp = (weight._version, weight.data_ptr(), (settings, input_size))
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1:4] == stamp:
        return entry[4]
    padding, stride, dilation, groups = settings
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.detach().to_mkldnn(), padding, stride, dilation, groups, list(input_size)
    )

    def forget(_ref: weakref.ref, key: int = key) -> None:
        current = _PACKED.get(key)
        if current is not None and current[0] is _ref:
            del _PACKED[key]

    _PACKED[key] = (weakref.ref(weight, forget), *stamp, packed)
    return packed


def _pair(value: Any) -> list[int] | None:
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    return None  # "same"/"valid" padding and anything unusual: PyTorch's own conv2d


def _conv2d(args: tuple, kwargs: dict) -> Tensor | None:
    """A float32 CPU conv2d through oneDNN, or None to leave it to PyTorch.

    Frozen (nothing needs a gradient) and the weight larger than one input: packed weights, cached. Training:
    a large kernel over few output positions as one unfolded matrix product (:class:`_Im2colConv`); the 1x1
    kernels, which PyTorch sends to its slow path for batch 1 on one thread; the others already go to oneDNN.
    """
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args, strict=False)) | kwargs
    x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
    stride, padding = _pair(bound.get("stride", 1)), _pair(bound.get("padding", 0))
    dilation, groups = _pair(bound.get("dilation", 1)), bound.get("groups", 1)
    if stride is None or padding is None or dilation is None or not isinstance(groups, int):
        return None
    if not _plain_fp32_cpu(x, weight, bias) or x.dim() != 4 or x.numel() == 0:
        return None
    frozen = not any(t is not None and t.requires_grad for t in (x, weight, bias)) or not torch.is_grad_enabled()
    if frozen and weight.numel() > x[0].numel():
        # Packing pays where the weight outweighs the activation (U-Net blocks); where the activation is the
        # larger (the VAE's first blocks), oneDNN's copies of it in and out cost more than the packing saves.
        packed = _packed_conv_weight(weight, (padding, stride, dilation, groups), tuple(x.shape))
        return _CONV(x.contiguous(), packed, bias, padding, stride, dilation, groups, "none", [], "")
    if groups == 1 and not frozen and _unfolds_well(x, weight, (padding, stride, dilation)):
        return _Im2colConv.apply(x, weight, bias, (padding, stride, dilation))
    if weight.shape[-2:] == (1, 1) and groups == 1:
        return torch.mkldnn_convolution(x.contiguous(), weight, bias, padding, stride, dilation, groups)
    return None


class _OneDNNMode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_autocast_enabled("cpu"):
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _plain_fp32_cpu(x, weight, bias) and x.dim() >= 2 and x.numel() > 0:
                if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
                    return _OneDNNLinear.apply(x, weight, bias)
                return _linear(x, weight, bias)
        elif func is F.conv2d and _CONV is not None and not torch.is_autocast_enabled("cpu"):
            out = _conv2d(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_kernels(device: torch.device | str = "cpu") -> Iterator[None]:
    """Within the block, float32 CPU linear layers and convolutions run on oneDNN kernels (see the module notes).

    Linear layers: forward and backward (:class:`_OneDNNLinear`). Convolutions that need no gradient (the
    frozen teacher and VAE): oneDNN with weights packed once. Trainable convolutions with a large kernel and
    few output positions: an unfolded matrix product on oneDNN. Trainable 1x1 convolutions: oneDNN. Everything
    else, other dtypes and devices, autocast regions, and all layers when ``BKSDM_ONEDNN=0`` or PyTorch lacks
    oneDNN: PyTorch's own kernels. Equal to the default kernels to float rounding; deterministic.

    Args:
        device: Where the computation runs; on any other device than the CPU this does nothing (no per-call
            Python overhead on a GPU).
    """
    off = os.environ.get(ONEDNN_ENV, "1") == "0" or _LINEAR is None or not torch.backends.mkldnn.is_available()
    if off or torch.device(device).type != "cpu":
        yield
        return
    with _OneDNNMode():
        yield


def kernel_checkpointing(device: torch.device | str = "cpu") -> Callable[..., Any]:
    """A gradient-checkpointing function for diffusers' ``enable_gradient_checkpointing`` that runs the checkpointed
    blocks inside :func:`cpu_kernels`, in the forward and in the backward's recomputation alike.

    torch's checkpoint requires the recomputation to save the same tensors as the forward, so a block that ran the
    kernels must be recomputed with them; the default checkpointing function recomputes outside any such block, and
    a checkpointed student then had to run PyTorch's kernels throughout (``kd_step``).
    """

    def checkpoint(module: Callable[..., Any], *args: Any) -> Any:
        contexts = lambda: (cpu_kernels(device), cpu_kernels(device))  # noqa: E731 (forward, recomputation)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)

    checkpoint.runs_cpu_kernels = True  # type: ignore[attr-defined]
    return checkpoint


def student_kernels(model: nn.Module, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The kernels a trained model's forward may run: :func:`cpu_kernels`, unless the model is checkpointed by
    another function than :func:`kernel_checkpointing` (its backward would recompute its blocks on other kernels than
    the forward's, and torch's checkpoint would see other saved tensors); then PyTorch's own."""
    if not getattr(model, "is_gradient_checkpointing", False):  # the common case: no walk over the modules
        return cpu_kernels(device)
    functions = {getattr(m, "_gradient_checkpointing_func", None) for m in model.modules()}
    ours = any(getattr(f, "runs_cpu_kernels", False) for f in functions)
    return cpu_kernels(device) if ours else contextlib.nullcontext()

"""Sharded training: the student's parameters, gradients, optimizer state and EMA split across processes (FSDP2).

``train.sharding: fsdp`` with several processes (``accelerate launch --multi_gpu --num_processes N``, on GPUs or on
CPUs with gloo) applies PyTorch's ``fully_shard`` to every block of the student's top-level block lists (a U-Net's
down and up blocks, SD3's and FLUX's transformer blocks) and then to the student itself. Each process then holds
1/N of every parameter, of its gradient, of AdamW's two moments and of the EMA copy; a block's full weights exist
only while it runs. That is most of the memory of training a large student: for a 3B student in fp32, weights,
gradients, moments and EMA are 5 x 12 GB; with 8 processes 7.5 GB each. The frozen teacher is sharded the same
way (a 12B FLUX.1 teacher in bf16: 24 GB, 3 GB a process with 8), and validation grids are drawn by every process
together (the main one writes them).

What leaves the run is unchanged: checkpoints and the final pipeline hold whole tensors in the same files as an
unsharded run's (a sharded run resumes unsharded and the other way round). Gathering is collective: every process
calls the functions here that gather, the main process writes. Pure tensor plumbing; no files.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "full",
    "full_state",
    "is_sharded",
    "placed_like",
    "plain_model",
    "shard_model",
    "shard_units",
    "wants_sharding",
]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a PyTorch built without distributed support
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The units ``fully_shard`` is applied to, innermost first: every block of the model's top-level
    ``nn.ModuleList`` children, then the model (its embeddings, mid block and output layers)."""
    blocks = [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]
    return [*blocks, model]


def wants_sharding(setting: str, processes: int, mixed_precision: str, eight_bit_adam: bool) -> bool:
    """Whether the run shards its student (``train.sharding``); checks the settings first.

    Raises:
        ValueError: a setting sharding cannot take (fp16, 8-bit AdamW).
    """
    if setting != "fsdp":
        return False
    if processes < 2:
        warnings.warn("train.sharding=fsdp with one process: nothing to shard; training unsharded", stacklevel=2)
        return False
    if mixed_precision == "fp16":
        raise ValueError(
            "train.sharding=fsdp trains in fp32 or bf16 (train.mixed_precision=bf16), not fp16 (no loss scaling)"
        )
    if eight_bit_adam:
        raise ValueError(
            "optim.use_8bit_adam does not take sharded parameters; with train.sharding=fsdp AdamW's fp32 state is "
            "split across the processes instead: set optim.use_8bit_adam=false"
        )
    return True


def shard_model(model: nn.Module, device: torch.device, *, bf16: bool = False) -> int:
    """Shards ``model`` in place across the processes of the default process group; returns the unit count.

    Call it after the model is on its device and, for the student, before its optimizer and EMA are made (they
    take the shards).
    With ``bf16`` the gathered weights and the computation are bf16 (the shards, the optimizer and the gradient
    reduction stay fp32): FSDP's mixed precision, in place of autocast.

    Raises:
        ValueError: no process group (one process), or a PyTorch without FSDP2.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("train.sharding=fsdp needs several processes (accelerate launch --num_processes N)")
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as err:
        raise ValueError(f"train.sharding=fsdp needs PyTorch's FSDP2 (torch>=2.6): {err}") from err
    # diffusers' blocks return views of one tensor (FLUX's and SD3's streams); FSDP2 warns that an in-place op on
    # them would skip its hooks. None follows in these models: the sharded steps equal the unsharded ones
    # (tests/train/test_sharding.py, FLUX, SD3.5, U-Net), so the warning, repeated by every process, is dropped.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = shard_units(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    for unit in units:
        fully_shard(unit, mesh=mesh, **({"mp_policy": policy} if policy else {}))
    return len(units)


def is_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of the tensors is a shard (a DTensor)."""
    return _DTENSOR is not None and any(isinstance(t, _DTENSOR) for t in tensors)


def full(tensor: Tensor, keep: bool = True) -> Tensor:
    """The whole tensor of a shard, in host memory (collective: every process must call it), or the tensor itself.

    ``keep=False`` (the processes that write nothing): take part in the gathering and drop the result at once
    (an empty tensor is returned), so that only the writing process holds a whole copy, one tensor at a time on
    the device.
    """
    if _DTENSOR is not None and isinstance(tensor, _DTENSOR):
        whole = tensor.full_tensor()
        return whole.cpu() if keep else torch.empty(0)
    return tensor


def full_state(module: nn.Module, keep: bool = True) -> dict[str, Tensor]:
    """``module.state_dict()`` with whole tensors, detached (collective when sharded, see :func:`full`; references
    to the module's own tensors when not)."""
    return {name: full(value, keep).detach() for name, value in module.state_dict().items()}


def placed_like(reference: Tensor, value: Tensor) -> Tensor:
    """``value`` (a whole tensor, the same on every process) placed as ``reference`` is: this process's shard
    where ``reference`` is a shard (no communication), else ``value`` itself."""
    if _DTENSOR is not None and isinstance(reference, _DTENSOR):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=reference.device, dtype=reference.dtype)
        return distribute_tensor(value, reference.device_mesh, reference.placements, src_data_rank=None)
    return value


def plain_model(model: nn.Module, tensors: Mapping[str, Tensor], model_class: type) -> nn.Module:
    """An unsharded ``model_class`` model of ``model``'s config holding ``tensors`` (not copies of them): what the
    main process validates and saves. ``model`` itself where nothing is sharded and the tensors are its own."""
    own = model.state_dict()
    unsharded = not is_sharded(own.values()) and own.keys() == tensors.keys()  # (shards have no data to compare)
    if unsharded and all(tensors[k].data_ptr() == own[k].data_ptr() for k in own):  # its own tensors: no new model
        return model
    with torch.device("meta"):
        plain = model_class.from_config(model.config)
    plain.load_state_dict(dict(tensors), strict=True, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers are in no state dict: shared as they are
        if name not in tensors:
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(attr, buffer, persistent=False)
    return plain.train(model.training)

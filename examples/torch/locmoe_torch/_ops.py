"""Loads locmoe's operators (_locmoe_ops.so, built by CMake next to this file) into torch.ops.locmoe."""
import operator
import os

import torch

_LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_locmoe_ops.so")
if not os.path.exists(_LIBRARY):
    raise ImportError(
        f"locmoe_torch: {_LIBRARY} is missing; build the project with LOCMOE_TORCH=ON (or AUTO with Debian's "
        "libtorch-dev installed) and import locmoe_torch from <build>/python")
torch.ops.load_library(_LIBRARY)
ops = torch.ops.locmoe

ROW_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_matrix(name, tensor, rows=None, cols=None, dtypes=ROW_DTYPES):
    """Raises TypeError/ValueError naming `name` unless tensor is a 2-D CPU tensor of one of dtypes (and shape)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(tensor).__name__})")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (got {tensor.device}); this build of locmoe_torch has no CUDA")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (got shape {tuple(tensor.shape)})")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]} (got {tensor.dtype})")
    if rows is not None and tensor.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (got shape {tuple(tensor.shape)})")
    if cols is not None and tensor.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns (got shape {tuple(tensor.shape)})")


def check_int(name, value, low=None, high=None):
    """Returns value as an int, or raises naming `name` (a 0-d integer tensor is accepted, as Megatron passes)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise TypeError(f"{name} must be an integer (got a tensor of shape {tuple(value.shape)}, {value.dtype})")
        value = int(value.item())
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer (got bool)")
    try:
        value = operator.index(value)  # int, numpy integers
    except TypeError:
        raise TypeError(f"{name} must be an integer (got {type(value).__name__})") from None
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low} (got {value})")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high} (got {value})")
    return value

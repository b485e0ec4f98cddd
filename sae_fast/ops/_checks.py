"""Argument checks shared by the ops: clear errors naming the argument, expected and actual."""

import numbers
import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def integer(value):
    """``value`` as a Python int when it is an integer (numpy integers included; bool and
    tensors not), else None: ``np.int64(64)`` from a config array is a fine block size."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral):
        return None
    return operator.index(value)


def real(value):
    """``value`` as a Python float when it is a real number (numpy scalars included; bool and
    tensors not), else None."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_tensor(op: str, name: str, t, *, dim: int = None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {t.dtype}")


def check_same_device(op: str, **tensors):
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")


def check_same_dtype(op: str, **tensors):
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; cast one of them")


def check_index_range(op: str, name: str, indices: torch.Tensor, upper: int):
    """IndexError unless every entry is in [0, upper). Synchronises with the device once."""
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{op}: {name} must lie in [0, {upper}), found {bad}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 data; fp64 stays fp64 (tests and gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_encoder_inputs(op: str, x, W_enc, b_enc, b_dec):
    """The encoders' shared contract: x [N, d] float, W_enc [M, d] (any strides), b_enc [M] or
    None, b_dec [d] or None, one device and dtype. Returns (N, d, M)."""
    check_tensor(op, "x", x, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "W_enc", W_enc, dim=2)
    n, d = x.shape
    m = W_enc.shape[0]
    if W_enc.shape[1] != d:
        raise ValueError(f"{op}: W_enc must be [M, {d}] to match x {tuple(x.shape)}, got {tuple(W_enc.shape)}")
    if b_enc is not None:
        check_tensor(op, "b_enc", b_enc, dim=1)
        if b_enc.shape[0] != m:
            raise ValueError(f"{op}: b_enc must be [{m}], got {tuple(b_enc.shape)}")
    if b_dec is not None:
        check_tensor(op, "b_dec", b_dec, dim=1)
        if b_dec.shape[0] != d:
            raise ValueError(f"{op}: b_dec must be [{d}] to be subtracted from x, got {tuple(b_dec.shape)}")
    check_same_device(op, x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)
    check_same_dtype(op, x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)
    return n, d, m

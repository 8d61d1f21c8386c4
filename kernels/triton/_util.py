"""Shared helpers for the Triton kernels: interpreter detection, dot dtypes, tuned launches.

Every kernel here runs on an NVIDIA GPU and under `TRITON_INTERPRET=1` on CPU tensors, where
CI checks its numerics. Two differences between the two matter to the wrappers:
  - the interpreter's `tl.dot` multiplies bf16 operands as their raw 16-bit patterns, so dot
    operands are widened to f32 there (`dot_dtype`);
  - autotuning times kernels with CUDA events, so the interpreter launches one fixed config.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# triton.jit decides at decoration time whether a kernel is interpreted, so the wrappers decide
# from the same moment: TRITON_INTERPRET as it was when these modules were imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off")


def interpreting() -> bool:
    """True when the kernels run under the interpreter (on CPU tensors)."""
    return _INTERPRET


def dot_dtype(dtype: torch.dtype):
    """The element type tl.dot operands are cast to: the 16-bit input type on a GPU (tensor cores,
    f32 accumulation); f32 when the input is f32, or bf16 under the interpreter."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL.get(dtype, tl.float32)


def check_float(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in _TL:
            raise TypeError(f"expected an f32, f16 or bf16 tensor, got {t.dtype}")


# When a list, launches are recorded here instead of run (see _aot.py: compiling every kernel
# configuration for a GPU on a machine without one).
RECORD: list | None = None


def launch(kernel, grid, args: tuple, config: dict, *, tuned=None, **constexprs):
    """Launch `kernel` with `config` (block sizes plus num_warps/num_stages), or, on a GPU, the
    autotuned `tuned` version of it when there is one (ISTHMUS_TRITON_AUTOTUNE=0 turns tuning off).

    `grid` is a tuple, or a callable of the meta-parameters as triton expects.
    """
    if RECORD is not None:
        RECORD.append((kernel, tuned, args, dict(config), dict(constexprs)))
        return
    if tuned is None or interpreting() or os.environ.get("ISTHMUS_TRITON_AUTOTUNE", "1") == "0":
        kernel[grid(config) if callable(grid) else grid](*args, **constexprs, **config)
    else:
        tuned[grid](*args, **constexprs)


def row_warps(block: int, elem_bytes: int = 2) -> int:
    """num_warps for a kernel that holds one row of `block` elements: about 16 bytes per thread-load."""
    return int(min(16, max(1, block * elem_bytes // (32 * 16 * 2))))


def programs_per_device(device, num_warps: int) -> int:
    """A persistent grid: as many programs of `num_warps` warps as the SMs hold at once (64 warps each)."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return sms * max(1, 64 // num_warps)


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))

"""Where a run computes: bfloat16 autocast where the device has it natively, and how many CPU threads."""

from __future__ import annotations

import torch

SMALL_INPUT_SIDE = 16  # inputs no larger (the 8x8 digits) make layers too small to share or to cast


def is_small_input(height: int, width: int) -> bool:
    return max(height, width) <= SMALL_INPUT_SIDE


def default_bf16(device: torch.device, height: int, width: int) -> bool:
    """bfloat16 autocast where the device computes it natively and the input is not small."""
    return native_bfloat16(device) and not is_small_input(height, width)


def native_bfloat16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 in hardware. There autocast makes a step faster (1.7x on
    AMX cores for the Fashion-MNIST model); elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # torch.cpu's probes are private but stable since 2.1; they read CPUID as oneDNN does.
    if device.type != "cpu":
        return False
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def training_threads(requested: int, height: int, width: int, default: int) -> int:
    """`requested` if given; else 1 for inputs of 16x16 or less: a tiny model's layers are too small to
    share, the second thread only waits, and on a busy machine it made 8x8 digits five times slower."""
    if requested > 0:
        return requested
    return 1 if is_small_input(height, width) else default

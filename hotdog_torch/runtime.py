"""Where this process trains: the device a config asks for, and what it used."""

from __future__ import annotations

import torch

from .config import UserError


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N as a device; CUDA asked for but absent is the user's mistake, said in one sentence."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"device {name} was asked for, but this machine has no usable CUDA GPU; use device=cpu or device=auto"
            )
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return torch.device(name)


def use_tf32(device: torch.device) -> None:
    """TF32 for whatever runs in fp32 on a CUDA GPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on CUDA; the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

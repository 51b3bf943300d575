"""Where this process trains: the device a config asks for, and what it used."""

from __future__ import annotations

import functools
import os
import time

import torch

from .config import UserError

DEFAULT_THREADS = torch.get_num_threads()  # torch's intra-op threads for this process, before any run changed them
SMALL_PRODUCT = 1 << 21  # multiply-adds of a layer's product in one step, below which one thread is faster


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


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done: CUDA runs kernels asynchronously, so a clock
    read without waiting would time their launches, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on CUDA; the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def set_up_cpu(device: torch.device, flush: str | bool, widths: list[int], batch_size: int) -> None:
    """The CPU threads of a training run: how many (intra_op_threads), and subnormals flushed in each."""
    intra_op_threads(device, widths, batch_size)
    flush_denormal(flush, device)


def intra_op_threads(device: torch.device, widths: list[int], batch_size: int) -> int:
    """One intra-op thread for a network whose every layer's product in a step (batch x inputs x outputs) is below
    SMALL_PRODUCT multiply-adds, else torch's default; OMP_NUM_THREADS, when set, decides.  At such sizes threads
    add only their barriers, which cost milliseconds when other processes hold the cores (docs/speed.md)."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        largest = max(batch_size * n_in * n_out for n_in, n_out in zip(widths, widths[1:], strict=False))
        torch.set_num_threads(1 if largest < SMALL_PRODUCT else DEFAULT_THREADS)
    return torch.get_num_threads()


def flush_denormal(setting: str | bool, device: torch.device) -> bool:
    """Flush subnormal floats to zero (FTZ + DAZ) in this thread and in every intra-op thread; returns whether on.

    setting is train.flush_denormal: auto = on for CPU runs.  torch.set_flush_denormal changes only the calling
    thread's MXCSR; OpenMP's worker threads, once started, keep their own (half of a parallel product would still
    be subnormal), so the call is repeated inside one OpenMP parallel region, on every thread of the team.  Threads
    started later (a larger team, the app's worker threads) copy the flag from the thread that starts them.
    """
    on = device.type == "cpu" if setting == "auto" else bool(setting)
    if not torch.set_flush_denormal(on):  # a CPU without FTZ/DAZ (not x86 with SSE3): nothing to flush
        return False
    _on_every_omp_thread(lambda: torch.set_flush_denormal(on))
    return on


def flushing() -> bool:
    """Are subnormal floats flushed in this thread now?  (1e-40, subnormal in fp32, reads as 0 under FTZ/DAZ.)"""
    return float(torch.tensor([1e-40]) * 1.0) == 0.0


def keeps_float_mode(fn):
    """fn, leaving the caller's arithmetic as it was before it: subnormals flushed or not (in this thread and torch's
    OpenMP team) and the number of intra-op threads.  A run called in-process (the lessons, a notebook, the tests)
    must not change what comes after it."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        flushed, threads = flushing(), torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if flushing() != flushed:
                flush_denormal(flushed, torch.device("cpu"))

    return wrapped


def flush_denormal_as_trained(config: dict) -> bool:
    """For a trained network used on the CPU (evaluate, predict, the app): its run's train.flush_denormal."""
    return flush_denormal(config.get("train", {}).get("flush_denormal", "auto"), torch.device("cpu"))


def _on_every_omp_thread(fn) -> None:
    """Call fn() once on each thread of torch's OpenMP team (libgomp's GOMP_parallel, through ctypes)."""
    import ctypes
    from pathlib import Path

    libs = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    try:
        gomp = ctypes.CDLL(str(libs[0]) if libs else "libgomp.so.1")
    except OSError:
        return  # torch built without libgomp (another OpenMP, or none): nothing more to reach
    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: fn())
    gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    gomp.GOMP_parallel(ctypes.cast(callback, ctypes.c_void_p), None, torch.get_num_threads(), 0)


def native_bf16() -> bool:
    """Does this CPU compute bf16 products natively (AVX-512 BF16 or AMX)?  Elsewhere torch emulates them, and a
    bf16 product is slower than fp32's."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def precision(setting: str, device: torch.device, fused: bool = True) -> str:
    """train.precision, auto resolved: bf16 for the fused step on a CPU that computes bf16 natively, fp32 elsewhere.
    On CUDA auto keeps the fused step in fp32 (TF32 products) until a GPU has measured bf16 beside it; the autograd
    step keeps fp32 too, since autocast would round its last sigmoid to bf16 before the cost."""
    if setting != "auto":
        return setting
    return "bf16" if fused and device.type == "cpu" and native_bf16() else "fp32"


def matmuls(setting: str, device: torch.device, fused: bool = True) -> str:
    """What the matmuls run in, for the step line: bf16, TF32 (fp32 on a CUDA GPU that allows it), or fp32."""
    p = precision(setting, device, fused)
    return "tf32" if p == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else p

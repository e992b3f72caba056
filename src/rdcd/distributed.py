"""The few distributed helpers rdcd needs, over torch.distributed (torchrun sets the environment).

One process without torchrun needs no process group: every helper degrades to the identity, and
torch is imported only where a process group or a device is really needed (importing it takes
seconds, more than ``rdcd extract`` of an image with the shipped int8 file takes in all).
Backend: NCCL when CUDA is available, gloo otherwise.
"""
from __future__ import annotations

import os
import sys

#: device files of the GPU drivers PyTorch can use on Linux (NVIDIA, AMD ROCm, WSL2's GPU bridge)
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> bool:
    """Initialise the process group when started by torchrun; returns whether one is active."""
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported: no process group can exist
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    if not is_distributed():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    if not is_distributed():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def gpu_available() -> bool:
    """Whether PyTorch can use a GPU (``torch.cuda.is_available()``). On Linux without any GPU
    driver's device file the answer is no without importing torch."""
    if sys.platform.startswith("linux") and not any(os.path.exists(f) for f in GPU_DEVICE_FILES):
        return False
    import torch

    return torch.cuda.is_available()


def default_device():
    """This rank's GPU if there is one, else the CPU (a ``torch.device``)."""
    import torch

    return torch.device("cuda", local_rank()) if gpu_available() else torch.device("cpu")


def cpu_threads_per_process() -> int:
    """CPU cores this process may use: the machine's share for each local rank."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size()))


def concat_all_gather(tensor):
    """All-gather a tensor along dim 0 from every process (no gradient), as MoCo does for its keys."""
    if not is_distributed():
        return tensor
    import torch

    with torch.no_grad():
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)


def gather_objects_to_main(obj) -> list | None:
    """Collect one picklable object per rank on rank 0 (others get None)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj):
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj) -> list:
    """One picklable object from every rank, on every rank."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out

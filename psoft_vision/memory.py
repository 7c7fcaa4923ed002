"""Peak memory of a stretch of work: the CUDA allocator's peak on a GPU, the process's peak resident set on a CPU.

    reset_peak_memory(device)
    ...  # the work
    peak_memory_mib(device)
"""

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak from now."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: resets VmHWM, the peak resident set
            f.write("5")


def peak_memory_mib(device: torch.device) -> float:
    """The peak since the last reset, in MiB: allocated tensors on CUDA, the whole process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) / 1024

"""Peak memory of the current process, recorded beside the wall times (train_summary.json, the post-hoc fit's
posterior/METHOD.json, eval/.../metrics.json) so that `uqlora benchmark` can report each method's memory cost.

CUDA: `torch.cuda.max_memory_allocated` of the device since the last `reset_peak_memory` (tensors only, not the
caching allocator's reserve). CPU: the peak resident set size of the whole process since it started
(`resource.getrusage`), which cannot be reset: it includes loading the model and, when several commands run in
one Python process, the largest of them so far. `uqlora benchmark` runs every cell in its own process.
"""

from __future__ import annotations

import resource
import sys

import torch

# ru_maxrss is in kilobytes on Linux and in bytes on macOS
_RSS_UNIT = 1 if sys.platform == "darwin" else 1024


def reset_peak_memory(device) -> None:
    """Start a fresh CUDA peak for `device` (a torch.device or string); nothing to do on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """{"peak_memory_bytes", "peak_memory_measure"} for the work done on `device` (see the module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_measure": "cuda_max_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT
    return {"peak_memory_bytes": int(rss), "peak_memory_measure": "process_max_rss"}

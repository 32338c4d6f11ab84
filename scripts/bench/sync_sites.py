"""Where a training step makes the host wait for the GPU: runs the step once under
`torch.cuda.set_sync_debug_mode("warn")` and counts the Python call sites of every synchronising
operation (`.item()`, `.tolist()`, `.cpu()`, `nonzero`, ...). Each one stalls the host until the
GPU catches up, leaving the GPU idle while the host then issues the next kernels.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections import Counter
from collections.abc import Callable

import torch

# Frames inside these packages are the machinery, not the call site worth naming.
MACHINERY = (os.sep + "torch" + os.sep, os.sep + "warnings.py", os.sep + "sync_sites.py")


def call_site(stack: list[traceback.FrameSummary], context: int = 2) -> str:
    """The innermost frame outside torch's own code, with up to `context` callers above it."""
    outside = [frame for frame in stack if not any(part in frame.filename for part in MACHINERY)]
    if not outside:
        return "(inside torch)"
    frames = outside[-1 - context :][::-1]
    return " <- ".join(f"{short_path(f.filename)}:{f.lineno} {f.name}" for f in frames)


def short_path(filename: str) -> str:
    """A path from the package root (site-packages/..., or the repository's own files)."""
    for marker in ("site-packages" + os.sep, "gpu-site" + os.sep, "dist-packages" + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return os.path.relpath(filename)


def synchronising_call_sites(step: Callable[[], None]) -> Counter[str]:
    """Run `step` once with CUDA sync debugging on; count the call sites that synchronised.
    Operations issued from autograd's backward thread outside a Python frame are not seen."""
    sites: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):
            sites[call_site(traceback.extract_stack()[:-1])] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sites


def sites_markdown(sites: Counter[str], top: int = 20) -> str:
    """The `top` call sites as a markdown table, most frequent first."""
    lines = [
        f"host synchronisations in one step: {sum(sites.values())} at {len(sites)} call sites",
        "| per step | call site <- callers |",
        "|---|---|",
    ]
    lines += [f"| {count} | `{site}` |" for site, count in sites.most_common(top)]
    return "\n".join(lines)

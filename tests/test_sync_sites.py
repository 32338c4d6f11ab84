"""scripts/bench/sync_sites.py on CPU: a step's synchronising operations, as torch reports them
under CUDA sync debugging (a warning per operation), are counted by their call site outside
torch, most frequent first (the real run needs a GPU: `bench_vs_hf.py --sync-sites`)."""

from __future__ import annotations

import re
import warnings

import torch

from scripts.bench import sync_sites

TORCH_MESSAGE = "called a synchronizing CUDA operation"


def read_loss_on_the_host():
    warnings.warn(TORCH_MESSAGE, UserWarning, stacklevel=1)


def step():
    for _ in range(3):
        read_loss_on_the_host()
    warnings.warn("an unrelated warning", UserWarning, stacklevel=1)


def test_each_synchronising_call_site_is_counted(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    sites = sync_sites.synchronising_call_sites(step)
    assert modes == ["warn", "default"]
    ((site, count),) = sites.items()
    assert count == 3
    # The innermost frame outside torch and this tool, then two callers.
    here = r"tests/test_sync_sites\.py:\d+"
    pattern = rf"{here} read_loss_on_the_host <- {here} step <- {here} test_each_\w+"
    assert re.fullmatch(pattern, site), site


def test_markdown_lists_the_sites_most_frequent_first():
    sites = sync_sites.Counter({"a.py:1 f": 2, "b.py:7 g": 5})
    text = sync_sites.sites_markdown(sites)
    assert text.splitlines()[0] == "host synchronisations in one step: 7 at 2 call sites"
    assert text.splitlines()[3:] == ["| 5 | `b.py:7 g` |", "| 2 | `a.py:1 f` |"]

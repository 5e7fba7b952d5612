"""The CLI's process setup: huge pages for torch's large CPU tensors (pipelines/cli.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in a fresh interpreter (torch not imported yet, as in the `tablezip` console script), then
# fills a fresh 64 MiB tensor and counts the page faults: 16,384 on 4 KiB pages, a few hundred
# when c10 madvised it for huge pages.
PROBE = """
import resource, sys
from tablezip.pipelines.cli import HUGE_PAGES_ENV, use_huge_pages
on = use_huge_pages(sys.argv[1])
import os, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 << 20)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(on, os.environ.get(HUGE_PAGES_ENV), faults < 4096)
"""
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="the kernel has transparent huge pages off")


def probe(command: str, preset: str | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    out = subprocess.run([sys.executable, "-c", PROBE, command], env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


@needs_thp
@pytest.mark.parametrize("command", ["train", "sweep", "prepare", "plan"])
def test_batch_commands_turn_huge_pages_on_before_torch_allocates(command):
    assert probe(command) == ["True", "1", "True"]


@needs_thp
def test_serve_leaves_them_off():
    assert probe("serve") == ["False", "None", "False"]


def test_a_value_the_user_set_wins():
    assert probe("train", preset="0")[:2] == ["False", "0"]


def test_nothing_changes_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401  (imported by the test session already; the switch would be ignored)

    from tablezip.pipelines.cli import use_huge_pages

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert use_huge_pages("train") is False
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ

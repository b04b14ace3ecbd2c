"""minigpt.allocator: freed memory stays in the process, so a step's tensors do not fault their pages in again."""

import platform
import subprocess
import sys

import pytest

from minigpt.allocator import keep_freed_memory

ROUNDS = """
import resource, sys, torch
from minigpt.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None


def step():  # allocates, writes and frees large tensors, as a training step does
    small, large = torch.ones(2**22), torch.ones(2**24)  # 16 and 64 MiB (glibc maps the 64 always)
    return (small.sum() + large.sum()).item()


for _ in range(20):  # the heap settles into the steps' pattern
    step()
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median round: now and then the heap still grows by a block (the freed space split so that the large
# tensor does not fit), a one-time cost that can land in any round; the steady state is what a step pays.
print(applied, sorted(faults)[len(faults) // 2])
"""


def faults_per_round(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    applied, kept = faults_per_round("keep")
    _, default = faults_per_round("default")
    assert applied == "True"
    assert default > 0  # glibc's defaults hand the block back: every round faults its pages in again
    assert kept * 10 <= default


@pytest.mark.skipif(platform.libc_ver()[0] == "glibc", reason="another C library than glibc")
def test_other_c_libraries_are_left_alone():
    assert keep_freed_memory() is False

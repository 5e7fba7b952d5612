"""The shared mode switch of the optional Triton kernels (compress/kernel_switch.py)."""
import pytest
import torch

from tablezip.compress import fused_ids, fused_lookup
from tablezip.compress.kernel_switch import KernelSwitch


def test_mode_is_restored_even_when_the_block_raises():
    switch = KernelSwitch()
    with pytest.raises(RuntimeError):
        with switch.mode("off"):
            assert switch.value == "off"
            raise RuntimeError("boom")
    assert switch.value == "auto"


def test_unknown_mode_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"mode must be one of \['auto', 'on', 'off'\], got 'gpu'"):
        with KernelSwitch().mode("gpu"):
            pass


def test_off_and_auto_on_cpu_never_want_the_kernel():
    switch, ids = KernelSwitch(), torch.arange(4)
    assert not switch.wants_kernel(ids)  # auto: CPU tensors take the reference path
    with switch.mode("off"):
        assert not switch.wants_kernel(ids)


def test_each_kernel_family_has_its_own_switch():
    with fused_ids.mode("off"):
        assert fused_ids.current_mode() == "off"
        assert fused_lookup.current_mode() == "auto"


def test_a_switch_can_start_off_and_be_set_for_the_process():
    switch = KernelSwitch(default="off")
    assert not switch.wants_kernel(torch.arange(4))
    switch.set("auto")
    assert switch.value == "auto"
    with switch.mode("off"):
        assert switch.value == "off"
    assert switch.value == "auto"
    with pytest.raises(ValueError, match="mode must be one of"):
        switch.set("gpu")
    with pytest.raises(ValueError, match="mode must be one of"):
        KernelSwitch(default="fast")

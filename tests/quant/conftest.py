"""Fixtures for the quantization tests (helpers live in quant_helpers.py)."""

from __future__ import annotations

import pytest
import torch

from quant_helpers import HandCount, ManySites


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hand_model():
    torch.manual_seed(0)
    return HandCount().eval()


@pytest.fixture
def many_sites():
    torch.manual_seed(0)
    return ManySites().eval()

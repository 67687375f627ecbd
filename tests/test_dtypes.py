"""The one map from precision names to torch dtypes (orw_diffusers/dtypes.py)."""

from __future__ import annotations

import pytest
import torch

from orw_diffusers.dtypes import DTYPE_NAMES, MIXED_PRECISIONS, named_dtype, precision_dtype, precision_name
from orw_diffusers.errors import ConfigError


def test_each_precision_maps_to_its_dtype_and_back():
    expected = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert {p: precision_dtype(p) for p in MIXED_PRECISIONS} == expected
    assert {precision_name(d): p for p, d in expected.items()} == {p: p for p in expected}
    assert precision_name(torch.float64) == "torch.float64"


def test_named_dtype_takes_torch_names_and_dtypes():
    assert [named_dtype(n) for n in DTYPE_NAMES] == [torch.float32, torch.float16, torch.bfloat16]
    assert named_dtype(torch.bfloat16) is torch.bfloat16


@pytest.mark.parametrize("bad", ["fp16", "half", torch.float64])
def test_named_dtype_refuses_other_names(bad):
    with pytest.raises(ValueError, match=r"is not one of float32, float16, bfloat16"):
        named_dtype(bad)


def test_precision_dtype_refuses_a_torch_name_in_one_line():
    with pytest.raises(ConfigError, match=r"^mixed_precision: 'float16' is not one of no, fp16, bf16$"):
        precision_dtype("float16")

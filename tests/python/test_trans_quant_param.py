"""npu_trans_quant_param's bit patterns: (bits(scale) & 0xFFFFE000) | 1 << 46,
the 13 low mantissa bits truncated (not rounded), the fp32 pattern
zero-extended, and an optional offset rounded half to even, clamped to
[-256, 255] and kept in bits 37..45. The expected values are literals, worked
out from torch_npu's definition, not recomputed with the formula under test."""
import math

import pytest
import torch

import tpfuse

SCALES = [
    # (scale, packed)
    (1.0, 0x0000_4000_3F80_0000),
    (0.1, 0x0000_4000_3DCC_C000),             # 0x3DCCCCCD: low mantissa bits cleared
    (1.0000001, 0x0000_4000_3F80_0000),       # 0x3F800001
    (1 + 2 ** -11, 0x0000_4000_3F80_0000),    # 0x3F801000: the top cleared bit truncates
    (1 + 2 ** -10, 0x0000_4000_3F80_2000),    # 0x3F802000: the lowest kept bit stays
    (-0.5, 0x0000_4000_BF00_0000),            # negative: zero-extended, bits 32.. stay clear
    (-3.75e-5, 0x0000_4000_B81D_4000),        # 0xB81D4952
    (-0.0, 0x0000_4000_8000_0000),
    (3.4028235e38, 0x0000_4000_7F7F_E000),    # largest finite, 0x7F7FFFFF
    (1.1754942e-38, 0x0000_4000_007F_E000),   # largest subnormal, 0x007FFFFF
    (1e-40, 0x0000_4000_0001_0000),           # subnormal, 0x000116C2
    (1e-45, 0x0000_4000_0000_0000),           # smallest subnormal, 0x00000001: all cleared
    (math.inf, 0x0000_4000_7F80_0000),
    (-math.inf, 0x0000_4000_FF80_0000),
    (math.nan, 0x0000_4000_7FC0_0000),
]

OFFSETS = [
    # (offset, packed with scale 1.0)
    (0.0, 0x0000_4000_3F80_0000),
    (1.0, 0x0000_4020_3F80_0000),
    (1.4, 0x0000_4020_3F80_0000),
    (2.5, 0x0000_4040_3F80_0000),    # ties to even: 2
    (3.5, 0x0000_4080_3F80_0000),    # ties to even: 4
    (-0.5, 0x0000_4000_3F80_0000),   # ties to even: 0
    (-1.0, 0x0000_7FE0_3F80_0000),   # 9-bit two's complement 0x1FF
    (255.5, 0x0000_5FE0_3F80_0000),  # clamped to 255
    (300.0, 0x0000_5FE0_3F80_0000),
    (-256.5, 0x0000_6000_3F80_0000),  # clamped to -256 (0x100)
    (-300.0, 0x0000_6000_3F80_0000),
    (math.inf, 0x0000_5FE0_3F80_0000),
]


def test_scale_bit_patterns():
    scales = torch.tensor([scale for scale, _ in SCALES], dtype=torch.float32)
    packed = tpfuse.npu_trans_quant_param(scales)
    assert packed.dtype == torch.int64 and packed.shape == scales.shape
    for (scale, expected), got in zip(SCALES, packed.tolist()):
        assert got == expected, f"scale {scale!r}: got {got:#018x}, expected {expected:#018x}"


def test_offset_bit_patterns():
    offsets = torch.tensor([offset for offset, _ in OFFSETS], dtype=torch.float32)
    packed = tpfuse.npu_trans_quant_param(torch.ones(len(OFFSETS)), offsets)
    for (offset, expected), got in zip(OFFSETS, packed.tolist()):
        assert got == expected, f"offset {offset!r}: got {got:#018x}, expected {expected:#018x}"


@pytest.mark.parametrize("scale_shape, offset_shape, result_shape", [
    ((5,), None, (5,)),
    ((1, 5), None, (1, 5)),
    ((1,), None, (1,)),
    ((5,), (5,), (5,)),
    ((1,), (5,), (5,)),   # torch_npu: a 1-D scale takes the longer offset's length
    ((5,), (1,), (5,)),
    ((1, 5), (1, 5), (1, 5)),
])
def test_shapes_and_broadcast(scale_shape, offset_shape, result_shape):
    scale = torch.full(scale_shape, 0.5)
    offset = None if offset_shape is None else torch.full(offset_shape, 3.0)
    packed = tpfuse.npu_trans_quant_param(scale, offset)
    assert tuple(packed.shape) == result_shape
    expected = 0x0000_4000_3F00_0000 | (0 if offset is None else 3 << 37)
    assert (packed == expected).all()


def test_non_contiguous_scale_is_read_by_value():
    scale = torch.tensor([[1.0, 0.0], [0.1, 0.0], [-0.5, 0.0]])[:, 0]
    assert tpfuse.npu_trans_quant_param(scale).tolist() == [
        0x0000_4000_3F80_0000, 0x0000_4000_3DCC_C000, 0x0000_4000_BF00_0000]


def test_torch_op_is_the_same_function():
    scale = torch.tensor([0.1, 2.0])
    assert torch.equal(torch.ops.tpfuse.trans_quant_param(scale),
                       tpfuse.npu_trans_quant_param(scale))


@pytest.mark.parametrize("scale, offset, message", [
    (torch.ones(4, dtype=torch.float64), None,
     "scale: expected dtype Float (float32), got Double"),
    (torch.ones(2, 4), None, "scale: expected shape [n] or [1, n], got [2, 4]"),
    (torch.ones(1, 1, 4), None, "scale: expected shape [n] or [1, n], got [1, 1, 4]"),
    (torch.ones(4), torch.ones(4, dtype=torch.float16),
     "offset: expected dtype Float (float32), got Half"),
    (torch.ones(4), torch.ones(3), "offset: expected 1 or 4 values"),
    (torch.ones(4), torch.tensor([math.nan]), "offset: expected a number, got nan"),
    (torch.ones(0), None, "scale: expected at least one value, got none"),
])
def test_errors(scale, offset, message):
    with pytest.raises(ValueError) as error:
        tpfuse.npu_trans_quant_param(scale, offset)
    assert str(error.value).startswith(message), str(error.value)

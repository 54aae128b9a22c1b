import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adatsq.errors import ConfigError
from adatsq.quant.pack import pack, packed_cols, unpack
from adatsq.quant.scheme import WEIGHT_BITS


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(WEIGHT_BITS),
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_identity(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, -(-cols * bits // 8)) == (rows, packed_cols(cols, bits))
    assert torch.equal(unpack(packed, bits, cols), codes)


def test_layout_is_little_endian_bitstream():
    assert pack(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x03]]
    assert pack(torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b01]]
    # 3 bits: 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 = 0x1F58D1
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    assert pack(codes, 3).tolist() == [[0xD1, 0x58, 0x1F]]


def test_pack_rejects_bad_input():
    with pytest.raises(ConfigError, match="allowed bits"):
        pack(torch.zeros(2, 2, dtype=torch.uint8), 5)
    with pytest.raises(ConfigError, match="does not fit"):
        pack(torch.full((2, 2), 16, dtype=torch.uint8), 4)
    with pytest.raises(ConfigError, match="unpack expects"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("cols", [7, 8, 24])
def test_unpack_into_out_writes_the_same_codes_in_its_dtype(bits, cols):
    """`out=` (slot by slot for 2/4 bits on whole bytes, else a copy) holds exactly the unpacked codes."""
    codes = torch.randint(
        0, 2**bits, (5, cols), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8
    )
    packed = pack(codes, bits)
    for dtype in (torch.uint8, torch.bfloat16, torch.float32):
        out = (
            torch.full((5, cols), -1.0).to(dtype)
            if dtype.is_floating_point
            else torch.zeros(5, cols, dtype=dtype)
        )
        assert unpack(packed, bits, cols, out=out) is out and torch.equal(out, codes.to(dtype))

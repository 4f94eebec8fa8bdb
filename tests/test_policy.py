"""The selection policy: DESIGN.md section 4's table at every boundary."""

import pytest

from metal_moe import policy
from metal_moe.policy import select_moe_kernel

P = "moe_trellis_swiglu"


@pytest.mark.parametrize("batch,fp32,bits,expected", [
    (1, False, (6, 2, 3), (f"{P}_decode_6_2_3", 64)),
    (1, False, (6, 3, 4), (f"{P}_decode_6_3_4", 64)),
    (1, False, (6, 2, 4), (f"{P}_decode_6_2_4", 64)),
    (1, False, (4, 4, 4), (f"{P}_decode", 64)),
    (1, True, (6, 2, 3), (f"{P}_decode", 64)),          # decode has no fp32acc twin
    (2, False, (6, 2, 3), (f"{P}_prefill4", 64)),
    (2, True, (6, 2, 3), (f"{P}_prefill4_fp32acc", 64)),
    (16, False, (4, 4, 4), (f"{P}_prefill4", 64)),
    (16, True, (4, 4, 4), (f"{P}_prefill4_fp32acc", 64)),
    (17, False, (4, 4, 4), (P, 64)),
    (17, True, (4, 4, 4), (f"{P}_fp32acc", 64)),
    (32, False, (3, 3, 4), (P, 64)),
    (32, True, (3, 3, 4), (f"{P}_fp32acc", 64)),
    (33, False, (3, 3, 4), (f"{P}_large_batch", 128)),
    (33, True, (3, 3, 4), (f"{P}_fp32acc", 64)),
    (4096, False, (6, 2, 3), (f"{P}_large_batch", 128)),
    (4096, True, (6, 2, 3), (f"{P}_fp32acc", 64)),
])
def test_table(batch, fp32, bits, expected):
    assert select_moe_kernel(batch, fp32, *bits) == expected
    assert policy.select(batch, fp32, *bits).rule


def test_simd_is_never_chosen_and_every_choice_exists():
    chosen = {select_moe_kernel(b, f, *bits)[0] for b in range(1, 70) for f in (False, True)
              for bits in ((6, 2, 3), (4, 4, 4), (2.5, 1.5, 3.5))}
    assert policy.SIMD not in chosen and chosen <= set(policy.VARIANTS)


def test_auto_fp32_rule():
    assert policy.auto_fp32_acc(None, 1024) is True
    assert policy.auto_fp32_acc(None, 1023) is False
    assert policy.auto_fp32_acc(False, 4096) is False
    assert policy.auto_fp32_acc(True, 128) is True
    with pytest.raises(TypeError, match="^use_fp32_acc"):
        policy.auto_fp32_acc("yes", 1024)


def test_fallbacks():
    assert policy.fp32_fallback(f"{P}_prefill4") == f"{P}_prefill4_fp32acc"
    assert policy.fp32_fallback(P) == f"{P}_fp32acc"
    assert policy.fp32_fallback(f"{P}_large_batch") == f"{P}_fp32acc"
    for name in (f"{P}_decode", f"{P}_simd", f"{P}_fp32acc", f"{P}_decode_6_2_3"):
        assert policy.fp32_fallback(name) == name


def test_bad_arguments():
    with pytest.raises(ValueError, match="^batch_size"):
        select_moe_kernel(0, False, 4, 4, 4)
    with pytest.raises(TypeError, match="^batch_size"):
        select_moe_kernel(1.5, False, 4, 4, 4)
    with pytest.raises(ValueError, match=r"^kernel: unknown or unavailable variant 'x'; valid variants: moe_"):
        policy.check_variant("x")


def test_accepts_bits():
    assert policy.accepts_bits(f"{P}_decode_6_2_3", (6, 2, 3))
    assert not policy.accepts_bits(f"{P}_decode_6_2_3", (6, 2, 4))
    assert all(policy.accepts_bits(v, (2.5, 1.5, 3.5)) for v in policy.VARIANTS if "_decode_" not in v)

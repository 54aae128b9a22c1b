"""Every kernel against QuantLinear.reference_forward, the dispatch table and the padding fallbacks.

Tolerances (measured max |kernel - reference| / max |reference| over the grid below): float32 inputs
< 1e-5 (both paths exact up to float32 rounding of the products); bf16 inputs < 2e-2 (the reference
rounds x_fq and W to bf16 before its matmul, the int8 path rounds only its output).
"""

import copy
import itertools
import timeit

import pytest
import torch
import torch.nn.functional as F

from adatsq.quant.kernels import (
    KERNELS,
    KernelPolicy,
    actquant,
    choose_kernel,
    compiled,
    forward,
    int8_matmul,
    int_mm_rules,
    layouts,
    onednn,
)
from adatsq.quant.linear import QuantLinear, TimestepQuantLinear, prepare_kernels, set_kernel_policy
from adatsq.quant.rtn import rtn
from adatsq.quant.scheme import WEIGHT_BITS, ActScheme, WeightScheme, activation_codes, fake_quant_activation
from adatsq.quant.transforms import TransformScheme, build_transform, hadamard, rotate

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
IN, OUT = 100, 37  # odd shapes: not multiples of 8, partial last group of 32


def _layer(bits, group_size, symmetric, act_bits, transforms=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    t = None
    if transforms:
        scheme = TransformScheme(smooth_alpha=0.5, rotate=True, lowrank_rank=4)
        W, t = build_transform(W, scheme, torch.rand(IN, generator=g) + 0.1)
    qw = rtn(W, WeightScheme(bits, group_size, symmetric))
    return QuantLinear.from_quantized(qw, b, ActScheme(act_bits), transform=t)


def _rel_diff(y, ref):
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


SCHEMES = list(itertools.product(WEIGHT_BITS, (None, 32), (True, False), (None, 4, 8), (False, True)))


POLICIES = [
    KernelPolicy(),
    KernelPolicy(cache_int8_low_bits=True, cache_dequant=False),
    KernelPolicy(onednn=False),
]
needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN int8 linear not usable here")


def _cached_int8(policy: KernelPolicy) -> str:
    return "int8-onednn" if policy.onednn and onednn.available() else "int8-cached"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
def test_every_kernel_matches_the_reference(dtype, policy):
    x = torch.randn(3, 11, IN).to(dtype)
    worst, seen = 0.0, set()
    for bits, group_size, symmetric, act_bits, transforms in SCHEMES:
        layer = _layer(bits, group_size, symmetric, act_bits, transforms)
        layer.kernel_policy = policy
        y = layer(x)
        assert y.dtype == dtype and y.shape == (3, 11, OUT)
        worst = max(worst, _rel_diff(y, layer.reference_forward(x)))
        seen.add(layer.kernel)
    assert worst < TOL[dtype]
    assert {k.split("+")[0] for k in seen} >= (
        {"int8-unpack-per-call", _cached_int8(policy), "dequant-cached"}
        if not policy.cache_int8_low_bits
        else {_cached_int8(policy), "dequant-per-call"}
    )


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (8, True), (8, False), (3, True)])
@pytest.mark.parametrize("policy", POLICIES)
def test_int8_path_is_exact_up_to_float32_rounding(bits, symmetric, policy):
    """Same integer activation codes and weight codes as the reference, evaluated in float64."""
    layer = _layer(bits, None, symmetric, 8)
    layer.kernel_policy = policy
    x = torch.randn(40, IN)
    codes, sx = activation_codes(x, 8)
    W = layer.dequantized_weight(torch.float64)
    exact = F.linear(codes.double() * sx.double(), W, layer.bias.double())
    assert layer(x).shape == exact.shape and layer.kernel.startswith("int8")
    assert float((layer(x).double() - exact).abs().max() / exact.abs().max()) < 1e-6


def test_dispatch_table():
    f32, bf16 = torch.float32, torch.bfloat16
    assert choose_kernel(8, None, 64, 8, "cpu", bf16) == "int8-cached"
    assert choose_kernel(8, None, 64, 8, "cpu", bf16, onednn_available=True) == "int8-onednn"
    assert choose_kernel(8, None, 64, 8, "cuda", bf16, onednn_available=True) == "int8-cached"
    no_onednn = KernelPolicy(onednn=False)
    assert choose_kernel(8, None, 64, 8, "cpu", bf16, no_onednn, onednn_available=True) == "int8-cached"
    assert choose_kernel(4, None, 64, 8, "cpu", bf16, onednn_available=True) == "int8-unpack-per-call"
    low_bits_cached = KernelPolicy(cache_int8_low_bits=True)
    assert choose_kernel(4, None, 64, 8, "cpu", bf16, low_bits_cached, onednn_available=True) == "int8-onednn"
    assert choose_kernel(4, None, 64, 8, "cpu", bf16) == "int8-unpack-per-call"
    assert choose_kernel(4, 64, 64, 8, "cuda", f32) == "int8-unpack-per-call"  # one group = per channel
    assert choose_kernel(4, None, 64, 8, "cpu", f32, KernelPolicy(cache_int8_low_bits=True)) == "int8-cached"
    assert choose_kernel(4, 32, 64, 8, "cpu", bf16) == "dequant-cached+fake-a8"
    assert choose_kernel(4, 32, 64, None, "cuda", bf16) == "dequant-cached"
    assert choose_kernel(4, None, 64, 4, "cpu", bf16) == "dequant-cached+fake-a4"  # A4 stays simulated
    assert choose_kernel(4, 32, 64, None, "cpu", f32, KernelPolicy(cache_dequant=False)) == "dequant-per-call"
    assert choose_kernel(8, None, 64, 8, "cpu", torch.float64) == "reference"
    assert choose_kernel(8, None, 64, 8, "mps", f32) == "reference"
    assert choose_kernel(8, None, 64, 8, "cpu", f32, KernelPolicy(enabled=False)) == "reference"
    assert set(KERNELS) >= {
        "reference",
        "int8-cached",
        "int8-onednn",
        "int8-unpack-per-call",
        "dequant-cached",
    }


def _blocked(w):
    return torch.ops.onednn.qlinear_prepack(w, None)


@needs_onednn
@pytest.mark.parametrize("layout", [onednn.prepack, _blocked, onednn._plain])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 13, 5), (16, 8, 8), (17, 100, 37), (300, 64, 24)])
def test_onednn_matmul_is_the_exact_integer_product_times_the_scale(layout, m, k, n):
    """Both weight layouts (and the one `prepack` picks here) give the exact integer products."""
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) + 0.5
    y = onednn.matmul_scaled(a, layout(w), scale)
    exact = (a.long() @ w.long().T).double() * scale.double()
    assert y.dtype == torch.float32 and float((y.double() - exact).abs().max() / exact.abs().max()) < 1e-7


def _fastest_ms(fn):
    fn()
    return 1e3 * min(timeit.repeat(fn, number=1, repeat=5))


@needs_onednn
def test_the_onednn_weight_layout_runs_at_integer_matmul_speed():
    """The layout `prepack` picks runs a JIT kernel here, never oneDNN's reference one: the prepacked
    layout on a CPU without AMX ran `ref_int8` ~500x slower than `_int_mm` (AMD EPYC Zen 5)."""
    a = torch.randint(-127, 128, (128, 512), dtype=torch.int8)
    w = torch.randint(-127, 128, (512, 512), dtype=torch.int8)
    packed, scale, wt = onednn.prepack(w), torch.ones(512), w.t()
    onednn_ms = _fastest_ms(lambda: onednn.matmul_scaled(a, packed, scale))
    int_mm_ms = _fastest_ms(lambda: torch._int_mm(a, wt))
    assert onednn_ms < 10 * int_mm_ms, (onednn_ms, int_mm_ms)


def test_onednn_probe_says_unavailable_when_the_op_fails_or_is_wrong(monkeypatch):
    """A build or CPU where oneDNN raises or returns wrong products falls back to `_int_mm`."""

    def raises(*args):
        raise RuntimeError("onednn int8 linear: unsupported")

    for broken in (raises, lambda a, w, s: torch.zeros(a.shape[0], s.shape[0])):
        onednn.available.cache_clear()
        monkeypatch.setattr(onednn, "matmul_scaled", broken)
        assert onednn.available() is False
        layer = _layer(8, None, True, 8)
        x = torch.randn(20, IN)
        assert layer.prepare(torch.float32) == "int8-cached"
        assert _rel_diff(layer(x), layer.reference_forward(x)) < TOL[torch.float32]
        monkeypatch.undo()
    onednn.available.cache_clear()


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_onednn_writes_half_outputs_directly_within_one_more_rounding(monkeypatch, dtype):
    """Half-precision inputs: oneDNN writes dtype itself (no float32 [M, N]) unless a zero correction
    must be subtracted first; the result stays within one more rounding of the float32 route."""
    symmetric, asymmetric = _layer(8, None, True, 8), _layer(8, None, False, 8, seed=1)
    x = torch.randn(300, IN).to(dtype)
    for layer in (symmetric, asymmetric):
        layer.to(dtype)
        assert layer.prepare(dtype) == "int8-onednn"
    assert symmetric._kernel_state.out_dtype == dtype
    assert asymmetric._kernel_state.out_dtype == torch.float32  # the correction needs float32
    direct = symmetric(x)
    monkeypatch.setattr(onednn, "writes", lambda d: False)  # a oneDNN without half outputs
    symmetric.to(dtype)  # layouts are rebuilt on the next call
    assert symmetric.prepare(dtype) == "int8-onednn"
    assert symmetric._kernel_state.out_dtype == torch.float32
    via_float32 = symmetric(x)
    assert direct.dtype == via_float32.dtype == dtype and not torch.equal(direct, via_float32)
    step = torch.finfo(dtype).eps * float(via_float32.float().abs().max())  # one step at the largest
    assert float((direct.float() - via_float32.float()).abs().max()) <= step
    assert _rel_diff(direct, symmetric.reference_forward(x)) < TOL[torch.bfloat16]


def test_onednn_half_output_probe_says_no_when_the_op_fails_or_rounds_wrong(monkeypatch):
    original = onednn.matmul_scaled

    def raises(a, w, s, out_dtype=torch.float32):
        if out_dtype != torch.float32:
            raise RuntimeError("onednn: bf16 dst unsupported")
        return original(a, w, s)

    def truncates(a, w, s, out_dtype=torch.float32):
        y = original(a, w, s)
        return y if out_dtype == torch.float32 else (y * 0.99).to(out_dtype)

    for broken in (raises, truncates):
        onednn.writes.cache_clear()
        monkeypatch.setattr(onednn, "matmul_scaled", broken)
        assert onednn.writes(torch.bfloat16) is False
        monkeypatch.undo()
    onednn.writes.cache_clear()
    assert onednn.writes(torch.bfloat16) is onednn.available()


@pytest.mark.parametrize(("m", "k", "n"), [(1, 13, 5), (16, 8, 8), (17, 100, 37), (40, 64, 24)])
def test_int8_matmul_pads_to_cuda_rules(m, k, n):
    rules = int_mm_rules("cuda")
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    acc = int8_matmul(a, layouts.pad_weight(w, rules), n, rules)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), a.long() @ w.long().T)
    assert int_mm_rules("cpu").min_rows == 1  # CPU _int_mm takes any shape: nothing to pad


def test_layer_under_cuda_padding_rules_matches_reference(monkeypatch):
    monkeypatch.setattr(layouts, "int_mm_rules", lambda device_type: int_mm_rules("cuda"))
    for bits in (4, 8):
        layer = _layer(bits, None, False, 8)
        for m in (1, 5, 16, 33):  # M <= 16 is padded, K=100 and N=37 too
            x = torch.randn(m, IN)
            assert _rel_diff(layer(x), layer.reference_forward(x)) < 1e-5
        assert layer._kernel_state.rules.min_rows == 17


def test_state_dict_is_untouched_and_layouts_rebuild_when_buffers_change():
    layer, other = _layer(8, None, True, 8, seed=0), _layer(8, None, True, 8, seed=1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(20, IN)
    layer(x)
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    layer.load_state_dict(other.state_dict())  # in-place copy into the buffers: the cache must notice
    torch.testing.assert_close(layer(x), other(x))
    layer.to(torch.float64)
    assert layer._kernel_state is None and layer(x.double()).dtype == torch.float64
    assert layer.kernel == "reference"


def test_a_prepared_layer_deep_copies_and_its_copy_rebuilds_the_layout():
    layer = _layer(8, None, False, 8)
    x = torch.randn(20, IN)
    y = layer(x)
    clone = copy.deepcopy(torch.nn.Sequential(layer))[0]
    assert clone._kernel_state is None and layer._kernel_state is not None
    assert torch.equal(clone(x), y) and clone.kernel == layer.kernel


def test_weights_stay_packed_for_low_bits():
    layer = _layer(4, None, True, 8)
    assert layer.prepare(torch.bfloat16) == "int8-unpack-per-call"
    assert layer._kernel_state.weight is None  # no resident int8 copy: only the packed qweight
    policy = KernelPolicy(cache_int8_low_bits=True)
    set_kernel_policy(layer, policy)
    assert layer.prepare(torch.bfloat16) == _cached_int8(policy)
    assert layer._kernel_state.weight.dtype == torch.int8


def test_timestep_layer_keeps_every_variant_prepared():
    variants = [_layer(b, None, True, 8, seed=b) for b in (4, 8)]
    ts = TimestepQuantLinear(variants, (8, 4, 4, 8))
    model = torch.nn.Sequential(ts)
    cached = _cached_int8(KernelPolicy())
    assert prepare_kernels(model, torch.bfloat16) == {"0": f"w4: int8-unpack-per-call, w8: {cached}"}
    states = [v._kernel_state for v in variants]
    x = torch.randn(20, IN, dtype=torch.bfloat16)
    for segment in (0, 1, 3):
        ts.set_segment(segment)
        v = variants[0 if ts.active_bits == 4 else 1]
        assert torch.equal(ts(x), v(x)) and ts.kernel == v.kernel
    assert [v._kernel_state for v in variants] == states  # switching never rebuilt a layout


def _butterfly(x, signs):
    """The textbook fast Walsh-Hadamard transform in float64 (the previous implementation of rotate)."""
    n = x.shape[-1]
    b, h = n & -n, 1
    y = x.double() * signs.double()
    while h < b:
        y = y.reshape(-1, n // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(x.shape) / b**0.5


@pytest.mark.parametrize("n", [96, 768, 3 * 16384])  # one, two and three Kronecker factors
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_wht_runs_in_the_input_dtype(n, dtype):
    x = torch.randn(3, n)
    signs = torch.randint(0, 2, (n,)).float() * 2 - 1
    exact = _butterfly(x, signs)
    if n < 1000:
        R = signs.double()[:, None] * hadamard(n, dtype=torch.float64)
        torch.testing.assert_close(exact, x.double() @ R)
    y = rotate(x.to(dtype), signs)
    assert y.dtype == dtype
    assert float((y.double() - exact).abs().max()) < (1e-4 if dtype == torch.float32 else 0.05)


def test_casting_a_model_keeps_the_quantization_grid():
    layer = _layer(4, 32, False, 8, transforms=True)
    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert layer.bias.dtype == torch.bfloat16 and layer.smooth.dtype == torch.bfloat16
    x = torch.randn(9, IN, dtype=torch.bfloat16)
    assert _rel_diff(layer(x), layer.reference_forward(x)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("bits, dtype", [(8, torch.float32), (4, torch.bfloat16)])
def test_long_inputs_run_in_row_chunks_with_the_same_result(monkeypatch, bits, dtype):
    """Rows are independent (per-token codes): chunking the `_int_mm` matmul changes no bit of the output."""

    layer = _layer(bits, None, False, 8)
    set_kernel_policy(layer, KernelPolicy(onednn=False))  # the CPU `_int_mm` path is the one chunked
    x = torch.randn(3, 700, IN).to(dtype)  # 2100 rows: two full chunks of 1024 and a partial one
    assert layer.kernel_for("cpu", dtype) in ("int8-cached", "int8-unpack-per-call")
    monkeypatch.setattr(forward, "ACC_ELEMENTS", 1024 * OUT)  # 1024 rows per call at this width
    calls = []
    original = torch._int_mm
    monkeypatch.setattr(
        torch, "_int_mm", lambda a, w, **out: calls.append(a.shape[0]) or original(a, w, **out)
    )
    chunked = layer(x)
    assert calls == [1024, 1024, 52]
    monkeypatch.setattr(forward, "ACC_ELEMENTS", 10**12)
    layer.prepare(dtype)
    whole = layer(x)
    assert calls[3:] == [2100]
    assert torch.equal(chunked, whole)
    assert _rel_diff(chunked, layer.reference_forward(x)) < TOL[dtype]


def test_layers_reading_one_tensor_share_its_activation_codes(monkeypatch):
    """q / k / v read the same tensor: quantized once; an in-place edit or a new tensor quantizes again."""
    calls = []
    original = actquant.activation_codes
    monkeypatch.setattr(
        actquant, "activation_codes", lambda x, *args: calls.append(x.shape) or original(x, *args)
    )
    q, k, v = _layer(8, None, True, 8, seed=0), _layer(8, None, False, 8, seed=1), _layer(4, None, False, 8)
    x = torch.randn(5, 7, IN)
    for layer in (q, k, v):
        assert _rel_diff(layer(x), layer.reference_forward(x)) < TOL[torch.float32]
    assert len(calls) == 2  # k reused q's codes; v (4-bit, planar column order) needs its own once
    assert _rel_diff(v(x), v.reference_forward(x)) < TOL[torch.float32] and len(calls) == 2
    x.mul_(3.0)  # same object, new values: the version counter moved
    assert _rel_diff(k(x), k.reference_forward(x)) < TOL[torch.float32] and len(calls) == 3
    with torch.inference_mode():  # no version counter: never reused
        xi = torch.randn(5, IN)
        q(xi), k(xi)
    assert len(calls) == 5
    fake_calls = []
    fake = actquant.fake_quant_activation
    monkeypatch.setattr(
        actquant, "fake_quant_activation", lambda t, act: fake_calls.append(1) or fake(t, act)
    )
    for seed in (2, 3):  # simulated A8 (group-wise weights): the fake-quantized x is shared too
        layer = _layer(4, 32, False, 8, seed=seed)
        assert layer.kernel_for("cpu", torch.float32) == "dequant-cached+fake-a8"
        assert _rel_diff(layer(x), layer.reference_forward(x)) < TOL[torch.float32]
    assert len(fake_calls) == 1
    assert {("int8", 1), ("fake", 8)} <= set(actquant._last.by_kind)  # held while x lives
    del x
    assert not {("int8", 1), ("fake", 8)} & set(actquant._last.by_kind)  # freed with it


def test_activation_codes_in_row_chunks_are_the_whole_input_codes(monkeypatch):
    from adatsq.quant.kernels import actquant

    x = torch.randn(3, 70, IN).bfloat16()
    whole_codes, whole_scale = activation_codes(x.reshape(-1, IN), 8)
    monkeypatch.setattr(actquant, "QUANT_ELEMENTS", IN * 16 + 3)  # 16 rows per chunk, a partial last one
    codes, scale = actquant.int8_codes(x)
    assert codes.dtype == torch.int8 and torch.equal(codes.float(), whole_codes)
    assert torch.equal(scale, whole_scale)


@pytest.mark.parametrize(("bits", "k_in", "planar"), [(4, 100, 2), (2, 100, 4), (4, 99, 1), (3, 96, 1)])
def test_planar_weights_and_codes_are_one_permutation_of_the_columns(bits, k_in, planar):
    """Slot i of every byte unpacks to its own block of columns; activations take the same order."""
    qw = rtn(torch.randn(OUT, k_in), WeightScheme(bits, None, False))
    layer = QuantLinear.from_quantized(qw, None, ActScheme(8))
    assert layouts.codes_per_byte(bits, k_in) == planar
    x = torch.randn(9, k_in)
    if planar > 1:
        order = torch.arange(k_in).view(k_in // planar, planar).T.reshape(-1)  # planar column j <- order[j]
        natural = layouts.int8_weight(layer)
        assert torch.equal(layouts.planar_int8_weight(layer), natural[:, order])
        codes, scale = activation_codes(x, 8, planar)
        assert torch.equal(codes, activation_codes(x, 8)[0][:, order]) and torch.equal(
            scale, activation_codes(x, 8)[1]
        )
    assert layer.prepare(torch.float32) == "int8-unpack-per-call" and layer._kernel_state.planar == planar
    assert _rel_diff(layer(x), layer.reference_forward(x)) < TOL[torch.float32]


@pytest.mark.parametrize(("bits", "group_size"), [(4, None), (2, None), (4, 20)])
def test_per_call_unpacking_takes_the_cheaper_column_order_same_integers(monkeypatch, bits, group_size):
    """Planar order while the weight is the larger operand (rows < 2 x out_features), natural column order
    past it (the activations' strided division then costs more than interleaving the weight's slots); the
    int32 sums are the same integers either way, so the outputs are equal bit for bit."""
    scheme = WeightScheme(bits, group_size, False, integer_group_scales=group_size is not None)
    qw = rtn(torch.randn(OUT, IN), scheme)
    layer = QuantLinear.from_quantized(qw, torch.randn(OUT), ActScheme(8))
    assert layer.prepare(torch.float32) == "int8-unpack-per-call" and layer._kernel_state.planar == 8 // bits
    orders = []
    for name in ("planar_int8_weight", "int8_weight"):
        original = getattr(forward, name)
        monkeypatch.setattr(forward, name, lambda *a, n=name, f=original, **k: orders.append(n) or f(*a, **k))
    few, many = torch.randn(2 * OUT - 1, IN), torch.randn(2 * OUT, IN)
    y_few, y_many = layer(few), layer(many)
    assert orders == ["planar_int8_weight", "int8_weight"]
    for x, y in ((few, y_few), (many, y_many)):
        assert _rel_diff(y, layer.reference_forward(x)) < TOL[torch.float32]
    monkeypatch.setattr(forward, "PLANAR_ROWS_PER_OUTPUT", 0.0)  # every call in natural order
    assert torch.equal(layer(few), y_few) and orders[-1] == "int8_weight"
    monkeypatch.setattr(forward, "PLANAR_ROWS_PER_OUTPUT", float("inf"))  # every call planar
    assert torch.equal(layer(many), y_many) and orders[-1] == "planar_int8_weight"


@pytest.mark.skipif(not compiled.available(), reason="torch.compile needs a C++ compiler")
def test_compiled_activation_codes_are_the_eager_codes_bit_for_bit():
    """One compilation (~40 s on 2 cores) checked on edge rows and on layers (4-bit: planar, eager)."""
    g = torch.Generator().manual_seed(5)
    rows = torch.cat(
        [
            torch.randn(600, 96, generator=g) * torch.logspace(-14, 4, 600)[:, None],
            torch.randint(-127, 128, (200, 96), generator=g) * torch.rand(200, 1, generator=g),
            torch.zeros(2, 96),
        ]
    )
    for dtype in (torch.bfloat16, torch.float32):
        x = rows.to(dtype)
        codes, scale = compiled.int8_codes(x)
        eager_codes, eager_scale = activation_codes(x, 8)
        assert codes.dtype == torch.int8 and torch.equal(codes.float(), eager_codes)
        assert torch.equal(scale, eager_scale)
    x = torch.randn(3, 50, IN).bfloat16()
    for bits in (8, 4):
        layer = _layer(bits, None, False, 8)
        eager = layer(x)
        set_kernel_policy(layer, KernelPolicy(compiled=True))
        assert layer.prepare(torch.bfloat16).startswith("int8") and layer._kernel_state.compiled
        assert torch.equal(layer(x.clone()), eager)


@pytest.mark.skipif(not compiled.available(), reason="torch.compile needs a C++ compiler")
def test_compiled_fake_quantization_is_the_eager_one_bit_for_bit(monkeypatch):
    """The simulated paths (group-wise A8, A4) under KernelPolicy(compiled=True): the same values as
    `fake_quant_activation`, on edge rows and through layers (a compilation per dtype and bit-width)."""
    g = torch.Generator().manual_seed(6)
    rows = torch.cat(
        [
            torch.randn(300, 96, generator=g) * torch.logspace(-14, 4, 300)[:, None],
            torch.randint(-127, 128, (100, 96), generator=g) * torch.rand(100, 1, generator=g),
            torch.zeros(2, 96),
        ]
    )
    for dtype, bits in ((torch.bfloat16, 8), (torch.float32, 8), (torch.bfloat16, 4)):
        x = rows.to(dtype)
        y = compiled.fake_quantized(x, bits)
        assert y.dtype == dtype and torch.equal(y, fake_quant_activation(x, ActScheme(bits)))
    calls = []
    counted = lambda t, bits: calls.append(bits) or compiled.fake_quantized(t, bits)  # noqa: E731
    monkeypatch.setattr(actquant, "compiled_fake", counted)
    x = torch.randn(3, 50, IN).bfloat16()
    for group_size, act_bits in ((32, 8), (None, 4)):
        layer = _layer(4, group_size, False, act_bits)
        eager = layer(x)
        set_kernel_policy(layer, KernelPolicy(compiled=True))
        assert layer.prepare(torch.bfloat16) == f"dequant-cached+fake-a{act_bits}"
        assert layer._kernel_state.compiled_fake and not layer._kernel_state.compiled_codes
        assert torch.equal(layer(x.clone()), eager) and calls[-1] == act_bits
    assert calls == [8, 4]
    warmed = []
    monkeypatch.setattr(compiled, "warm_up", lambda *args: warmed.append(args))
    model = torch.nn.Sequential(*(_layer(4, 32, False, a) for a in (8, 4, 8)), _layer(8, None, True, 8))
    set_kernel_policy(model, KernelPolicy(compiled=True))
    prepare_kernels(model, torch.bfloat16)  # at load: every graph the layers will call, once
    assert warmed == [(torch.bfloat16, True, [4, 8])]


def test_per_call_unpacks_share_one_buffer_and_each_layer_gets_its_own_weight():
    """4-bit per-call layers of different widths unpack into one reused buffer: each output is still
    its own layer's (bit for bit as when it runs alone), and the buffer does not grow past the widest."""
    from adatsq.quant.kernels import scratch

    wide, narrow = (
        QuantLinear.from_quantized(rtn(torch.randn(n, IN), WeightScheme(4, None, True)), None, ActScheme(8))
        for n in (64, 24)
    )
    x = torch.randn(30, IN)
    assert wide.kernel_for("cpu", torch.float32) == "int8-unpack-per-call"
    y_wide = wide(x)
    buffer = scratch.buffer(torch.device("cpu"), torch.int8)
    y_narrow = narrow(x)
    assert torch.equal(wide(x), y_wide)
    assert torch.equal(narrow(x), y_narrow)
    assert scratch.buffer(torch.device("cpu"), torch.int8) is buffer and buffer.numel() >= 64 * IN
    for layer, y in ((wide, y_wide), (narrow, y_narrow)):
        assert _rel_diff(y, layer.reference_forward(x)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_call_dequantization_is_the_reference_weight_bit_for_bit(dtype):
    """dequant-per-call writes (q - z) * s in place into the shared buffer: the same bits as
    `dequantized_weight` for every bit-width, per channel, exact and partial groups."""

    for bits, group_size in itertools.product(WEIGHT_BITS, (None, 20, 32)):
        layer = _layer(bits, group_size, False, None, seed=bits)
        assert torch.equal(forward._dequantized_per_call(layer, dtype), layer.dequantized_weight(dtype))


def test_shared_buffers_work_in_and_out_of_inference_mode_and_under_autograd():
    """A buffer first made under inference mode stays writable outside it; with a gradient to compute,
    dequant-per-call gives the weight a tensor of its own (the shared one would be overwritten before
    backward)."""
    from adatsq.quant.kernels import scratch

    scratch.clear()  # this test makes them
    layers = [_layer(4, 20, False, None, seed=1), _layer(4, None, True, 8, seed=2)]
    for layer in layers:
        set_kernel_policy(layer, KernelPolicy(cache_dequant=False))
    assert [layer.kernel_for("cpu", torch.float32) for layer in layers] == [
        "dequant-per-call",
        "int8-unpack-per-call",
    ]
    x = torch.randn(20, IN)
    with torch.inference_mode():
        first = [layer(x) for layer in layers]
    with torch.no_grad():
        assert all(torch.equal(layer(x), y) for layer, y in zip(layers, first, strict=True))
    xg = x.clone().requires_grad_()
    dequant = layers[0]
    y = dequant(xg)
    layers[0](torch.randn(5, IN))  # another call rewrites the shared buffer before backward
    y.square().sum().backward()
    xr = x.clone().requires_grad_()
    dequant.reference_forward(xr).square().sum().backward()
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-5, atol=1e-6)

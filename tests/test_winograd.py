"""Winograd F(4x4, 3x3) convolutions (csrc/cpu/winograd_conv.cpp, danet_ext/winograd.py):
the outputs of the direct convolution within Winograd's own float32 error, for odd
sizes, dilations up to beyond the image, partial tiles, channel counts that are not
multiples of the kernel's channel block, batches, with and without bias, on 1 to 3
threads; bad arguments rejected; the op's fake kernel; optimize_for_inference's swap."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import danet_ext
from danet_ext.winograd import WinogradConv2d, supports, transform_filters, use_winograd

pytestmark = pytest.mark.skipif(not danet_ext.HAVE_EXTENSION, reason="the compiled extension is not built")


def relative_error(got, expected):
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("c_in,c_out,h,w,dilation", [
    (3, 5, 7, 9, 1), (3, 5, 7, 9, 2), (8, 4, 13, 17, 3), (8, 4, 1, 1, 1), (8, 4, 2, 3, 5),
    (70, 65, 9, 11, 2), (16, 16, 20, 20, 16), (129, 64, 12, 8, 4), (64, 129, 5, 21, 1)])
def test_matches_the_direct_convolution(threads, c_in, c_out, h, w, dilation, monkeypatch):
    monkeypatch.setattr(danet_ext.winograd, "MIN_TILE_EFFICIENCY", 0.0)  # the kernel on every map
    monkeypatch.setattr(danet_ext.winograd, "MIN_TILE_EFFICIENCY_BFLOAT16", 0.0)
    torch.manual_seed(c_in * 100 + h)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch, bias in ((1, True), (2, False)):
            conv = nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=bias)
            x = torch.randn(batch, c_in, h, w)
            expected = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                                padding=dilation, dilation=dilation)
            with torch.no_grad():
                got = WinogradConv2d(conv)(x)
            assert got.shape == expected.shape and got.dtype == torch.float32
            assert got.is_contiguous(memory_format=torch.channels_last)
            # F(4x4, 3x3) in float32: ~1e-5 of the outputs' magnitude at these channel
            # counts (the direct convolution: ~3e-7); a wrong tile or index gives O(1)
            assert relative_error(got, expected) < 5e-5
    finally:
        torch.set_num_threads(before)


def test_chunks_of_tiles_and_nchw_input():
    """More tiles than one chunk holds (C = 600: max(128, 2^23 / (36 * 4 * 600)) = 128
    tiles a chunk; 72 x 100 at dilation 1 is 450 tiles), and an NCHW input."""
    torch.manual_seed(0)
    conv = nn.Conv2d(600, 8, 3, padding=1)
    x = torch.randn(1, 600, 72, 100)
    expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.no_grad():
        got = WinogradConv2d(conv)(x)
    assert relative_error(got, expected) < 5e-5


def test_tile_efficiency_counts_the_kernels_tiles():
    """Outputs over 16 x the tiles of csrc/cpu/winograd_conv.cpp's make_tiles (one residue
    class modulo the dilation at a time, 4 outputs a tile along each axis)."""
    from danet_ext.winograd import tile_efficiency

    def tiles(n, r):  # counted the slow way: every output of every residue class
        return sum(len(range(q, n, r)) // 4 + (len(range(q, n, r)) % 4 > 0) for q in range(r))

    for h, w, r in ((12, 12, 16), (64, 128, 4), (33, 33, 1), (17, 17, 8), (65, 65, 16), (1, 1, 1), (5, 9, 3)):
        assert tile_efficiency(h, w, r) == pytest.approx(h * w / (16 * tiles(h, r) * tiles(w, r)))
    assert tile_efficiency(12, 12, 16) == pytest.approx(1 / 16)  # one output per tile
    assert tile_efficiency(64, 128, 4) == 1.0
    assert tile_efficiency(48, 48, 16) == pytest.approx(9 / 16)
    assert tile_efficiency(12, 12, 2 ** 62) == pytest.approx(1 / 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_dilated_maps_take_the_direct_convolution(dtype, monkeypatch):
    """Where most tiles would fall outside the map (layer4's dilation 16 on 12 x 12), a
    dilated WinogradConv2d runs its kept 3 x 3 weights directly; elsewhere the kernel. Either
    way the output is the convolution's, channels_last, in the model's dtype."""
    calls = []
    kernel = danet_ext.winograd.winograd_conv3x3
    monkeypatch.setattr(danet_ext.winograd, "winograd_conv3x3", lambda *a: calls.append(a) or kernel(*a))
    torch.manual_seed(0)
    bfloat16 = dtype == torch.bfloat16
    # (dilation, map, tile efficiency): float32 runs directly below 0.5, bfloat16 below 0.9
    for dilation, h, w, efficiency in ((16, 12, 15, 1 / 16), (8, 17, 20, 0.332), (4, 24, 27, 0.633),
                                       (16, 64, 128, 1.0), (1, 5, 8, 0.625),
                                       # on either side of the thresholds, and exactly on 0.5
                                       (16, 45, 45, 0.494), (16, 46, 46, 0.517), (16, 32, 64, 0.5),
                                       (16, 65, 65, 0.914), (16, 66, 66, 0.840)):
        direct = dilation > 1 and efficiency < (0.9 if bfloat16 else 0.5)
        conv = nn.Conv2d(32, 24, 3, padding=dilation, dilation=dilation).to(dtype)
        module = WinogradConv2d(conv)
        assert (module.weight is None) == (dilation == 1)
        x = torch.randn(2, 32, h, w).to(dtype)
        assert danet_ext.winograd.tile_efficiency(h, w, dilation) == pytest.approx(efficiency, abs=0.001)
        calls.clear()
        with torch.no_grad():
            got, expected = module(x), conv(x)
        assert len(calls) == (0 if direct else 1), (dilation, h, w)
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        if direct:
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, expected, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))


def test_filter_transform_is_exact_for_a_delta():
    """G g Gᵀ of a centre delta is the outer product of G's middle column."""
    g = torch.zeros(1, 1, 3, 3)
    g[0, 0, 1, 1] = 1
    col = torch.tensor([0, -1 / 6, 1 / 6, 1 / 12, -1 / 12, 0], dtype=torch.float64)
    torch.testing.assert_close(transform_filters(g).view(6, 6), torch.outer(col, col).float())


def test_rejects_what_it_cannot_compute():
    op = torch.ops.danet_ext.winograd_conv3x3
    x = torch.randn(1, 4, 8, 8)
    u = transform_filters(torch.randn(5, 4, 3, 3))
    with pytest.raises(RuntimeError, match="input must be float32"):
        op(x.double(), u, None, 1)
    with pytest.raises(RuntimeError, match=r"weight must be the transformed filters \(36, C_in = 3"):
        op(torch.randn(1, 3, 8, 8), u, None, 1)
    with pytest.raises(RuntimeError, match="bias must be float32 of shape"):
        op(x, u, torch.zeros(4), 1)
    with pytest.raises(RuntimeError, match="dilation must be >= 1"):
        op(x, u, None, 0)
    with pytest.raises(RuntimeError, match=r"input must be \(B, C, H, W\)"):
        op(x[0], u, None, 1)
    with pytest.raises(ValueError, match="expects"):
        WinogradConv2d(nn.Conv2d(4, 5, 3, padding=1))(torch.randn(1, 3, 8, 8))
    for conv in (nn.Conv2d(4, 5, 3, padding=1, stride=2), nn.Conv2d(4, 5, 3, padding=0),
                 nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 5, 1), nn.Conv2d(4, 5, 3, padding=1).double(),
                 nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 5, 3, padding=(1, 2),
                                                                              dilation=(1, 2))):
        assert not supports(conv)
        with pytest.raises(ValueError, match="WinogradConv2d takes"):
            WinogradConv2d(conv)


def test_opcheck_and_compile():
    x = torch.randn(2, 6, 7, 9)
    u = transform_filters(torch.randn(5, 6, 3, 3))
    torch.library.opcheck(torch.ops.danet_ext.winograd_conv3x3.default, (x, u, torch.randn(5), 2))
    conv = WinogradConv2d(nn.Conv2d(6, 5, 3, padding=2, dilation=2))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(conv, fullgraph=True)(x), conv(x))


def test_optimize_for_inference_swaps_the_stride_one_3x3_convolutions():
    torch.manual_seed(0)
    model = danet_ext.DANet(3, backbone="resnet50", aux=False).eval()
    expected_swaps = sum(supports(m) and m.in_channels >= 128 for m in model.modules())
    fast = danet_ext.optimize_for_inference(model, precision="float32")
    assert fast.winograd_convolutions == expected_swaps > 10
    assert isinstance(fast.model.head.conv5a[0], WinogradConv2d)
    assert danet_ext.optimize_for_inference(model, precision="float32", winograd=False).winograd_convolutions == 0
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-3, atol=1e-3)
    assert use_winograd(nn.Sequential(nn.Conv2d(128, 2, 3, padding=1).double())) == 0
    assert use_winograd(nn.Sequential(nn.Conv2d(127, 2, 3, padding=1))) == 0
    assert use_winograd(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)), min_channels=1) == 1


def test_inference_only_backward_raises():
    """No gradients: a backward through it raises instead of leaving .grad silently empty."""
    conv = nn.Conv2d(4, 3, 3, padding=1)
    net = nn.Sequential(nn.Conv2d(2, 4, 1), WinogradConv2d(conv))
    out = net(torch.randn(1, 2, 6, 5))
    with pytest.raises(RuntimeError, match="is for inference and has no backward"):
        out.sum().backward()


def test_dilation_beyond_the_image_is_the_centre_tap():
    """Any dilation at least the image's size leaves only the centre tap (2^62 included)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 7)
    conv = nn.Conv2d(5, 4, 3, padding=7, dilation=7)
    centre = F.conv2d(x, conv.weight[:, :, 1:2, 1:2], conv.bias)
    u = transform_filters(conv.weight)
    for dilation in (7, 8, 1000, 2 ** 62):
        got = torch.ops.danet_ext.winograd_conv3x3(x, u, conv.bias.detach(), dilation)
        torch.testing.assert_close(got, centre, rtol=1e-5, atol=1e-5)


def test_bfloat16_within_twice_the_direct_bfloat16_error(monkeypatch):
    """bfloat16 in and out, float32 inside: the error against float64 of the same
    bfloat16 inputs and weights is that of one rounding of the output, like oneDNN's
    direct bfloat16 convolution's (at most twice it)."""
    monkeypatch.setattr(danet_ext.winograd, "MIN_TILE_EFFICIENCY_BFLOAT16", 0.0)  # the kernel on every map
    torch.manual_seed(0)
    for c_in, c_out, h, w, dilation in ((256, 64, 16, 24, 2), (67, 33, 9, 13, 1), (40, 8, 17, 20, 8)):
        conv = nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation).bfloat16()
        x = torch.relu(torch.randn(2, c_in, h, w)).bfloat16()
        truth = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=dilation, dilation=dilation)
        with torch.no_grad():
            direct = conv(x)
            got = WinogradConv2d(conv)(x)
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(got, truth) <= 2 * relative_error(direct, truth) + 1e-6
    with pytest.raises(ValueError, match="runs torch.bfloat16 CPU tensors, got torch.float32"):
        WinogradConv2d(conv)(x.float())


def test_bfloat16_models_take_it_only_where_it_pays_off(monkeypatch):
    """bfloat16: only on CPUs with AVX512-BF16 but not AMX, for 512 input channels and more."""
    from danet_ext import winograd

    model = danet_ext.DANet(3, backbone="resnet50", aux=False).eval()
    wide = sum(supports(m) and m.in_channels >= 512 for m in model.modules())
    for pays, expected in ((True, wide), (False, 0)):
        monkeypatch.setattr(winograd, "pays_off_in_bfloat16", lambda pays=pays: pays)
        fast = danet_ext.optimize_for_inference(model, precision="bfloat16")
        assert fast.winograd_convolutions == expected
    assert wide == 7  # layer4's three, conv5a/conv5c, conv51/conv52
    monkeypatch.undo()
    said = danet_ext.build_info()["cpu_inference_convolutions"]
    assert said["float32"].startswith("Winograd") and "128 input channels" in said["float32"]
    assert said["bfloat16"].startswith("Winograd") == winograd.pays_off_in_bfloat16()

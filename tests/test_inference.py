"""optimize_for_inference: BatchNorm folding is exact, the original model is left
alone, and the reduced-precision path keeps a trained model's predictions
(argmax disagreement <= 0.5 % of pixels, mIoU within 0.5 points)."""
import pytest
import torch
from torch import nn

import danet_ext
from danet_ext import hardware
from danet_ext.inference import InferenceModel, choose_precision, fold_batch_norms, optimize_for_inference
from danet_ext.tools.synthetic import CLASSES, confusion_matrix, make_batch, mean_iou


def randomize_batch_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    for m in model.modules():
        if hasattr(m, "gamma"):
            m.gamma.data.fill_(0.5)  # let the attention branches count
    return model


@pytest.mark.parametrize("deep_stem", [False, True])
def test_folding_every_batch_norm_of_danet_is_exact(deep_stem):
    torch.manual_seed(0)
    # float64, so that the comparison tests the algebra, not float32 rounding over 50 layers
    model = randomize_batch_norms(danet_ext.DANet(5, backbone="resnet50", deep_stem=deep_stem)).eval().double()
    x = torch.randn(1, 3, 65, 49, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert fold_batch_norms(model) == n_bn
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        got = model(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_float32_path_matches_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = randomize_batch_norms(danet_ext.DANetHead(64, 3))
    model.train()
    fast = optimize_for_inference(model, precision="float32")
    assert isinstance(fast, InferenceModel) and fast.dtype == torch.float32
    assert model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 64, 9, 11)
    with torch.no_grad():
        expected = model.eval()(x)
    got = fast(x)
    assert all(g.dtype == torch.float32 and g.is_contiguous() for g in got)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_non_floating_images_are_refused():
    # a uint8 image (0-255) cast to float would run as if it were normalised: garbage, silently
    fast = optimize_for_inference(danet_ext.DANetHead(32, 3).eval(), precision="float32")
    x = torch.rand(1, 32, 5, 6)
    assert fast(x)[0].shape == (1, 3, 5, 6)
    for bad in ((x * 255).byte(), x > 0.5, x.to(torch.complex64)):
        with pytest.raises(TypeError, match=f"floating-point image batch.*got {bad.dtype}"):
            fast(bad)
    with pytest.raises(TypeError, match="got list"):
        fast([1.0])


def test_choose_precision():
    assert choose_precision("cpu", "float32") == torch.float32
    assert choose_precision("cuda", "auto") == torch.float16
    assert choose_precision("cpu", "auto") == (torch.bfloat16 if hardware.has_fast_bfloat16() else torch.float32)
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("cpu", "int8")


@pytest.fixture(scope="module")
def trained_tiny_model():
    """TinyDANet trained briefly on the synthetic shapes (as the demo does, shorter)."""
    from danet_ext.tools.demo import TinyDANet
    from danet_ext.models import DANetLoss

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    train_x, train_y = make_batch(128, 64, gen)
    model = TinyDANet(len(CLASSES), width=16)
    criterion = DANetLoss(aux_weight=0.4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(120):
        idx = torch.randint(0, len(train_x), (16,), generator=gen)
        loss = criterion(model(train_x[idx]), train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "float32"])  # float32: Winograd convolutions
def test_reduced_precision_keeps_the_predictions(trained_tiny_model, precision, monkeypatch):
    # Winograd for the tiny model's 16 to 64 channels too, in float32 and bfloat16
    monkeypatch.setattr(danet_ext.winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(danet_ext.winograd, "MIN_CHANNELS_BFLOAT16", 1)
    monkeypatch.setattr(danet_ext.winograd, "pays_off_in_bfloat16", lambda: True)
    test_x, test_y = make_batch(32, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = trained_tiny_model(test_x)[0].argmax(1)
    fast = optimize_for_inference(trained_tiny_model, precision=precision)
    assert fast.dtype == getattr(torch, precision)
    assert (fast.winograd_convolutions > 0) == (precision != "float16")
    pred = fast(test_x)[0].argmax(1)
    k = len(CLASSES)
    miou_ref = mean_iou(confusion_matrix(ref, test_y, k))
    miou = mean_iou(confusion_matrix(pred, test_y, k))
    chance = mean_iou(confusion_matrix(torch.zeros_like(test_y), test_y, k))
    assert miou_ref > 2 * chance, "the fixture model did not learn: the guard would prove nothing"
    disagreement = (pred != ref).double().mean().item()
    assert disagreement <= 0.005, f"{disagreement:.4%} of pixels changed class"
    assert abs(miou - miou_ref) <= 0.005, (miou, miou_ref)


def test_compiled_path_matches_the_eager_one():
    torch.manual_seed(0)
    model = randomize_batch_norms(danet_ext.DANetHead(64, 3)).eval()
    x = torch.randn(1, 64, 12, 10)
    eager = optimize_for_inference(model, precision="float32")
    compiled = optimize_for_inference(model, precision="float32", compile=True)
    assert compiled.compiled and not eager.compiled
    for e, c in zip(eager(x), compiled(x)):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


def test_chunk_rule_splits_only_large_spatial_convolutions():
    from danet_ext.inference import _split_chunks

    conv5a = nn.Conv2d(2048, 512, 3, padding=1, bias=False)  # DANet's conv5a/conv5c: 18 MiB in bfloat16
    assert _split_chunks(conv5a, 2) == 4 and _split_chunks(conv5a, 4) == 8
    assert all(c * conv5a.weight.numel() // _split_chunks(conv5a, e) * e <= 8 * 2 ** 20
               for c, e in ((1, 2), (1, 4)))
    assert _split_chunks(nn.Conv2d(512, 512, 3), 2) == 1       # 4.5 MiB: whole
    assert _split_chunks(nn.Conv2d(4096, 1024, 1), 4) == 1     # 1x1: measured no faster split
    assert _split_chunks(nn.Conv2d(2048, 512, 3, groups=2), 4) == 1
    assert _split_chunks(nn.Conv2d(4096, 64, 3), 4) == 1       # chunks of fewer than 64 channels: never


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_split_convolutions_compute_the_same_sums(monkeypatch, dtype):
    from danet_ext import inference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(24, 256, 3, padding=2, dilation=2), nn.ReLU(),
                          nn.Conv2d(256, 128, (3, 1), stride=2, bias=False), nn.Conv2d(128, 8, 1)).eval().to(dtype)
    x = torch.randn(2, 24, 13, 9, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    # each of the two 3x3 weights over the threshold, half of each under it
    monkeypatch.setattr(inference, "SPLIT_CONV_WEIGHT_BYTES", 50_000 * x.element_size())
    assert inference.split_large_convolutions(model) == 2
    assert [len(m.convs) for m in model if isinstance(m, inference.SplitConv2d)] == [2, 2]
    assert type(model[3]) is nn.Conv2d  # 1x1 stays whole
    with torch.no_grad():
        got = model(x.contiguous(memory_format=torch.channels_last))
    tol = 1e-12 if dtype == torch.float64 else 0.0
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol) if tol else \
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.05)


def test_inference_danet_splits_conv5_and_returns_contiguous_float32_logits(monkeypatch):
    """The prepared DANet: conv5a/conv5c in chunks (at a lowered threshold, the small
    model's), the fused output alone, upsampled from the logits in float32."""
    from danet_ext import inference

    torch.manual_seed(0)
    model = randomize_batch_norms(danet_ext.DANet(3, backbone="resnet50", aux=False)).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        expected = model(x)
        calls = []
        model.head.conv6.register_forward_hook(lambda *a: calls.append("conv6"))
        model(x)
        assert calls == [], "eval without aux computed an auxiliary classifier"
    monkeypatch.setattr(inference, "SPLIT_CONV_WEIGHT_BYTES", 2048 * 512 * 9 * 4 // 2)
    fast = optimize_for_inference(model, precision="float32", winograd=False)  # else conv5a/c run Winograd
    assert fast.split_convolutions == 2
    assert isinstance(fast.model.head.conv5a[0], inference.SplitConv2d)
    assert isinstance(fast.model.head.conv5c[0], inference.SplitConv2d)
    got = fast(x)
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    # and in bfloat16: the prepared DANet itself returns float32 NCHW logits, upsampled in float32
    fast16 = optimize_for_inference(model, precision="bfloat16")
    assert fast16.model.output_dtype == torch.float32
    with torch.inference_mode():
        inner = fast16.model(x.bfloat16().contiguous(memory_format=torch.channels_last))
    assert inner.dtype == torch.float32 and inner.is_contiguous()
    got16 = fast16(x)
    torch.testing.assert_close(got16, inner, rtol=0, atol=0)
    assert (got16.argmax(1) != expected.argmax(1)).double().mean() < 0.05


def test_danet_fused_output_is_forwards_first_output():
    torch.manual_seed(0)
    model = randomize_batch_norms(danet_ext.DANet(4, backbone="resnet50", aux=True)).eval()
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        full = model(x)
        model.aux = False
        alone = model(x)
    torch.testing.assert_close(alone, full[0], rtol=0, atol=0)


def _keep_memory_testable() -> str:
    """'' where keep_freed_memory's effect can be counted in page faults, else why not."""
    import os
    import platform

    lib, version = platform.libc_ver()
    if lib != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
        return f"needs glibc >= 2.35 (mmap thresholds over 32 MiB), found {lib} {version}"
    if os.environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in os.environ):
        return "another allocator or glibc tunables are in use"
    return ""


@pytest.mark.skipif(bool(_keep_memory_testable()), reason=_keep_memory_testable() or "testable")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    """After keep_freed_memory(), a freed 64 MiB activation is reused by the next one of
    that size; glibc's default maps it afresh (16384 page faults each, fewer with huge
    pages). A subprocess, so that the process-wide setting stays out of the other tests."""
    import subprocess
    import sys

    code = (
        "import resource, sys, torch\n"
        "from danet_ext.inference import keep_freed_memory\n"
        "if sys.argv[1] == 'keep': assert keep_freed_memory()\n"
        "def faults():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"  # the heap settles after a few (measured: 6)
        "    t = torch.empty(16 << 20).fill_(1.0); del t\n"  # 64 MiB
        "before = faults()\n"
        "for _ in range(4):\n"
        "    t = torch.empty(16 << 20).fill_(1.0); del t\n"
        "print(faults() - before)\n")
    counts = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        counts[mode] = int(out.stdout.split()[-1])
    assert counts["default"] >= 4 * 16, counts  # glibc unmaps and re-faults each block
    assert counts["keep"] < counts["default"] / 4, counts
    with pytest.raises(ValueError, match="max_block_bytes"):
        danet_ext.inference.keep_freed_memory(2 ** 31)

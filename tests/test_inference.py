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


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_reduced_precision_keeps_the_predictions(trained_tiny_model, precision):
    test_x, test_y = make_batch(32, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = trained_tiny_model(test_x)[0].argmax(1)
    fast = optimize_for_inference(trained_tiny_model, precision=precision)
    assert fast.dtype == getattr(torch, precision)
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

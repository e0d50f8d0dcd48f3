"""Official DANet checkpoints and models: strict loading without the backbone's
classifier, load_official_checkpoint, the head's dropout order, accelerate, DANetLoss."""
import copy

import pytest
import torch
from torch import nn

import danet_ext
from danet_ext import DANet, DANetHead, DANetLoss
from danet_ext.checkpoint import CheckpointError
from danet_ext.official import infer_danet_config
from official_modules import OfficialCAM, OfficialHead, OfficialPAM

needs_extension = pytest.mark.skipif(not danet_ext.HAVE_EXTENSION, reason="danet_ext._C is not built")


def randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "gamma" in name else 0.1))
    return module


# ----------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """A DANet-ResNet-50 checkpoint in the official training script's format:
    {'epoch', 'state_dict', 'best_pred'}, DataParallel `module.` keys, no pretrained.fc."""
    torch.manual_seed(0)
    model = DANet(5, backbone="resnet50", deep_stem=True)
    with torch.no_grad():
        model.head.sa.gamma.fill_(0.3)
        model.head.conv8[1].weight.normal_()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert not any(".fc." in k for k in state)
    path = tmp_path_factory.mktemp("ckpt") / "danet50.pth.tar"
    torch.save({"epoch": 240, "state_dict": state, "best_pred": 0.5}, path)
    return path, model


def test_official_keys_and_older_fc_keys_both_load_strictly(official_checkpoint):
    _, model = official_checkpoint
    state = model.state_dict()
    fresh = DANet(5, backbone="resnet50", deep_stem=True)
    assert not hasattr(fresh.pretrained, "fc")
    fresh.load_state_dict(state, strict=True)  # released checkpoints: no pretrained.fc.*
    older = dict(state, **{"pretrained.fc.weight": torch.randn(1000, 2048), "pretrained.fc.bias": torch.randn(1000)})
    result = fresh.load_state_dict(older, strict=True)  # checkpoints from older code: dropped
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.head.conv8[1].weight, model.head.conv8[1].weight)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # other strays are still refused
        fresh.load_state_dict(dict(state, **{"pretrained.extra.weight": torch.zeros(1)}), strict=True)


def test_load_official_checkpoint_infers_the_model(official_checkpoint, capsys):
    path, model = official_checkpoint
    loaded = danet_ext.load_official_checkpoint(str(path))
    printed = capsys.readouterr().out
    assert "num_classes=5" in printed and "backbone='resnet50'" in printed and "deep_stem=True" in printed
    assert "multi_grid=(4, 8, 16)" in printed and "output_stride=8" in printed
    assert isinstance(loaded, DANet) and not loaded.training
    assert [b.conv2.dilation[0] for b in loaded.pretrained.layer4] == [4, 8, 16]
    assert isinstance(loaded.pretrained.conv1, nn.Sequential)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # overrides are DANet keyword arguments and win
    loaded16 = danet_ext.load_official_checkpoint(str(path), output_stride=16, multi_grid=None, aux=False)
    assert [b.conv2.dilation[0] for b in loaded16.pretrained.layer4] == [1, 2, 2] and loaded16.aux is False


def test_load_official_checkpoint_bare_state_dict_and_errors(official_checkpoint, tmp_path):
    path, model = official_checkpoint
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    assert danet_ext.load_official_checkpoint(str(bare)).head.conv8[1].out_channels == 5
    with pytest.raises(CheckpointError, match=r"does not fit DANet\(num_classes=7, backbone=.resnet50., "
                                              r"deep_stem=True, .*the keys show backbone resnet50, 5 classes, deep stem"):
        danet_ext.load_official_checkpoint(str(bare), num_classes=7)
    diverged = tmp_path / "diverged.pth"
    torch.save(dict(model.state_dict(), **{"head.sc.gamma": torch.tensor([float("inf")])}), diverged)
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) hold NaN or infinite values \(head.sc.gamma\)"):
        danet_ext.load_official_checkpoint(str(diverged))
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(CheckpointError, match="cannot tell num_classes"):
        danet_ext.load_official_checkpoint(str(other))


def test_released_danet101_configuration_is_inferred_from_its_keys():
    with torch.device("meta"):
        state = DANet(19, backbone="resnet101").state_dict()  # the released DANet101's key layout
        deep = DANet(150, backbone="resnet152", deep_stem=True).state_dict()
    assert {k: infer_danet_config(state)[k] for k in ("num_classes", "backbone", "deep_stem")} == \
        {"num_classes": 19, "backbone": "resnet101", "deep_stem": False}
    assert {k: infer_danet_config(deep)[k] for k in ("num_classes", "backbone", "deep_stem")} == \
        {"num_classes": 150, "backbone": "resnet152", "deep_stem": True}


# ----------------------------------------------------------------- head order


def test_head_dropout_masks_match_the_official_head_under_one_seed():
    torch.manual_seed(0)
    official = randomize(OfficialHead(128, 5)).train()
    ours = DANetHead(128, 5, backend="reference").train()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(2, 128, 9, 11)
    torch.manual_seed(3)
    expected = official(x)
    torch.manual_seed(3)
    got = ours(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------- accelerate


class LookAlike(nn.Module):
    """The PAM_Module structure with another computation (attention over queries
    instead of keys, as a criss-cross or transposed variant would)."""

    def __init__(self, c):
        super().__init__()
        self.query_conv = nn.Conv2d(c, c // 8, 1)
        self.key_conv = nn.Conv2d(c, c // 8, 1)
        self.value_conv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2)
        k = self.key_conv(x).flatten(2)
        attn = self.softmax(torch.bmm(k.transpose(1, 2), q))  # softmax over queries
        out = torch.bmm(self.value_conv(x).flatten(2), attn.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x


class UserModel(nn.Module):
    """A project that copied the official classes: head plus stray look-alike."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 128, 3, padding=1)
        self.head = OfficialHead(128, 4)
        self.other = LookAlike(32)

    def forward(self, x):
        return self.head(self.stem(x))[0] + self.other(torch.zeros(x.shape[0], 32, *x.shape[2:])).sum()


@pytest.mark.parametrize("backend", [pytest.param("extension", marks=needs_extension), "reference"])
def test_accelerate_swaps_official_modules_in_place(backend, monkeypatch):
    torch.manual_seed(0)
    model = randomize(UserModel()).eval()
    x = torch.randn(2, 3, 12, 10)
    before = model(x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    sa, sc = model.head.sa, model.head.sc

    report = danet_ext.accelerate(model, backend=backend)
    assert report.position_attention == ["head.sa"] and report.channel_attention == ["head.sc"]
    assert [name for name, _ in report.skipped] == ["other"] and len(report) == 2
    assert "head.sa" in str(report)
    assert model.head.sa is sa and isinstance(sa, OfficialPAM) and isinstance(model.head.sc, OfficialCAM)
    assert type(model.other) is LookAlike
    assert dict(model.named_parameters()) == params
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())

    calls = []
    import danet_ext.official as official
    for name in ("position_attention", "channel_attention"):
        real = getattr(official, name)
        monkeypatch.setattr(official, name, lambda *a, _r=real, _n=name, **k: calls.append((_n, k["backend"])) or _r(*a, **k))
    after = model(x)
    assert calls == [("position_attention", backend), ("channel_attention", backend)]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    after.square().mean().backward()
    assert sa.gamma.grad is not None and sa.query_conv.weight.grad.abs().sum() > 0
    danet_ext.set_backend(model, "reference")
    calls.clear()
    model(x)
    assert calls == [("position_attention", "reference"), ("channel_attention", "reference")]
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), model(x))
    # pickled whole (torch.save(model), copies to worker processes): the swapped classes are made
    # at run time, so they are rebuilt from the user's own classes, still swapped
    import pickle

    unpickled = pickle.loads(pickle.dumps(model))
    assert type(unpickled.head.sa) is type(model.head.sa) and isinstance(unpickled.head.sc, OfficialCAM)
    assert unpickled.head.sa._danet_ext_accelerated == "position"
    torch.testing.assert_close(unpickled(x), model(x))
    assert len(danet_ext.accelerate(model)) == 0  # already swapped


def test_accelerate_leaves_other_modules_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), danet_ext.PositionAttention(8))
    report = danet_ext.accelerate(model)
    assert len(report) == 0 and not report.skipped
    with pytest.raises(ValueError, match="backend"):
        danet_ext.accelerate(model, backend="fast")


# ----------------------------------------------------------------- loss


def test_loss_refuses_out_of_range_targets_naming_ignore_index():
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0, 0] = 255
    with pytest.raises(ValueError, match=r"\[255\], outside \[0, 4\) and not ignore_index \(-1\).*ignore_index=255"):
        DANetLoss()((logits, logits, logits), target)
    loss = DANetLoss(ignore_index=255)(logits, target)
    valid = target != 255
    expected = nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="outside"):
        DANetLoss()(logits, torch.full((2, 5, 5), 4))


def test_loss_of_a_fully_ignored_batch_is_zero():
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    target = torch.full((2, 5, 5), -1)
    loss = DANetLoss()((logits, logits * 2, logits * 3), target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))

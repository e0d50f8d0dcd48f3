"""The nn.Modules and the full DANet: backends agree, official checkpoints load."""
import copy
import os
import time
import warnings

import pytest
import torch
from torch import nn

import danet_ext
from danet_ext import ChannelAttention, DANet, DANetHead, DANetLoss, PositionAttention
from danet_ext.models import dilated_resnet, load_torchvision_resnet
from official_modules import OfficialCAM, OfficialPAM  # tests/ is on sys.path

needs_extension = pytest.mark.skipif(not danet_ext.HAVE_EXTENSION, reason="danet_ext._C is not built")


def randomize(module):
    """Non-trivial parameters and BN statistics (gamma starts at 0, which would hide attention)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "gamma" in name else 0.1))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module


def run_backward(module, x):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    out = module(x)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().square().mean() for o in outs).backward()
    return [o.detach() for o in outs], x.grad, {n: p.grad.clone() for n, p in module.named_parameters()
                                                if p.grad is not None}


def assert_same_results(a, b, rtol=1e-4, atol=1e-5):
    (outs_a, gx_a, gp_a), (outs_b, gx_b, gp_b) = a, b
    for oa, ob in zip(outs_a, outs_b):
        torch.testing.assert_close(oa, ob, rtol=rtol, atol=atol)
    torch.testing.assert_close(gx_a, gx_b, rtol=rtol, atol=atol)
    assert gp_a.keys() == gp_b.keys()
    for n in gp_a:
        torch.testing.assert_close(gp_a[n], gp_b[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@needs_extension
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("make", [lambda be: PositionAttention(64, backend=be),
                                  lambda be: ChannelAttention(backend=be),
                                  lambda be: DANetHead(128, 5, backend=be)], ids=["pam", "cam", "head"])
def test_extension_backend_matches_reference(make, train):
    torch.manual_seed(0)
    ext = randomize(make("extension")).train(train)
    ref = make("reference").train(train)
    ref.load_state_dict(ext.state_dict())
    x = torch.randn(2, ext.conv5a[0].in_channels if isinstance(ext, DANetHead) else 64, 9, 11)
    torch.manual_seed(1)  # same dropout masks
    a = run_backward(ext, x)
    torch.manual_seed(1)
    b = run_backward(ref, x)
    assert_same_results(a, b)


def test_official_pam_and_cam_state_dicts_load_and_reproduce_outputs():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 7, 9)
    official_pam = randomize(OfficialPAM(64))
    ours = PositionAttention(64, backend="reference")
    ours.load_state_dict(official_pam.state_dict(), strict=True)
    assert set(ours.state_dict()) == {"query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
                                      "value_conv.weight", "value_conv.bias", "gamma"}
    assert ours.gamma.shape == (1,) and PositionAttention(64).gamma.item() == 0.0
    assert torch.equal(ours(x), official_pam(x))
    official_cam = randomize(OfficialCAM(64))
    ours_cam = ChannelAttention(backend="reference")
    ours_cam.load_state_dict(official_cam.state_dict(), strict=True)
    assert torch.equal(ours_cam(x), official_cam(x))
    if danet_ext.HAVE_EXTENSION:
        torch.testing.assert_close(danet_ext.set_backend(ours, "extension")(x), official_pam(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(danet_ext.set_backend(ours_cam, "extension")(x), official_cam(x),
                                   rtol=1e-5, atol=1e-5)


def official_head_keys():
    keys = set()
    for conv in ("conv5a", "conv5c", "conv51", "conv52"):
        keys |= {f"{conv}.0.weight"} | {f"{conv}.1.{s}" for s in
                                        ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for conv in ("conv6", "conv7", "conv8"):
        keys |= {f"{conv}.1.weight", f"{conv}.1.bias"}
    keys |= {f"sa.{c}.{w}" for c in ("query_conv", "key_conv", "value_conv") for w in ("weight", "bias")}
    keys |= {"sa.gamma", "sc.gamma"}
    return keys


def official_resnet_keys(depths, deep_stem):
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = set()
    if deep_stem:
        keys |= {"conv1.0.weight", "conv1.3.weight", "conv1.6.weight"}
        keys |= {f"conv1.{i}.{s}" for i in (1, 4) for s in bn}
    else:
        keys |= {"conv1.weight"}
    keys |= {f"bn1.{s}" for s in bn}  # no fc: the official BaseNet sets pretrained.fc = None
    for li, blocks in enumerate(depths, start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            keys |= {f"{p}.conv{i}.weight" for i in (1, 2, 3)}
            keys |= {f"{p}.bn{i}.{s}" for i in (1, 2, 3) for s in bn}
            if b == 0:
                keys |= {f"{p}.downsample.0.weight"} | {f"{p}.downsample.1.{s}" for s in bn}
    return keys


@pytest.mark.parametrize("deep_stem", [False, True])
def test_full_model_has_the_official_checkpoint_keys(deep_stem):
    model = DANet(19, backbone="resnet50", deep_stem=deep_stem)
    expected = {f"pretrained.{k}" for k in official_resnet_keys((3, 4, 6, 3), deep_stem)}
    expected |= {f"head.{k}" for k in official_head_keys()}
    assert set(model.state_dict()) == expected
    # a checkpoint with exactly these keys and shapes loads strictly into a fresh model
    clone = DANet(19, backbone="resnet50", deep_stem=deep_stem)
    clone.load_state_dict(randomize(model).state_dict(), strict=True)
    assert torch.equal(clone.head.sa.gamma, model.head.sa.gamma)


def test_dilations_follow_output_stride_and_multi_grid():
    net = dilated_resnet("resnet50", output_stride=8, multi_grid=(4, 8, 16))
    assert [b.conv2.dilation[0] for b in net.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in net.layer4] == [4, 8, 16]
    assert net.layer3[0].conv2.stride == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    assert net.eval().forward_features(x)[3].shape == (1, 2048, 8, 8)
    net16 = dilated_resnet("resnet50", output_stride=16).eval()
    assert net16.forward_features(x)[3].shape == (1, 2048, 4, 4)
    assert [b.conv2.dilation[0] for b in net16.layer4] == [1, 2, 2]
    with pytest.raises(ValueError, match="output_stride"):
        dilated_resnet("resnet50", output_stride=4)
    with pytest.raises(ValueError, match="backbone must be one of"):
        dilated_resnet("resnet18")


def test_load_torchvision_format_backbone(tmp_path):
    src = randomize(dilated_resnet("resnet50"))
    path = tmp_path / "resnet50.pth"
    state = {f"module.{k}": v for k, v in src.state_dict().items()}  # DataParallel-style keys
    # torchvision's file carries the ImageNet classifier, which the backbone drops
    state.update({"module.fc.weight": torch.randn(1000, 2048), "module.fc.bias": torch.randn(1000)})
    torch.save(state, path)
    model = DANet(3, backbone="resnet50")
    load_torchvision_resnet(model.pretrained, str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(model.pretrained.state_dict()[k], v)


def test_load_torchvision_resnet_refuses_what_is_not_a_state_dict(tmp_path):
    from danet_ext.checkpoint import CheckpointError

    model = DANet(3, backbone="resnet50")
    for name, content in (("list.pth", [torch.zeros(1)]), ("strings.pth", {"conv1.weight": "w"})):
        torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{tmp_path / name}"):
            load_torchvision_resnet(model.pretrained, str(tmp_path / name))
    # a whole DANet checkpoint, or another depth: the mismatch in one line, not hundreds of keys
    torch.save(DANet(3, backbone="resnet50").state_dict(), tmp_path / "danet.pth")
    with pytest.raises(CheckpointError, match=r"does not fit this ResNet backbone: \d+ missing .*"
                                              r"its keys start with 'pretrained.'.*load_official_checkpoint"):
        load_torchvision_resnet(model.pretrained, str(tmp_path / "danet.pth"))
    torch.save(dilated_resnet("resnet101").state_dict(), tmp_path / "r101.pth")
    with pytest.raises(CheckpointError, match=r"does not fit this ResNet backbone: \d+ unexpected \(layer3.6"):
        load_torchvision_resnet(model.pretrained, str(tmp_path / "r101.pth"))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_danet_loss_takes_narrow_integer_targets(dtype):
    logits = torch.randn(2, 4, 6, 7)
    target = torch.randint(0, 4, (2, 6, 7))
    assert DANetLoss()(logits, target.to(dtype)) == DANetLoss()(logits, target)
    target[0, 0, 0] = 255  # unlabelled, as VOC marks it, without ignore_index=255
    with pytest.raises(ValueError) as expected:
        DANetLoss()(logits, target)
    with pytest.raises(ValueError) as got:
        DANetLoss()(logits, target.to(dtype))
    assert str(got.value) == str(expected.value) and "pass DANetLoss(ignore_index=255)" in str(got.value)
    assert DANetLoss(ignore_index=255)(logits, target.to(dtype)) == DANetLoss(ignore_index=255)(logits, target)


def test_danet_loss_shape_errors_name_what_was_expected():
    logits, target = torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 4, 4))
    with pytest.raises(ValueError, match=r"takes logits \(B, num_classes, H, W\); the main output has shape \(5, 4, 4\)"):
        DANetLoss()(logits[0], target[0])  # unbatched: shape[1] would have been read as the classes
    with pytest.raises(ValueError, match=r"output 1 has shape \(2, 3, 4, 4\), the main output \(2, 5, 4, 4\)"):
        DANetLoss()((logits, logits[:, :3]), torch.full((2, 4, 4), 4))  # target 4 fits the main output only
    with pytest.raises(ValueError, match=r"target must have shape \(B, H, W\) = \(2, 4, 4\).*got \(2, 4, 5\)"):
        DANetLoss()(logits, torch.zeros(2, 4, 5, dtype=torch.long))
    assert torch.isfinite(DANetLoss()((logits, logits, logits), target))


@pytest.fixture(scope="module")
def small_danet():
    torch.manual_seed(0)
    return randomize(DANet(4, backbone="resnet50")).eval()


def test_full_danet_outputs_and_loss(small_danet):
    x = torch.randn(2, 3, 65, 97)
    model = copy.deepcopy(small_danet).train()
    outs = model(x)
    assert isinstance(outs, tuple) and len(outs) == 3
    assert all(o.shape == (2, 4, 65, 97) for o in outs)
    target = torch.randint(0, 4, (2, 65, 97))
    target[0, :5] = -1  # ignored pixels
    loss = DANetLoss()(outs, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.head.sa.gamma.grad is not None and model.head.sc.gamma.grad is not None
    assert model.pretrained.conv1.weight.grad is not None
    model.aux = False
    single = model.eval()(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 4, 65, 97)
    assert torch.isfinite(DANetLoss()(single, target))


@needs_extension
def test_full_danet_extension_matches_reference_and_channels_last(small_danet):
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        ext = danet_ext.set_backend(copy.deepcopy(small_danet), "extension")(x)
        ref = danet_ext.set_backend(copy.deepcopy(small_danet), "reference")(x)
        cl_model = danet_ext.set_backend(copy.deepcopy(small_danet), "extension").to(memory_format=torch.channels_last)
        cl = cl_model(x.to(memory_format=torch.channels_last))
    for a, b, c in zip(ext, ref, cl):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4)


@needs_extension
def test_full_danet_torch_compile_smoke(small_danet):
    model = danet_ext.set_backend(copy.deepcopy(small_danet), "extension")
    x = torch.randn(1, 3, 33, 41)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for a, b in zip(compiled(x), model(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_tracing_uses_the_reference_path(small_danet):
    head = small_danet.head
    x = torch.randn(1, 2048, 5, 6)
    traced = torch.jit.trace(head, x, check_trace=False)
    graph = str(traced.inlined_graph)
    assert "danet_ext::" not in graph and "aten::bmm" in graph
    with torch.no_grad():
        for a, b in zip(traced(x), head(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_onnx_export_runs_the_reference_and_matches(tmp_path, dynamo):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    head = randomize(DANetHead(128, 3)).eval()  # gamma != 0, so attention shows in the output
    path = tmp_path / "head.onnx"
    x = torch.randn(1, 128, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(head, (x,), str(path), dynamo=dynamo, opset_version=23 if dynamo else 17)
    assert path.stat().st_size > 0
    import onnx

    # 30 positions, one block of queries (ops.EXPORT_QUERY_BLOCK): position attention's softmax
    # over that block and channel attention's C x C one; test_export.py covers several blocks
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Softmax") == 2 and "Attention" not in ops
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), head(x)[0].detach(), rtol=1e-4, atol=1e-4)


def test_sync_batchnorm_conversion():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(DANet(3, backbone="resnet50"))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert isinstance(model.head.sa, PositionAttention)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="in_channels // reduction"):
        PositionAttention(4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ChannelAttention(backend="triton")


def _ddp_worker(rank, world, port, result_path):
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    head = randomize(DANetHead(64, 3)).eval()  # eval: no dropout, fixed BN statistics; gamma != 0
    ddp = nn.parallel.DistributedDataParallel(head)
    x = torch.randn(4, 64, 6, 7)[rank * 2:(rank + 1) * 2]  # each rank half of the batch
    sum(o.square().mean() for o in ddp(x)).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in head.named_parameters()}, result_path)
    # DDP's reducer holds the process group: while `ddp` lives, destroy_process_group()
    # only drops the registry's reference, and gloo's threads are torn down at interpreter
    # exit, where a rank aborted ("terminate called without an active exception") in 11 of
    # 150 runs under torch 2.13 (0 of 150 with `ddp` released first). The barrier keeps a
    # rank from closing its connections while the other still uses them.
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@needs_extension
def test_distributed_data_parallel_matches_single_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "grads.pt")
    workers = mp.spawn(_ddp_worker, args=(2, port, path), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not workers.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the DistributedDataParallel workers did not finish in 300 s")
    ddp_grads = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    head = randomize(DANetHead(64, 3)).eval()
    x = torch.randn(4, 64, 6, 7)
    # DDP averages the two ranks' gradients of their own half-batch losses
    loss = sum(sum(o.square().mean() for o in head(x[i * 2:(i + 1) * 2])) for i in range(2)) / 2
    loss.backward()
    for n, p in head.named_parameters():
        torch.testing.assert_close(ddp_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@needs_extension
def test_head_under_autocast_bfloat16():
    torch.manual_seed(0)
    head = randomize(DANetHead(64, 3)).eval()
    x = torch.randn(2, 64, 9, 11, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = head(x)
    sum(o.float().square().mean() for o in outs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        expected = danet_ext.set_backend(copy.deepcopy(head), "reference")(x)
    for o, e in zip(outs, expected):
        assert o.dtype == torch.bfloat16
        assert (o.float() - e).abs().max() < 0.05 * e.abs().max() + 0.05

"""The command line, the benchmark helpers, the synthetic data and the demo."""
import json
import os
import subprocess
import sys

import pytest
import torch

import danet_ext
from danet_ext.tools import benchmark as bm
from danet_ext.tools.cli import main
from danet_ext.tools.demo import TinyDANet, run_demo
from danet_ext.tools.synthetic import CLASSES, confusion_matrix, make_batch, mean_iou
from conftest import save_tiny_checkpoint


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "danet_ext", *args], capture_output=True, text=True, timeout=timeout)


def test_info_prints_build_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    info, _ = json.JSONDecoder().raw_decode(out)  # the JSON object printed first
    assert set(info["cpu_bfloat16"]) == {"products", "position_attention scores", "channel_attention Gram",
                                         "auto_takes_reference_for"}
    if danet_ext.HAVE_EXTENSION:  # whether the AVX512-BF16 score kernel is in this binary
        assert isinstance(info["cpu_bf16_score_kernel"], bool)
    if "cuda" in info["backends"]:  # which CUDA kernels run which dtype
        assert "TF32" in info["cuda_paths"]["position_attention float32"]
    assert info["runtime_torch_version"] == torch.__version__
    assert "devices visible: cpu" in out


@pytest.mark.skipif(not danet_ext.HAVE_EXTENSION, reason="extension not built")
def test_check_passes_on_cpu(capsys):
    assert main(["check", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "position_attention" in out and "channel_attention" in out
    assert out.strip().splitlines()[-1].endswith("0 failed")


@pytest.mark.parametrize("args,message", [
    (["segment", "--checkpoint", "missing.pt", "--image", "missing.png", "--out", "o.png"], "not found"),
    (["demo", "--steps", "0"], "--steps must be in [1, 10000000], got 0"),
    (["demo", "--size", "1024"], "--size must be in [16, 256], got 1024"),
    (["demo", "--seed", "99999999999999999999"], "--seed must be in [0, 9223372036854775806]"),
    (["demo", "--seed", "-1"], "--seed must be in [0, 9223372036854775806], got -1"),
    (["check", "--device", "cuda"] if not torch.cuda.is_available() else ["check", "--dtype", "float64", "--device", "cuda"],
     "cuda"),
])
def test_errors_are_one_line_without_traceback(args, message):
    res = run_cli(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("danet-ext")]
    assert len(lines) == 1 and message in lines[0], res.stderr


@pytest.fixture(scope="module")
def segment_files(tmp_path_factory):
    """A demo checkpoint (class names stored), an image, and odd files."""
    from PIL import Image

    d = tmp_path_factory.mktemp("segment")
    torch.manual_seed(0)
    model = TinyDANet(len(CLASSES), width=8)
    torch.save({"config": model.config, "state_dict": model.state_dict(), "classes": CLASSES}, d / "tiny.pt")
    Image.fromarray((make_batch(1, 40)[0][0].permute(1, 2, 0) * 255).byte().numpy()).save(d / "img.png")
    Image.fromarray((torch.arange(40 * 40).reshape(40, 40) * 40).int().numpy()).convert("I;16").save(d / "deep.png")
    state = model.state_dict()
    odd = {
        "config_list.pt": {"config": [1, 2], "state_dict": state},
        "int_keys.pt": {"state_dict": {1: torch.zeros(1)}},
        "not_tensor.pt": {"state_dict": {"head.conv8.1.weight": 3}},
        "neg_width.pt": {"config": {"arch": "tiny", "num_classes": 4, "width": -3}, "state_dict": state},
        "four.pt": {"config": {"arch": "tiny", "num_classes": "four"}, "state_dict": state},
        "huge_width.pt": {"config": {"arch": "tiny", "num_classes": 4, "width": 4096}, "state_dict": state},
        "no_stem.pt": {"config": {"arch": "tiny", "num_classes": 4, "width": 4096},
                       "state_dict": {k: v for k, v in state.items() if k != "pretrained.0.0.weight"}},
        "diverged.pt": {"config": model.config, "classes": CLASSES,
                        "state_dict": dict(state, **{"head.sa.gamma": torch.tensor([float("nan")])})},
        # a DANet state dict in outline: ResNet-50 blocks, 5 classes
        "danet50.pt": {f"pretrained.layer{i}.{b}.conv1.weight": torch.zeros(1)
                       for i, n in enumerate((3, 4, 6, 3), 1) for b in range(n)}
                      | {"head.conv8.1.weight": torch.zeros(5, 512, 1, 1)},
    }
    for name, obj in odd.items():
        torch.save(obj, d / name)
    (d / "notes.txt").write_text("not a checkpoint\n")
    (d / "afile").write_text("x")
    (d / "adir").mkdir()
    return d


SEGMENT_ERRORS = [
    (["--checkpoint", "{d}/config_list.pt"], "'config' must be a dict"),
    (["--checkpoint", "{d}/int_keys.pt"], "keys must be strings, found 1"),
    (["--checkpoint", "{d}/not_tensor.pt"], "'head.conv8.1.weight' is a int, not a tensor"),
    (["--checkpoint", "{d}/neg_width.pt"], "config['width'] must be an integer in [1, 4096], got -3"),
    (["--checkpoint", "{d}/four.pt"], "config['num_classes'] must be an integer in [1, 10000], got 'four'"),
    (["--checkpoint", "{d}/huge_width.pt"],
     "config['width'] is 4096, but the weights are of width 8 (pretrained.0.0.weight has 8 output channels)"),
    (["--checkpoint", "{d}/no_stem.pt"], "a TinyDANet checkpoint needs 'pretrained.0.0.weight'"),
    (["--checkpoint", "{d}/notes.txt"], "is not a readable PyTorch checkpoint"),
    (["--checkpoint", "{d}/diverged.pt"], "diverged.pt: 1 tensor(s) hold NaN or infinite values (head.sa.gamma)"),
    (["--checkpoint", "{d}/adir"], "--checkpoint {d}/adir is a directory"),
    (["--num-classes", "1000000000"], "--num-classes must be in [1, 10000]"),
    (["--num-classes", "7"], "does not fit 7 classes: its keys show 4 classes; try --num-classes 4"),
    (["--window", "1"], "--window must be in [32, 16384], got 1"),
    (["--out", "{d}/adir"], "--out {d}/adir is a directory"),
    (["--out", "{d}/adir/"], "is a directory"),
    (["--out", "{d}/afile/overlay.png"], "--out: {d}/afile is a file"),
    (["--out", "{d}/overlay"], "must end in an image extension"),
    (["--out", "{d}/overlay.pt"], "got .pt"),
    (["--image", "{d}/adir"], "--image {d}/adir is a directory"),
    (["--image", "{d}/notes.txt"], "--image {d}/notes.txt: not a readable image"),
    (["--image", "{d}/deep.png"], "--image {d}/deep.png: mode I;16 (16- or 32-bit greyscale) is not supported"),
    (["--out", "{d}/adir/../img.png"], "--out {d}/adir/../img.png is the --image file itself"),
    (["--checkpoint", "{d}/danet50.pt", "--backbone", "resnet101"],
     "does not fit backbone resnet101: its keys show backbone resnet50, 5 classes; try --backbone resnet50"),
    (["--checkpoint", "{d}/danet50.pt"], "does not fit DANet(5, backbone=resnet50"),
]


@pytest.mark.parametrize("overrides,message", SEGMENT_ERRORS, ids=[m[:28] for _, m in SEGMENT_ERRORS])
def test_segment_input_errors_are_one_line(segment_files, overrides, message):
    d = str(segment_files)
    args = {"--checkpoint": f"{d}/tiny.pt", "--image": f"{d}/img.png", "--out": f"{d}/out/overlay.png"}
    extra = []
    for i in range(0, len(overrides), 2):
        if overrides[i] in args:
            args[overrides[i]] = overrides[i + 1].format(d=d)
        else:
            extra += [overrides[i], overrides[i + 1]]
    res = run_cli("segment", *[x for kv in args.items() for x in kv], *extra, timeout=120)
    assert res.returncode == 2, res
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("danet-ext")]
    assert len(lines) == 1 and message.format(d=d) in lines[0], res.stderr
    if "does not fit DANet" in message:  # whole key names, counted, never cut mid-name
        assert "missing (" in lines[0] and "more)" in lines[0]
    assert not os.path.exists(f"{d}/out/overlay.png")


def test_segment_never_writes_over_its_image(segment_files, tmp_path):
    from danet_ext.tools.segment import segment_file

    photo = tmp_path / "photo.png"
    photo.write_bytes((segment_files / "img.png").read_bytes())
    (tmp_path / "sub").mkdir()
    os.symlink(photo, tmp_path / "link.png")
    for out in (photo, tmp_path / "sub" / ".." / "photo.png", tmp_path / "link.png"):
        with pytest.raises(ValueError, match="is the --image file itself"):
            segment_file(str(segment_files / "tiny.pt"), str(photo), str(out))
    assert photo.read_bytes() == (segment_files / "img.png").read_bytes()


def test_segment_turns_phone_photos_upright(tmp_path):
    """An image whose EXIF orientation says "rotate 90 degrees clockwise" is segmented
    as a copy of it stored upright is."""
    from PIL import Image

    from danet_ext.tools.segment import segment_file

    save_tiny_checkpoint(tmp_path / "tiny.pt", num_classes=4)
    pixels = (make_batch(1, 48)[0][0, :, :, :40].permute(1, 2, 0) * 255).byte().numpy()  # 48 high, 40 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    Image.open(tmp_path / "phone.jpg").transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    for name in ("phone.jpg", "upright.png"):
        segment_file(str(tmp_path / "tiny.pt"), str(tmp_path / name), str(tmp_path / f"{name}.out.png"),
                     precision="float32")
    phone, upright = (Image.open(tmp_path / f"{n}.out.png") for n in ("phone.jpg", "upright.png"))
    assert phone.size == upright.size and phone.height >= 40  # the canvas holds the 40 x 48 (w x h) image
    assert phone.tobytes() == upright.tobytes()


def test_evaluate_and_export_report_os_errors_in_one_line(monkeypatch, tmp_path, capsys):
    from danet_ext.tools import evaluate, export

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.png"))

    monkeypatch.setattr(evaluate, "evaluate_folder", fail)
    monkeypatch.setattr(export, "export_checkpoint", fail)
    (tmp_path / "tiny.pt").write_bytes(b"x")
    for args in (["evaluate", "--data", str(tmp_path), "--out", str(tmp_path / "e")],
                 ["export", "--out", str(tmp_path / "m.onnx")]):
        assert main([*args, "--checkpoint", str(tmp_path / "tiny.pt")]) == 2
        assert capsys.readouterr().err == f"danet-ext: error: {tmp_path / 'locked.png'}: Permission denied\n"
        # a folder given as the checkpoint is called a folder, not 'not found'
        assert main([*args, "--checkpoint", str(tmp_path)]) == 2
        assert capsys.readouterr().err == f"danet-ext: error: --checkpoint {tmp_path} is a directory; give one file\n"


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_bench_and_demo_out_that_cannot_be_created(tmp_path, command):
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "afile" / "sub", "is a file"), (tmp_path / "afile", "is a file, not a folder")):
        res = run_cli(command, "--out", str(out), timeout=120)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        lines = [l for l in res.stderr.strip().splitlines() if l.startswith("danet-ext")]
        assert len(lines) == 1 and message in lines[0] and "--out" in lines[0], res.stderr


def test_segment_writes_an_overlay_with_a_legend_and_unpainted_background(segment_files, tmp_path):
    from PIL import Image

    d = segment_files
    out = tmp_path / "sub" / "overlay.png"
    res = run_cli("segment", "--checkpoint", str(d / "tiny.pt"), "--image", str(d / "img.png"), "--out", str(out),
                  "--window", "32", "--flip", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "model: TinyDANet(4, width=8)" in res.stdout
    import numpy as np

    result = torch.from_numpy(np.asarray(Image.open(out).convert("RGB")).copy())
    height, width = result.shape[:2]
    assert width > 40 and height >= 40  # the legend sits right of the image
    assert (result[:, 40:] != 255).any()  # and has something drawn in it
    image = torch.from_numpy(np.asarray(Image.open(d / "img.png").convert("RGB")).copy())
    # recompute the labels the command used
    from danet_ext.tools.segment import load_model, predict

    model = load_model(str(d / "tiny.pt"))
    assert model.class_names == list(CLASSES)
    labels = predict(model, image.permute(2, 0, 1).float() / 255, window=32, flip=True, normalize=False).argmax(0)
    background = labels == 0
    assert background.any()
    assert torch.equal(result[:40, :40][background], image[background])  # background unpainted
    if (~background).any():
        assert not torch.equal(result[:40, :40][~background], image[~background])


def test_segment_legend_lists_present_classes_by_name():
    from danet_ext.tools.segment import CITYSCAPES, background_index, legend_entries

    labels = torch.tensor([[0, 2], [2, 3]])
    names = ["background", "circle", "square", "triangle"]
    bg = background_index(names, "cityscapes")
    assert bg == 0
    assert legend_entries(labels, names, CITYSCAPES, bg) == [("background", None), ("square", CITYSCAPES[2]),
                                                            ("triangle", CITYSCAPES[3])]
    assert background_index(None, "voc") == 0 and background_index(None, "cityscapes") is None


class PaddingSensitive(torch.nn.Module):
    """Probabilities from a wide zero-padded average: pixels near a window's border
    see the padding, the way a CNN's do, so plain averaging leaves seams."""

    def forward(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 15, stride=1, padding=7, count_include_pad=True)
        return (pooled * 6,)


def test_sliding_window_leaves_no_seams():
    from danet_ext.tools.segment import predict

    torch.manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16), size=(150, 200), mode="bilinear")[0]
    model = PaddingSensitive()
    whole = predict(model, image, window=512, normalize=False)
    windowed = predict(model, image, window=96, normalize=False)
    assert windowed.shape == whole.shape == (3, 150, 200)
    interior = (slice(None), slice(8, -8), slice(8, -8))  # away from the image's own border
    err = (windowed - whole)[interior].abs()
    # plain averaging of the windows is off by more than 0.1 along the window borders
    assert err.max() < 0.03, err.max()
    # and no line of pixels stands out: the error varies smoothly
    jump = (windowed[:, :, 1:] - windowed[:, :, :-1]).abs().amax(dim=(0, 1))
    jump_whole = (whole[:, :, 1:] - whole[:, :, :-1]).abs().amax(dim=(0, 1))
    assert (jump - jump_whole).max() < 0.01


def test_every_option_has_help_with_its_default():
    import argparse

    from danet_ext.tools.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
                assert "%(default)" in sub.formatter_class(name)._get_help_string(action) or action.required, \
                    f"{name} {action.option_strings} does not show its default"
    bench_help = " ".join(run_cli("bench", "--help").stdout.split())
    assert "(default: bench-out)" in bench_help and "about 3 minutes" in bench_help
    assert "(default: 512)" in " ".join(run_cli("segment", "--help").stdout.split())
    assert "pixels, 16 to 256 (" in " ".join(run_cli("demo", "--help").stdout.split())


def test_synthetic_data_and_miou():
    images, labels = make_batch(4, 48, torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 48, 48) and labels.shape == (4, 48, 48)
    assert 0 <= images.min() and images.max() <= 1
    assert set(labels.unique().tolist()) <= set(range(len(CLASSES))) and labels.max() > 0
    conf = confusion_matrix(labels, labels, len(CLASSES))
    assert conf.sum() == labels.numel() and mean_iou(conf) == 1.0
    wrong = confusion_matrix(torch.zeros_like(labels), labels, len(CLASSES))
    assert mean_iou(wrong) < 1.0


@pytest.mark.skipif(not danet_ext.HAVE_EXTENSION, reason="extension not built")
def test_demo_learns_well_above_chance(tmp_path):
    result = run_demo(out_dir=str(tmp_path), steps=150, batch=8, size=64, compare=False)
    assert result["miou"] > 2 * result["chance_miou"], result
    for name in ("demo_predictions.png", "tiny_danet.pt", "sample.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_peak_memory_sees_a_known_allocation():
    if not bm.cpu_peak_tracking_available():
        pytest.skip("no /proc/self/clear_refs")
    n = 16 * 2**20
    peak = bm.peak_memory(lambda: torch.ones(n // 4), "cpu")
    assert n <= peak < 2 * n


def test_timings_after_a_memory_measurement_reuse_heap_pages():
    """peak_memory mmaps every block of 64 KiB and more while it measures; afterwards the
    allocator must be back at a steady state, or every later timed call would page-fault
    its buffers afresh (time no user's process spends)."""
    import resource
    if not bm.cpu_peak_tracking_available():
        pytest.skip("no /proc/self/clear_refs")
    bm.peak_memory(lambda: torch.ones(2**20), "cpu")
    for _ in range(10):  # the heap's layout settles within a few allocations (measured: up to six)
        torch.empty(2**20).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(2**20).fill_(1)  # 4 MiB: 1024 pages, each faulted again if it were mmapped
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2000, f"{faults} page faults for 20 reused 4 MiB buffers"


def test_time_call_times_at_the_steady_state():
    """A process's first timings must run at the same allocator state as those after a memory
    measurement: time_call sets it, so buffers of 64 KiB and more are reused, not mmapped and
    page-faulted afresh on every call as in the state peak_memory measures in."""
    import resource
    from danet_ext import allocator
    allocator.mallopt(allocator.M_MMAP_THRESHOLD, 64 << 10)  # the measuring state, to be left
    faults = []

    def call():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(2**20).fill_(1)  # 4 MiB: 1024 pages
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    bm.time_call(call, "cpu", repeats=20, warmup=10)
    assert sum(faults[-20:]) < 2000, f"{sum(faults[-20:])} page faults for 20 timed 4 MiB buffers"


@pytest.mark.skipif(not danet_ext.HAVE_EXTENSION, reason="extension not built")
def test_benchmark_outputs(tmp_path):
    results = bm.bench_position_attention([(8, 8)], Cq=4, C=8, repeats=1)
    results += bm.bench_channel_attention([(8, 8)], channels=(8,), repeats=1)
    assert {r.impl for r in results} == {"danet_ext", "reference", "reference_compiled", "sdpa", "sdpa_8head"}
    assert all(r.seconds and r.seconds > 0 for r in results)
    files = bm.write_results(results, str(tmp_path), bm.machine_info())
    data = json.loads(open(files[1]).read())
    assert data["machine"]["cores"] == os.cpu_count() and len(data["results"]) == len(results)
    assert set(data["machine"]["isa"]) <= set(danet_ext.hardware.ISA_FLAGS)  # the ISA flags are recorded
    assert "speed-up" in bm.format_table(results)
    png = bm.plot_results(results, str(tmp_path), "position_attention", "test", "pam")
    assert png and os.path.getsize(png) > 0


def test_non_finite_outputs_are_an_error_not_class_0():
    # a model whose output overflows (or whose weights went NaN after loading): the argmax of NaN
    # probabilities is class 0 everywhere, which segment and evaluate must never report
    from danet_ext.tools.segment import predict

    class Overflowing(torch.nn.Module):
        dtype = torch.float16

        def forward(self, x):
            out = x[:, :2] * 1e6
            out[:, :, 3, 4] = float("inf")
            return (out,)

    image = torch.rand(3, 20, 24)
    with pytest.raises(ValueError, match=r"NaN or infinite values in float16 \(try --precision float32\)"):
        predict(Overflowing(), image, window=32, normalize=False)
    finite = predict(lambda x: (x[:, :2],), image, window=32, normalize=False)
    assert torch.isfinite(finite).all() and finite.shape == (2, 20, 24)

"""`danet-ext demo`: train a small DANet from scratch on synthetic shapes with the
extension backend, show what it learned, then compare the backends' speed and memory."""
from __future__ import annotations

import os
import sys
import time
from typing import Dict

import torch
from torch import nn
from torch.nn import functional as F

from . import benchmark as bm
from ..models.danet import UP_KWARGS, DANetLoss
from ..nn import DANetHead
from .synthetic import CLASSES, confusion_matrix, make_batch, mean_iou


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyDANet(nn.Module):
    """DANet's full head on a small backbone (output stride 8, 4 x width channels),
    small enough to train on a laptop CPU in minutes."""

    def __init__(self, num_classes: int, width: int = 32, backend: str = "auto"):
        super().__init__()
        w = width
        self.pretrained = nn.Sequential(
            _conv_bn_relu(3, w, 2), _conv_bn_relu(w, w),
            _conv_bn_relu(w, 2 * w, 2), _conv_bn_relu(2 * w, 2 * w),
            _conv_bn_relu(2 * w, 4 * w, 2), _conv_bn_relu(4 * w, 4 * w, dilation=2),
        )
        self.head = DANetHead(4 * w, num_classes, backend=backend)
        self.config = {"arch": "tiny", "num_classes": num_classes, "width": width}

    def forward(self, x):
        outs = self.head(self.pretrained(x))
        return tuple(F.interpolate(o, size=x.shape[2:], **UP_KWARGS) for o in outs)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(images[i:i + 16])[0].argmax(1) for i in range(0, len(images), 16)])
    return mean_iou(confusion_matrix(pred, labels, num_classes))


def save_grid(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, path: str, miou: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#202020", "#e6553a", "#3cb44b", "#4363d8"])
    model.eval()
    with torch.no_grad():
        pred = model(images)[0].argmax(1)
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 6.3))
    for i in range(n):
        axes[0, i].imshow(images[i].permute(1, 2, 0).numpy())
        axes[1, i].imshow(labels[i].numpy(), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        axes[2, i].imshow(pred[i].numpy(), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        for r in range(3):
            axes[r, i].axis("off")
    for r, name in enumerate(("image", "ground truth", "prediction")):
        axes[r, 0].set_title(name, loc="left", fontsize=9)
    fig.suptitle(f"danet-ext demo: DANet head on synthetic shapes ({', '.join(CLASSES)}), held-out mIoU {miou:.3f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(out_dir: str = "demo-out", steps: int = 400, batch: int = 16, size: int = 96, seed: int = 0,
             compare: bool = True) -> Dict[str, float]:
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    num_classes = len(CLASSES)
    print(f"generating synthetic data ({', '.join(CLASSES)}) ...", flush=True)
    train_x, train_y = make_batch(512, size, gen)
    test_x, test_y = make_batch(96, size, torch.Generator().manual_seed(seed + 1))
    conf = confusion_matrix(torch.zeros_like(test_y), test_y, num_classes)
    chance = mean_iou(conf)

    model = TinyDANet(num_classes, backend="extension" if _have_kernel() else "auto")
    criterion = DANetLoss(aux_weight=0.4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    running_conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    bar = tqdm(range(steps), desc="training TinyDANet", file=sys.stderr, dynamic_ncols=True)
    for step in bar:
        model.train()
        idx = torch.randint(0, len(train_x), (batch,), generator=gen)
        x, y = train_x[idx], train_y[idx]
        if torch.rand((), generator=gen) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        outs = model(x)
        loss = criterion(outs, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running_conf = (running_conf * 9) // 10 + confusion_matrix(outs[0].argmax(1), y, num_classes)
        bar.set_postfix(loss=f"{loss.item():.3f}", mIoU=f"{mean_iou(running_conf):.3f}")
    bar.close()
    train_seconds = time.perf_counter() - start
    miou = evaluate(model, test_x, test_y, num_classes)
    print(f"trained {steps} steps of batch {batch} at {size}x{size} in {train_seconds:.0f} s "
          f"({train_seconds / steps * 1e3:.0f} ms/step)")
    print(f"held-out mIoU: {miou:.3f}   (chance, all background: {chance:.3f})")
    grid = os.path.join(out_dir, "demo_predictions.png")
    save_grid(model, test_x[:6], test_y[:6], grid, miou)
    ckpt = os.path.join(out_dir, "tiny_danet.pt")
    torch.save({"config": model.config, "state_dict": model.state_dict(), "classes": CLASSES}, ckpt)
    _save_sample(test_x[0], os.path.join(out_dir, "sample.png"))
    print(f"wrote {grid}, {ckpt}, {os.path.join(out_dir, 'sample.png')}")
    fast = compare_inference(model, test_x, test_y, num_classes)
    from .segment import segment_file

    overlay = segment_file(ckpt, os.path.join(out_dir, "sample.png"), os.path.join(out_dir, "overlay.png"))
    print(f"segmented {os.path.join(out_dir, 'sample.png')} through the same path: wrote {overlay}")
    if compare:
        compare_backends()
    return {"miou": miou, "chance_miou": chance, "train_seconds": train_seconds, **fast}


def compare_inference(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      num_classes: int) -> Dict[str, float]:
    """The trained model as trained (eager float32) against optimize_for_inference
    (auto precision): held-out mIoU and time per image, on the same images."""
    from ..inference import optimize_for_inference

    fast = optimize_for_inference(model, keep_memory=True)
    rows = {}
    for name, run in (("eager float32", model), (f"optimized {str(fast.dtype).replace('torch.', '')}", fast)):
        model.eval()
        with torch.no_grad():
            run(images[:16])  # warm-up
            start = time.perf_counter()
            pred = torch.cat([run(images[i:i + 16])[0].argmax(1) for i in range(0, len(images), 16)])
            seconds = time.perf_counter() - start
        rows[name] = (mean_iou(confusion_matrix(pred, labels, num_classes)), seconds / len(images) * 1e3)
    print("\ninference on the held-out images (danet_ext.optimize_for_inference: BatchNorm folded, "
          "channels_last, the precision this CPU runs fastest):")
    for name, (m, ms) in rows.items():
        print(f"  {name:<20} mIoU {m:.3f}   {ms:6.1f} ms/image")
    (m0, t0), (m1, t1) = rows.values()
    print(f"  speed-up {t0 / t1:.2f}x, mIoU change {m1 - m0:+.4f}")
    return {"fast_miou": m1, "fast_speedup": t0 / t1}


def _have_kernel() -> bool:
    from ..ops import kernel_unavailable_reason

    return kernel_unavailable_reason(torch.device("cpu"), torch.float32) is None


def _save_sample(image: torch.Tensor, path: str) -> None:
    from PIL import Image

    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


def compare_backends() -> None:
    """Position attention at DANet's sizes: the kernel against the official code."""
    from tqdm import tqdm

    if not _have_kernel():
        print("no compiled kernels: skipping the backend comparison")
        return
    sizes = [(48, 48), (96, 96)]
    print("\nposition attention, B=1, Cq=64, C=512 (DANet's head at 2048 backbone channels), float32:")
    with tqdm(total=len(sizes) * 2 * 2, desc="comparing backends", file=sys.stderr) as bar:
        results = bm.bench_position_attention(sizes, impls=("danet_ext", "reference"), repeats=2, progress=bar)
    print(bm.format_table(results))
    print("(speed-up: reference time / danet_ext time; mem ratio: danet_ext peak extra memory / reference's)")

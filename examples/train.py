"""Train DANet with the official recipe, on a folder dataset or the synthetic shapes.

Defaults follow the DANet paper's training: SGD (momentum 0.9, weight decay 1e-4),
poly learning rate with power 0.9, 10x learning rate on the head, cross-entropy
summed over the three outputs, random scale (0.5-2.0) / crop / flip.

    # one process (CPU or one GPU)
    python examples/train.py --data synthetic --arch tiny --iters 200
    python examples/train.py --data /path/to/cityscapes --layout cityscapes --backbone resnet101 \
        --pretrained-backbone resnet101.pth --crop 768 --batch 8 --amp
    # several GPUs: DistributedDataParallel + SyncBatchNorm through torchrun
    torchrun --nproc_per_node 4 examples/train.py --data /path/to/voc --layout voc --amp
    # resume
    python examples/train.py ... --resume runs/danet/last.pt

Folder layouts: `voc`: JPEGImages/*.jpg with SegmentationClass/*.png (index PNGs,
255 = ignore) and ImageSets/Segmentation/train.txt; `cityscapes`:
leftImg8bit/train/*/*_leftImg8bit.png with gtFine/train/*/*_gtFine_labelTrainIds.png
(255 = ignore).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import danet_ext
from danet_ext.checkpoint import load_checkpoint_file
from danet_ext.tools.demo import TinyDANet
from danet_ext.models import DANet, DANetLoss, load_torchvision_resnet
from danet_ext.tools.datasets import FolderSegmentation
from danet_ext.tools.synthetic import CLASSES, confusion_matrix, make_batch, mean_iou

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
IGNORE = 255


class SyntheticSegmentation(Dataset):
    def __init__(self, length: int = 2000, size: int = 160, seed: int = 0):
        self.length, self.size, self.seed = length, size, seed

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        images, labels = make_batch(1, self.size, torch.Generator().manual_seed(self.seed * 100003 + i))
        return images[0], labels[0]


def augment(image: torch.Tensor, label: torch.Tensor, crop: int, scale_range=(0.5, 2.0)):
    """Random scale, pad to the crop size (label: ignore), random crop, random flip."""
    s = random.uniform(*scale_range)
    h, w = image.shape[1:]
    nh, nw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
    y0 = random.randint(0, image.shape[1] - crop)
    x0 = random.randint(0, image.shape[2] - crop)
    image, label = image[:, y0:y0 + crop, x0:x0 + crop], label[y0:y0 + crop, x0:x0 + crop]
    if random.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    return image, label


def collate(crop: int, normalize: bool):
    def fn(batch):
        pairs = [augment(img, lab, crop) for img, lab in batch]
        images = torch.stack([p[0] for p in pairs])
        if normalize:
            images = (images - MEAN) / STD
        return images, torch.stack([p[1] for p in pairs])
    return fn


def poly_lr(base: float, it: int, total: int, power: float = 0.9) -> float:
    return base * (1 - it / total) ** power


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder")
    p.add_argument("--layout", choices=["voc", "cityscapes"], default="voc")
    p.add_argument("--num-classes", type=int, default=None, help="default: 4 (synthetic), 21 (voc), 19 (cityscapes)")
    p.add_argument("--arch", choices=["danet", "tiny"], default="danet")
    p.add_argument("--backbone", choices=["resnet50", "resnet101"], default="resnet101")
    p.add_argument("--pretrained-backbone", default=None, help="torchvision-format ImageNet ResNet state dict")
    p.add_argument("--multi-grid", action="store_true", help="layer4 dilations (4, 8, 16)")
    p.add_argument("--crop", type=int, default=None, help="default 768 (cityscapes), 480 (voc), 128 (synthetic)")
    p.add_argument("--batch", type=int, default=8, help="per process")
    p.add_argument("--iters", type=int, default=None, help="total iterations (default: --epochs x batches)")
    p.add_argument("--epochs", type=int, default=240)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--head-lr-mult", type=float, default=10.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="runs/danet")
    p.add_argument("--resume", default=None)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, local_rank = 0, 0
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    synthetic = args.data == "synthetic"
    dataset = SyntheticSegmentation() if synthetic else FolderSegmentation(args.data, args.layout)
    num_classes = args.num_classes or (len(CLASSES) if synthetic else {"voc": 21, "cityscapes": 19}[args.layout])
    from danet_ext.tools.segment import CITYSCAPES_CLASSES, VOC_CLASSES

    class_names = CLASSES if synthetic else {"voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES}[args.layout]
    crop = args.crop or (128 if synthetic else {"voc": 480, "cityscapes": 768}[args.layout])

    if args.arch == "tiny":
        model = TinyDANet(num_classes)
    else:
        model = DANet(num_classes, backbone=args.backbone, multi_grid=(4, 8, 16) if args.multi_grid else None)
        if args.pretrained_backbone:
            load_torchvision_resnet(model.pretrained, args.pretrained_backbone)
    if distributed and device.type == "cuda":
        # SyncBatchNorm runs on GPUs only; CPU processes keep per-process BatchNorm statistics.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    backbone_params = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.SGD([{"params": backbone_params, "lr_mult": 1.0},
                                 {"params": head_params, "lr_mult": args.head_lr_mult}],
                                lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if distributed else model
    criterion = DANetLoss(aux_weight=args.aux_weight, ignore_index=IGNORE)
    sampler = DistributedSampler(dataset, shuffle=True) if distributed else None
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        num_workers=args.workers, collate_fn=collate(crop, normalize=args.arch != "tiny"),
                        persistent_workers=args.workers > 0)
    total = args.iters or args.epochs * len(loader)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)

    start_iter = 0
    if args.resume:
        state = load_checkpoint_file(args.resume, map_location=device)  # weights_only: never runs code
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_iter = state["iter"]
        if rank == 0:
            print(f"resumed from {args.resume} at iteration {start_iter}")
    os.makedirs(args.out, exist_ok=True)

    def save(path, it):
        if rank == 0:
            config = dict(getattr(model, "config", {"arch": "danet", "num_classes": num_classes,
                                                    "backbone": args.backbone,
                                                    "multi_grid": (4, 8, 16) if args.multi_grid else None}))
            if class_names is not None and len(class_names) == num_classes:
                config["classes"] = list(class_names)  # `danet-ext segment` writes them in its legend
            torch.save({"config": config,
                        "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "iter": it}, path)

    from tqdm import tqdm

    bar = tqdm(total=total, initial=start_iter, desc="training", disable=rank != 0, file=sys.stderr)
    it, epoch = start_iter, 0
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    t0 = time.perf_counter()
    while it < total:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for images, labels in loader:
            if it >= total:
                break
            lr = poly_lr(args.lr, it, total)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                outputs = ddp_model(images)
                loss = criterion(tuple(o.float() for o in outputs), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            it += 1
            with torch.no_grad():
                conf = (conf * 9) // 10 + confusion_matrix(outputs[0].argmax(1).cpu(), labels.cpu(), num_classes,
                                                           ignore_index=IGNORE)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", mIoU=f"{mean_iou(conf):.3f}")
            if it % args.save_every == 0:
                save(os.path.join(args.out, "last.pt"), it)
        epoch += 1
    bar.close()
    save(os.path.join(args.out, "last.pt"), it)
    if rank == 0:
        print(f"{it} iterations in {time.perf_counter() - t0:.0f} s; running train mIoU {mean_iou(conf):.3f}; "
              f"checkpoint {os.path.join(args.out, 'last.pt')}")
    if distributed:
        # DDP's reducer holds the process group; released first, the group is torn down
        # here rather than at interpreter exit, where gloo's threads can abort the process.
        # The barrier keeps a rank from closing its connections while another (rank 0,
        # after writing the checkpoint) is still behind.
        del ddp_model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return mean_iou(conf)


if __name__ == "__main__":
    main()

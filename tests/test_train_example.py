"""examples/train.py runs end to end (synthetic data, tiny model) and resumes."""
import importlib.util
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_example", os.path.join(ROOT, "examples", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_runs_saves_and_resumes(tmp_path):
    train = load_train_module()
    common = ["--data", "synthetic", "--arch", "tiny", "--batch", "4", "--crop", "64", "--workers", "0",
              "--out", str(tmp_path), "--lr", "0.02"]
    train.main(common + ["--iters", "4", "--save-every", "2"])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["iter"] == 4 and ckpt["config"]["arch"] == "tiny"
    train.main(common + ["--iters", "6", "--resume", str(tmp_path / "last.pt")])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iter"] == 6


def test_train_runs_distributed_on_two_cpu_processes(tmp_path):
    # torchrun, two processes on the CPU (gloo, GPUs hidden): DistributedDataParallel,
    # the distributed sampler, rank 0 saving, and a clean teardown of the process group
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(tmp_path / "logs"),
           os.path.join(ROOT, "examples", "train.py"), "--data", "synthetic", "--arch", "tiny", "--batch", "2",
           "--crop", "64", "--workers", "0", "--iters", "2", "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers on SIGTERM (they run in their own sessions)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        raise AssertionError("torchrun did not finish in 300 s:\n" + output[-3000:])
    assert proc.returncode == 0, output[-6000:]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["iter"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_augment_and_poly_lr():
    train = load_train_module()
    image, label = torch.rand(3, 40, 50), torch.randint(0, 4, (40, 50))
    img, lab = train.augment(image, label, crop=64)
    assert img.shape == (3, 64, 64) and lab.shape == (64, 64)
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3, train.IGNORE}
    assert train.poly_lr(0.01, 0, 100) == 0.01 and train.poly_lr(0.01, 100, 100) == 0.0
    assert 0 < train.poly_lr(0.01, 50, 100) < 0.01

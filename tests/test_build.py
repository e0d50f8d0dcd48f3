"""What was compiled, and how the package behaves without or with a stale build."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import danet_ext
from danet_ext import _build

OPS = ["position_attention_forward", "position_attention_backward",
       "channel_attention_forward", "channel_attention_backward"]


def test_build_info_reports_the_compiled_backends():
    info = danet_ext.build_info()
    assert info["runtime_torch_version"] == torch.__version__
    if not danet_ext.HAVE_EXTENSION:
        pytest.skip("extension not built")
    assert info["extension"] is True
    assert "cpu" in info["backends"]
    assert info["torch_version"] == torch.__version__
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"danet_ext::{op}", "CPU")
    if "cuda" in info["backends"]:
        assert info["cuda_version"] == torch.version.cuda
        assert "9.0" in info["cuda_arch_list"] or "90" in info["cuda_arch_list"] or os.environ.get("TORCH_CUDA_ARCH_LIST")


@pytest.mark.skipif("DANET_EXT_EXPECT_CUDA" not in os.environ, reason="set DANET_EXT_EXPECT_CUDA=0/1 to check")
def test_cuda_kernels_compiled_as_expected():
    expect = os.environ["DANET_EXT_EXPECT_CUDA"] == "1"
    info = danet_ext.build_info()
    assert ("cuda" in info["backends"]) == expect, info
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"danet_ext::{op}", "CUDA") == expect


def test_stale_build_is_refused_with_a_rebuild_hint():
    _build.check_built_against(torch.__version__, torch.__version__)
    with pytest.raises(_build.StaleBuildError, match="rebuild it with: pip install --no-build-isolation"):
        _build.check_built_against("1.0.0", torch.__version__)


def test_without_extension_the_reference_runs_after_one_warning_each():
    code = (
        "import sys, warnings\n"
        "sys.modules['danet_ext._C'] = None  # makes `from danet_ext import _C` fail\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, danet_ext\n"
        "    x = torch.randn(1, 4, 3, 3)\n"
        "    out = danet_ext.channel_attention(x)\n"
        "    out2 = danet_ext.position_attention(x, x, x)\n"
        "assert not danet_ext.HAVE_EXTENSION\n"
        "assert torch.allclose(out, danet_ext.reference.channel_attention(x))\n"
        "assert torch.allclose(out2, danet_ext.reference.position_attention(x, x, x))\n"
        "msgs = [str(m.message) for m in w if 'danet_ext' in str(m.message)]\n"
        "# one warning at import, one at the first op that falls back; the second op is silent\n"
        "assert len(msgs) == 2 and 'not available' in msgs[0] and 'channel_attention runs' in msgs[1], msgs\n"
        "print('ok', len(msgs))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configures_against_the_installed_torch(tmp_path):
    """The C++ library's configure step needs only libtorch's CPU libraries, also
    for a CUDA build of torch (whose TorchConfig.cmake demands the CUDA toolkit's
    libraries); a build folder reconfigured for another libtorch follows it."""
    root = os.path.dirname(torch.__file__)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = tmp_path / "build"

    def configure(torch_root):
        return subprocess.run(["cmake", "-S", src, "-B", str(build), f"-DTORCH_ROOT={torch_root}"],
                              capture_output=True, text=True, timeout=300)

    res = configure(root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"libtorch {torch.__version__} (CPU libraries)" in res.stdout
    config = (build / "generated" / "build_config.h").read_text()
    assert f'DANET_EXT_TORCH_VERSION "{torch.__version__}"' in config and "DANET_EXT_WITH_CUDA 0" in config
    res = configure(tmp_path / "no-torch-here")  # the cached paths are not reused
    assert res.returncode != 0 and "libtorch not found" in res.stderr

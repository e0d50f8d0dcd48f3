"""Builds the CUDA emulation of danet_ext's kernels (emulated_ops.cpp) with the
host C++ compiler, as a small torch extension, and loads it.

    load()                        the plain build (poisoned shared memory, barrier/warp checks)
    build_only("asan" | "tsan")   AddressSanitizer / ThreadSanitizer builds; import_built()
                                  imports one in a process started with the sanitizer runtime
                                  preloaded (sanitizer_env()): the tests run them in a
                                  subprocess (tests/cuda_emulation/sanitized_run.py)
    load(mutations={...})         a build of a mutated copy of csrc/cuda, for the tests that
                                  check that a broken kernel is caught

Objects go to build/cuda_emulation/<variant>; ninja rebuilds only what changed.
"""
import hashlib
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC_CUDA = os.path.join(ROOT, "csrc", "cuda")

SANITIZER_FLAGS = {
    "plain": [],
    "asan": ["-fsanitize=address", "-fno-omit-frame-pointer"],
    "tsan": ["-fsanitize=thread"],
}


def _mutated_tree(mutations):
    """A copy of csrc/ with textual replacements {file: [(old, new), ...]} applied
    (each `old` must occur). Returns the path of its cuda/ folder."""
    key = hashlib.sha1(repr(sorted((f, tuple(r)) for f, r in mutations.items())).encode()).hexdigest()[:12]
    dest = os.path.join(ROOT, "build", "cuda_emulation", "mutant-src-" + key)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(os.path.join(ROOT, "csrc"), dest)
    for name, replacements in mutations.items():
        path = os.path.join(dest, "cuda", name)
        text = open(path).read()
        for old, new in replacements:
            if old not in text:
                raise ValueError(f"mutation target not found in {name}: {old!r}")
            text = text.replace(old, new)
        open(path, "w").write(text)
    return os.path.join(dest, "cuda"), key


def _config(variant, mutations):
    cuda_dir = CSRC_CUDA
    name = f"danet_cuda_emulation_{variant}"
    if mutations:
        cuda_dir, key = _mutated_tree(mutations)
        name += "_mutant_" + key
    build_dir = os.path.join(ROOT, "build", "cuda_emulation", name)
    os.makedirs(build_dir, exist_ok=True)
    opt = "-O1" if variant != "plain" else "-O2"
    flags = [opt, "-g", "-DDANET_CUDA_EMULATION", "-Wno-unknown-pragmas", "-pthread"] + SANITIZER_FLAGS[variant]
    return dict(name=name, sources=[os.path.join(HERE, "emulated_ops.cpp")],
                extra_include_paths=[cuda_dir, HERE], extra_cflags=flags,
                extra_ldflags=SANITIZER_FLAGS[variant] + ["-pthread"], build_directory=build_dir)


def load(variant="plain", mutations=None, verbose=False):
    """Builds (if needed) and imports. A sanitizer build can only be imported in a
    process that preloads the sanitizer runtime: use build_only() + import_built() there."""
    from torch.utils import cpp_extension

    return cpp_extension.load(verbose=verbose, **_config(variant, mutations))


def build_only(variant, verbose=False):
    """Compiles and links without importing (the sanitizer builds cannot be imported
    into a process started without their runtime)."""
    from torch.utils import cpp_extension

    c = _config(variant, None)
    cpp_extension._write_ninja_file_and_build_library(
        c["name"], c["sources"], c["extra_cflags"], None, None, c["extra_ldflags"], c["extra_include_paths"],
        c["build_directory"], verbose, with_cuda=False, with_sycl=False)
    return os.path.join(c["build_directory"], c["name"] + ".so")


def import_built(variant):
    """Imports a build made by build_only()."""
    import importlib.util

    import torch  # noqa: F401  (the extension links against torch's libraries)

    c = _config(variant, None)
    path = os.path.join(c["build_directory"], c["name"] + ".so")
    spec = importlib.util.spec_from_file_location(c["name"], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sanitizer_runtime(variant):
    """Path of the compiler's libasan/libtsan, to LD_PRELOAD into Python."""
    lib = {"asan": "libasan.so", "tsan": "libtsan.so"}[variant]
    cxx = os.environ.get("CXX", "c++")
    path = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"{cxx} has no {lib}")
    return os.path.realpath(path)


def sanitizer_env(variant):
    env = dict(os.environ)
    env["LD_PRELOAD"] = sanitizer_runtime(variant)
    if variant == "asan":
        # Python and torch leak by design at exit; stop at the first real error.
        env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=23"
    else:
        env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66:report_signal_unsafe=0"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, env.get("PYTHONPATH", "")] if p)
    return env


if __name__ == "__main__":
    variant = sys.argv[1] if len(sys.argv) > 1 else "plain"
    if variant == "plain":
        load(variant, verbose=True)
    else:
        print(build_only(variant, verbose=True))

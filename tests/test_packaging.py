"""`pip install .` declares what the package imports at run time."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow"}


def third_party_imports():
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "danet_ext")):
        for name in files:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(folder, name)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in ("danet_ext", "__future__")}


def test_install_requires_covers_every_runtime_import(tmp_path):
    res = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, DANET_EXT_NO_CUDA="1"))
    assert res.returncode == 0, res.stderr
    requires = (tmp_path / "danet_ext.egg-info" / "requires.txt").read_text().split()
    declared = {r.split(">")[0].split("=")[0].split("<")[0].lower() for r in requires if not r.startswith("[")}
    imports = third_party_imports()
    assert {"torch", "tqdm", "matplotlib", "PIL"} <= imports  # the scan sees the CLI's lazy imports
    missing = {DISTRIBUTION.get(m, m).lower() for m in imports} - declared
    assert not missing, f"imported but not in install_requires: {missing}"
    assert "numpy" in declared  # torch's tensor <-> array conversions and segment's image I/O


def test_the_library_does_not_import_the_tools():
    """danet_ext/tools/ (CLI, benchmarks, demo, segment) sits on the library, never under it."""
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "danet_ext")):
        if os.path.join("danet_ext", "tools") in folder:
            continue
        for name in files:
            if not name.endswith(".py") or name == "__main__.py":
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read())):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
                if (module and "tools" in module.split(".")) or any("tools" in n.split(".") for n in names):
                    offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, offenders

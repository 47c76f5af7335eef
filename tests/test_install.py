"""memtrain installed as a cluster user installs it: sdist -> wheel -> a fresh environment, run from elsewhere.

The sdist is built from the tracked files only, the wheel from the unpacked sdist (so both must be complete),
and the wheel is installed with ``--no-deps`` into a new virtual environment whose only other packages are
this environment's dependencies (through a ``.pth`` line, which does not run this environment's editable-install
hook). Every command then runs from a directory outside the checkout, with no PYTHONPATH.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=600):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


def _tracked_files() -> list[str]:
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT)
        return [f for f in listed.split("\0") if f and (ROOT / f).is_file()]
    skip = {".venv", "runs", "data", "build", "__pycache__", ".pytest_cache"}
    return [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)
    ]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from the sdist of a copy of the tracked source tree."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    for rel in _tracked_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    sdist = (
        _run([sys.executable, "-c", "from setuptools import build_meta as b; print(b.build_sdist('dist'))"], src)
        .strip()
        .splitlines()[-1]
    )
    with tarfile.open(src / "dist" / sdist) as tar:
        tar.extractall(tmp / "sdist", filter="data")
    (unpacked,) = (tmp / "sdist").iterdir()
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            tmp / "wheels",
            unpacked,
        ],
        tmp,
    )
    (whl,) = (tmp / "wheels").glob("memtrain-*.whl")
    return whl


def test_wheel_holds_the_whole_program(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"memtrain/{p.relative_to(ROOT / 'memtrain').as_posix()}" for p in (ROOT / "memtrain").rglob("*.py")}
    expected |= {f"memtrain/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    expected |= {f"memtrain/configs/{p.relative_to(ROOT / 'yaml').as_posix()}" for p in (ROOT / "yaml").rglob("*.yaml")}
    expected |= {f"memtrain/slurm/{p.name}" for p in (ROOT / "slurm").iterdir() if p.is_file()}
    expected |= {"memtrain/data/demo/demo-corpus.parquet", "memtrain/data/demo/ATTRIBUTION.md"}
    assert sorted(expected - names) == []
    assert not [n for n in names if n.split("/")[0] not in ("memtrain",) and ".dist-info/" not in n]
    meta = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    requires = {
        ln.split(":", 1)[1].strip().split(";")[0].replace(" ", "")
        for ln in meta.splitlines()
        if ln.startswith("Requires-Dist:")
    }
    for dep in ("torch", "transformers", "mosaicml-streaming", "sentencepiece", "pydantic"):
        assert any(r.lower().startswith(dep) for r in requires), f"{dep} missing from the wheel's dependencies"
    for extra in ("deepspeed", "hf", "cloud", "kernels"):
        assert f"Provides-Extra: {extra}" in meta


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "env"
    _run([sys.executable, "-m", "venv", env_dir], tmp_path)
    py = env_dir / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).strip())
    (site / "memtrain-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # torch, streaming, ...
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEMTRAIN_COMMIT")}
    memtrain = env_dir / "bin" / "memtrain"

    where = _run(
        [py, "-c", "import memtrain, memtrain.kernels.dispatch as d; print(memtrain.__file__, d.__file__)"], work, env
    )
    assert str(ROOT) not in where and where.count(str(site)) == 2, where
    assert _run([memtrain, "--version"], work, env).strip() == "memtrain 0.1.0"
    assert "paper/memory_mixer_e512_d512" in _run([memtrain, "configs", "list"], work, env)
    _run([memtrain, "data", "prepare-demo", "--out", "D", "--row-len", "32"], work, env)
    out = _run(
        [
            memtrain,
            "train",
            "tiny",
            "--set",
            "data.shards=D/shards",
            "--set",
            "train.steps=3",
            "--set",
            "run.out_dir=R",
        ],
        work,
        env,
    )
    assert "| tiny | causal |" in out
    assert (work / "R" / "checkpoints").is_dir() or any((work / "R").rglob("model.safetensors"))
    script = _run([memtrain, "submit", "tiny", "--dry-run", "--workdir", "J"], work, env)
    assert "#SBATCH --job-name=tiny" in script and "memtrain_finish" in script


def test_the_kernels_folder_is_inert_under_its_top_level_name():
    """From the repository root, ``kernels/`` is also a top-level ``kernels``, the name of an unrelated package
    that transformers 5 probes for by importing it and reading ``__version__``: the probe must find no version
    and no error (an error there broke ``import transformers`` for every ``python -m memtrain`` run)."""
    probe = (
        "import importlib, importlib.util; "
        "assert importlib.util.find_spec('kernels') is not None; "
        "k = importlib.import_module('kernels'); "
        "assert getattr(k, '__version__', 'N/A') == 'N/A' and not [n for n in vars(k) if not n.startswith('__')]; "
        "import memtrain.kernels.dispatch; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr

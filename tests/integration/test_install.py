"""Installing the project as users do (issue 16).

* The declared dependencies resolve beside PyPI's CUDA torch 2.11 and 2.13 wheels on Linux x86_64 for Python 3.11
  and 3.12, with the pipeline and hf extras (and the test extra once), and each torch keeps the triton it pins
  (what `triton==3.9.*` in the core deps broke).
  pip's own resolver with ``--platform``/``--python-version`` and ``--dry-run --report`` reads wheel metadata only
  (PEP 658 files, or HTTP range requests into the wheel where an index has none), never the 500 MB wheels.
* ``pip install longlive`` (no extras) is enough to pull a release and stream video from it: ``longlive pull`` and
  ``longlive generate --checkpoint <release>`` run in a fresh venv that holds only the core dependencies' closure
  (linked from this environment, so nothing is downloaded), without Prefect, DVC, great-expectations, wandb,
  webdataset, s3fs or pandas.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from longlive.cli import main
from longlive.config import load_preset

from _tiny_models import save_tiny_base

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYPI = "https://pypi.org/simple"

# ----------------------------------------------------------------------------- resolution against CUDA torch

TORCH = {"2.11": "3.6.", "2.13": "3.7."}   # torch series -> the triton series its CUDA wheels pin (3.6.0, 3.7.1)
PYTHONS = ("3.11", "3.12")
# What users install beside their torch; the developer's `test` extra (pytest, moto, peft: nothing that depends on
# the torch or Python version) joins once, with the newest pair. Its moto -> boto3 against s3fs -> aiobotocore's
# narrow botocore range makes pip backtrack through ~50 boto3/aiobotocore releases: a minute of resolver CPU per
# resolution, which four of would cost CI minutes for no more coverage.
USER_EXTRAS, ALL_EXTRAS = "pipeline,hf", "pipeline,test,hf"
ALL_EXTRAS_WITH = ("2.13", "3.12")


def extras(torch_series: str, python: str) -> str:
    return ALL_EXTRAS if (torch_series, python) == ALL_EXTRAS_WITH else USER_EXTRAS


# torch's wheels are manylinux_2_28, its dependencies' as old as manylinux2014 (2_17), and pip expands only the
# legacy manylinux2014/2010 aliases itself: every glibc in between is named, as a glibc-2.28 system accepts them.
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in range(28, 16, -1)] + ["manylinux2014_x86_64"]
# Dependencies published only as a source distribution, which pip cannot build for a --platform target. Each is
# pure Python (its wheel is py3-none-any, the same on every platform), so it is built here and offered beside
# the index. antlr4-python3-runtime 4.9.*: hydra-core's pin (dvc -> hydra-core); only its 4.11+ has wheels.
SDIST_ONLY = ["antlr4-python3-runtime==4.9.3"]


def pypi_unreachable() -> str | None:
    try:
        urllib.request.urlopen(f"{PYPI}/pip/", timeout=5).close()
    except (urllib.error.URLError, OSError) as e:
        return f"PyPI ({PYPI}) unreachable from this machine: {e}"
    return None


def pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # --isolated: no pip.conf, no PIP_* variables, so no local find-links, CPU wheels or constraint files of this
    # machine take part: the test is about PyPI's own wheels
    return subprocess.run([sys.executable, "-m", "pip", "--isolated", *args], capture_output=True, text=True,
                          timeout=timeout)


def project_wheel(out: Path) -> Path:
    """The project's wheel, built from a copy of its packages (the metadata users install; pip cannot resolve a
    source tree for another platform, and building in place would leave build/ in the checkout)."""
    src = out / "src"
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    dirs = {p.name for p in ROOT.iterdir() if p.is_dir() and any(fnmatch.fnmatch(p.name, pat) for pat in find)}
    dirs |= set(PYPROJECT["tool"]["setuptools"].get("package-dir", {}).values())
    for name in sorted(dirs):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", PYPROJECT["project"]["readme"]):
        shutil.copy2(ROOT / name, src / name)
    # --no-build-isolation: this environment's setuptools (torch requires one), no download of another
    r = pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out / "dist"), str(src))
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (out / "dist").glob("longlive-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return project_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def resolutions(wheel, tmp_path_factory):
    """Starts one `pip install --dry-run --report` per (torch, python) at once, so their HTTP waits overlap; each
    test collects its own."""
    if reason := pypi_unreachable():
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("resolve")
    links = tmp / "sdist-only"
    r = pip("wheel", "--no-deps", "--no-build-isolation", "--index-url", PYPI, "-w", str(links), *SDIST_ONLY)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = {}
    for torch_series in TORCH:
        for python in PYTHONS:
            report = tmp / f"torch{torch_series}-py{python}.json"
            log = report.with_suffix(".log").open("w")
            cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed",
                   "--report", str(report), "--index-url", PYPI, "--find-links", str(links),
                   # metadata by HTTP range requests where an index serves no PEP 658 file (PyPI serves them)
                   "--use-feature=fast-deps",
                   "--only-binary=:all:", *(f"--platform={p}" for p in PLATFORMS),
                   "--python-version", python, "--implementation", "cp",
                   f"torch=={torch_series}.*", f"{wheel}[{extras(torch_series, python)}]"]
            runs[torch_series, python] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), report, log)
    yield runs
    for proc, _, log in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("torch_series", list(TORCH))
def test_resolves_beside_cuda_torch(resolutions, torch_series, python):
    proc, report, log = resolutions[torch_series, python]
    try:
        rc = proc.wait(timeout=800)   # under pytest-timeout's 900 s, to say where the log is
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip still resolving after 800 s: see {log.name}")
    log.flush()
    text = Path(log.name).read_text()
    wanted = extras(torch_series, python)
    assert rc == 0, f"longlive[{wanted}] does not install beside torch=={torch_series}.* on Python {python}:\n" \
                    + text[-4000:]
    installs = {canonicalize_name(i["metadata"]["name"]): i for i in json.loads(report.read_text())["install"]}
    version = {name: i["metadata"]["version"] for name, i in installs.items()}
    torch = installs["torch"]
    torch_wheel = torch["download_info"]["url"].rsplit("/", 1)[-1]
    # PyPI's Linux torch is the CUDA build: a manylinux wheel without a +cpu local version, pinning CUDA libraries
    # and its own triton
    assert version["torch"].startswith(f"{torch_series}.") and "+" not in version["torch"], version["torch"]
    assert f"cp{python.replace('.', '')}" in torch_wheel and "manylinux" in torch_wheel, torch_wheel
    requires = [Requirement(r) for r in torch["metadata"]["requires_dist"]]
    assert any(r.name.startswith(("nvidia-", "cuda-")) for r in requires), f"{torch_wheel} is not a CUDA build"
    (pin,) = [str(r.specifier) for r in requires if r.name == "triton"]
    assert pin == f"=={version['triton']}" and version["triton"].startswith(TORCH[torch_series]), (pin, version["triton"])
    expected = ["longlive", "diffusers", "transformers", "accelerate", "prefect", "dvc", "wandb", "great-expectations",
                "webdataset", "s3fs", "pandas", "scipy", "ray", "av", "scenedetect", "peft", "huggingface-hub"]
    for name in expected + (["pytest", "moto", "scikit-video"] if "test" in wanted else []):
        assert name in version, f"{name} missing from the resolution of longlive[{wanted}]"
    print(f"[{wanted}] torch {version['torch']} + python {python}: triton {version['triton']}, "
          f"{len(version)} packages (transformers {version['transformers']}, kernels {version.get('kernels')}, "
          f"prefect {version['prefect']}, dvc {version['dvc']})")


# ----------------------------------------------------------------------------- the `kernels` import name


def test_kernels_is_hugging_faces_and_ours_is_longlive_kernels(wheel):
    """`kernels` is Hugging Face's distribution, which transformers >= 5.25 imports; our top-level kernels/ folder
    imports as `longlive_kernels`, from an install (the wheel maps the name) and from the checkout (whose kernels/
    has no __init__.py, so it can never shadow theirs)."""
    names = zipfile.ZipFile(wheel).namelist()
    assert "longlive_kernels/rope.py" in names and not [n for n in names if n.startswith("kernels/")], names
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = "import kernels, longlive_kernels.rope as r, transformers; print(kernels.__file__); print(r.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    theirs, ours = map(Path, r.stdout.split())
    assert ours == ROOT / "kernels" / "rope.py"
    assert theirs.resolve() == Path(md.distribution("kernels").locate_file("kernels/__init__.py")).resolve()


# ----------------------------------------------------------------------------- the core install streams video

PIPELINE_ONLY = ("prefect", "dvc", "great_expectations", "wandb", "webdataset", "s3fs", "pandas")   # import names


def core_closure() -> dict[str, md.Distribution]:
    """The installed distributions that `pip install longlive` (no extras) brings: pyproject's dependencies and,
    recursively, theirs (with the extras each one asks for), markers evaluated for this interpreter."""
    site = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    installed = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions(path=sorted(site))}
    found: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()   # (distribution, extra) already expanded; "" is its base requirements
    todo = [(Requirement(r), "") for r in PYPROJECT["project"]["dependencies"]]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name not in installed:
            pytest.fail(f"{req} (a core dependency) is not installed in {sys.prefix}: run scripts/setup.sh")
        found[name] = installed[name]
        for want in {"", *req.extras} - {e for n, e in done if n == name}:
            done.add((name, want))
            todo += [(Requirement(r), want) for r in installed[name].requires or []]
    return found


def core_venv(venv: Path) -> Path:
    """A fresh venv whose site-packages links exactly the core closure's files from this environment."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", scheme="venv", vars={"base": str(venv), "platbase": str(venv)}))
    linked = set()
    for name, dist in core_closure().items():
        if dist.files is None:
            pytest.fail(f"{name} has no RECORD: cannot tell its files apart")
        for f in dist.files:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top in linked:
                continue
            src = Path(dist.locate_file(top))
            if src.exists():
                (site / top).symlink_to(src)
                linked.add(top)
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> str:
    """A published release of random tiny models in a local folder store."""
    tmp = tmp_path_factory.mktemp("release")
    base = save_tiny_base(load_preset("tiny"), tmp / "base")
    url = str(tmp / "store")
    assert main(["publish", "--url", url, "--checkpoint", f"t2v={base / 'dit'}", "--base", str(base),
                 "--version", "core-1", "--preset", "tiny", "--work-dir", str(tmp / "work"), "--quiet"]) == 0
    return f"{url}/core-1"


def test_core_install_pulls_and_generates_without_the_pipeline(release, tmp_path):
    python = core_venv(tmp_path / "venv")

    def run(*args: str) -> subprocess.CompletedProcess:
        # the checkout is the working directory, so `-m longlive.cli` imports it as an installed longlive would
        r = subprocess.run([str(python), *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONNOUSERSITE": "1"})
        assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    r = run("-c", f"import importlib.util as u; print([n for n in {PIPELINE_ONLY} if u.find_spec(n)])")
    assert r.stdout.strip() == "[]", f"the core venv has pipeline packages: {r.stdout}"
    assert "usage: longlive pull" in run("-m", "longlive.cli", "pull", "--help").stdout
    pulled, out = tmp_path / "pulled", tmp_path / "out" / "video.mp4"
    run("-m", "longlive.cli", "pull", release, "--dest", str(pulled), "--quiet")
    run("-m", "longlive.cli", "generate", "--checkpoint", str(pulled / "checkpoints" / "t2v"),
        "--prompt", "a red circle moves left", "--seconds", "0.5", "--out", str(out))
    assert out.stat().st_size > 1000 and out.read_bytes()[4:8] == b"ftyp"   # an MP4 container
    assert json.loads(out.with_suffix(".json").read_text())["preset"] == "tiny"

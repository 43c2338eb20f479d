#!/usr/bin/env bash
# Wheels the GPU image lacks, for the device tool's `carry` (run HERE, on the CPU machine, before a GPU call):
# ortools and pydantic, so launch/gemm_check.py solves Twill's plan on the GPU machine itself (live solve and
# time to configuration) instead of falling back to its PRECOMPUTED knobs. The image runs CPython 3.12 on x86-64
# and already holds numpy, absl-py, pandas, rich, pyyaml; protobuf and typing_extensions come along because
# ortools / pydantic pin newer ones than an image may hold.
# Usage: bash launch/fetch_gpu_wheels.sh   -> .whl/ (git-ignored, ~33 MB); then `run` with carry [".whl"]:
#        launch/gpu_session.sh installs them into /tmp/site when ../.whl holds any.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# into a fresh folder, swapped in only when every download succeeded: a failed fetch keeps the previous set (it
# deleted it first, leaving none or some just before a lease); a fresh folder, not .whl itself, so a re-fetch never
# leaves two versions of one package (the whole install then fails on the GPU)
rm -rf .whl.new
mkdir -p .whl.new
# exact versions, the ones constraints.txt pins here (ranges let a later fetch pick others)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl.new \
  "ortools==9.15.6755" "protobuf==6.33.6" "immutabledict==4.3.1" \
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
  "typing-extensions==4.16.0"
rm -rf .whl
mv .whl.new .whl
ls -la .whl
du -sh .whl

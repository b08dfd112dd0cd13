#!/usr/bin/env bash
# The wheels scripts/device-check.sh installs on a lent GPU machine, fetched here (that
# machine has no network): what protoserve needs beyond what its image has (torch 2.11
# with CUDA, numpy, httpx, prometheus-client, pytest, uvloop ...), for its Python 3.12 on
# x86-64 Linux, pinned to the versions the tests run with here, and protoserve's own wheel. Into .whl/ (git-ignored),
# which the device run carries (about 20 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# grpcio 1.85 and protobuf 7 (the generated stubs refuse older ones), grpc's health,
# reflection and status, the gateway's server stack, and the JSON log formatter.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
  grpcio-status==1.85.3 protobuf==7.36.2 googleapis-common-protos==1.76.0 \
  starlette==1.10.0 uvicorn==0.55.0 Hypercorn==0.18.0 h2==4.4.1 hpack==4.2.0 \
  hyperframe==6.1.0 priority==2.0.0 wsproto==1.3.2 python-json-logger==4.2.0
# protoserve itself, built here: that machine then needs no build backend (pyproject's
# license form needs setuptools 77 or later, which its image may not have).
python3 -m pip wheel -q --no-deps -w .whl .
du -sh .whl

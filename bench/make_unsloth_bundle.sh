#!/usr/bin/env bash
# Builds .device/uns.tar.xz: Unsloth and the dependencies the lent GPU machine's image lacks, unpacked for
# Python 3.12 / x86_64, for the Unsloth arms of bench/unsloth_grid.py and bench/quant.py (issue 25). The versions
# are the ones that ran there on 2026-11-30 (bench/results/quant-2026-11-30.md). Unsloth's own web studio is
# dropped (a training run never imports it). On the device, unpack beside the other bundle and point the arms at it:
#   mkdir -p /tmp/uns && tar -C /tmp/uns -xJf .device/uns.tar.xz && export FITRUN_UNSLOTH_PATH=/tmp/uns
set -euo pipefail
out=${1:-.device}
pkgs="unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 torchao==0.17.0 cut_cross_entropy==25.1.1
tyro==1.0.3 docstring_parser==0.17.0 typeguard==4.4.4 shtab==1.7.2 msgspec==0.19.0 hf_transfer==0.1.9
json5==0.12.1 nest_asyncio==1.6.0 structlog==25.4.0"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plat=""
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64; do
  plat="$plat --platform $p"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $plat -d "$tmp/whl" $pkgs
mkdir -p "$tmp/site"
for w in "$tmp"/whl/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
rm -rf "$tmp/site/studio"
find "$tmp/site" -name '__pycache__' -prune -exec rm -rf {} +
mkdir -p "$out"
tar -C "$tmp/site" -cJf "$out/uns.tar.xz" .
ls -la "$out/uns.tar.xz"

#!/usr/bin/env bash
# The wheels slm needs on a machine with no package index whose image already brings the current stack's
# large parts (torch, torchvision, transformers 5, tokenizers, huggingface-hub, numpy, torchmetrics, tqdm,
# pyarrow), as a typical GPU image does (docs/gpu.md): Composer, Streaming and the small packages around them,
# at the versions of stacks/current.txt. Run in the repository root, on a machine that reaches PyPI:
#
#   bash stacks/offline-wheels.sh [PYTHON_VERSION]      (default 3.12: the target's Python, not this one's)
#
# Writes .whl/ (about 20 MB). There: pip install --no-index --no-deps --target DIR .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
lock=stacks/current.txt
pinned() {  # NAME... -> NAME==VERSION as the lock pins it
    local name line
    for name in "$@"; do
        line=$(grep -m1 -i -E "^${name}==" "$lock") || { echo "offline-wheels: $name is not in $lock" >&2; exit 1; }
        echo "${line%% *}"
    done
}
platform=(--only-binary=:all: --python-version "$python_version" --implementation cp --platform any
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf .whl && mkdir .whl
# 1. what would drag torch or transformers along: without dependencies
python3 -m pip download -q --no-deps "${platform[@]}" -d .whl \
    $(pinned mosaicml mosaicml-streaming mambapy torch-optimizer pytorch-ranger omegaconf)
# 2. small packages, with theirs; where the locked release has no wheel for the target, its newest that has one
for package in mosaicml-cli coolname catalogue python-snappy zstd brotli importlib-metadata py-cpuinfo psutil xxhash; do
    python3 -m pip download -q "${platform[@]}" -d .whl "$(pinned "$package")" 2>/dev/null ||
        { echo "offline-wheels: no $(pinned "$package") wheel for Python $python_version: the newest with one"
          python3 -m pip download -q "${platform[@]}" -d .whl "$package"; }
done
# what such an image has already keeps its own version
for have in torch numpy nvidia_ triton anyio certifi charset_normalizer idna markdown_it_py mdurl multidict \
            propcache protobuf pygments python_dateutil pyyaml requests rich typing_extensions urllib3 yarl zipp; do
    rm -f .whl/"${have}"-* .whl/"${have}"*-*.whl
done
du -sh .whl

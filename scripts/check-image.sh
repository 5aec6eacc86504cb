#!/usr/bin/env bash
# Offline check of deploy/Dockerfile's runtime stage, for machines with no Docker daemon or
# image registry (docs/operations.md#image). A Debian rootfs from debootstrap stands in for
# debian:<suite>-slim; deploy/check_runtime_stage.py replays the stage's RUN / COPY / ENV /
# USER lines in a chroot with this machine's PyTorch wheel and binaries, then checks, as the
# image's user, that nothing is missing: no compiler, every library resolves, the binaries
# run and decode a fixture. Needs root (chroot, bind mounts) and the Debian mirror.
#
#   bash scripts/check-image.sh                      # builds the release binaries first
#   bash scripts/check-image.sh --bin-dir target/debug
#
# Not part of the test suite: it downloads a base system (~40 s) and mounts file systems.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bin_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin-dir) bin_dir=$2; shift 2 ;;
        *) echo "check-image.sh: unknown argument $1 (expected --bin-dir DIR)" >&2; exit 2 ;;
    esac
done
[[ $(id -u) == 0 ]] || { echo "check-image.sh: needs root (chroot and bind mounts)" >&2; exit 2; }

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v patchelf >/dev/null || need+=(patchelf)
if [[ ${#need[@]} -gt 0 ]]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

bash scripts/prepare.sh
if [[ -z $bin_dir ]]; then
    cargo build --release -p trainer -p rollout-worker
    bin_dir=${CARGO_TARGET_DIR:-target}/release
fi

suite=$(sed -n 's/^ARG DEBIAN=//p' deploy/Dockerfile)
[[ -n $suite ]] || { echo "check-image.sh: deploy/Dockerfile has no ARG DEBIAN=" >&2; exit 1; }
work=$(mktemp -d /tmp/grpo-image.XXXXXX)
cleanup() {
    # The replay unmounts what it bound; -l covers an interrupted run.
    grep " $work/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

cache=${XDG_CACHE_HOME:-$HOME/.cache}/grpo-rs/rootfs-$suite-minbase.tar
if [[ ! -f $cache ]]; then
    echo "debootstrap --variant=minbase $suite (cached in $cache)"
    debootstrap --variant=minbase "$suite" "$work/base" http://deb.debian.org/debian >"$work/debootstrap.log" \
        || { tail -20 "$work/debootstrap.log"; exit 1; }
    mkdir -p "$(dirname "$cache")"
    tar -C "$work/base" -cf "$cache.tmp" . && mv "$cache.tmp" "$cache"
    rm -rf --one-file-system "$work/base"
fi
mkdir "$work/rootfs"
tar -C "$work/rootfs" -xf "$cache"

python3 deploy/check_runtime_stage.py \
    --dockerfile deploy/Dockerfile --context . --rootfs "$work/rootfs" \
    --bin-dir "$bin_dir" --libtorch .libtorch --fixture fixtures/generated/qwen2-tiny

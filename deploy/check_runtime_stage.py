#!/usr/bin/env python3
"""Replays the runtime stage of deploy/Dockerfile without a Docker daemon or registry.

The stage's base image (debian:${DEBIAN}-slim) is replaced by a Debian rootfs from
debootstrap --variant=minbase (the same suite); its RUN lines run in a chroot, its COPY
lines copy from the build context, and its COPY --from=build lines take what the build
stage would hold from this machine (the same PyTorch wheel; the two binaries, given the
RUNPATH that the build stage's LIBTORCH=/opt/libtorch bakes in). Then, as the stage's
USER with its ENV and WORKDIR, it checks what the image must do: no compiler, every
shared library of the binaries and of libtorch resolves (the NVIDIA driver aside, which
the container toolkit mounts), and the binaries run: --help and a real greedy
generation on a fixture checkpoint.

Driven by scripts/check-image.sh, which says what it needs; run as root.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# Libraries the image leaves to the node: the NVIDIA container toolkit mounts them.
DRIVER_LIBS = ("libcuda.so", "libnvidia-ml.so")
# What the build stage's LIBTORCH (/opt/libtorch) makes build/torch_rpath.rs bake in.
IMAGE_RUNPATH = "/opt/libtorch/lib:/opt/libtorch/lib/../../nvidia/nccl/lib"


def instructions(dockerfile: Path):
    """(keyword, argument) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arg = line.partition(" ")
        out.append((keyword.upper(), arg.strip()))
    return out


def expand(text: str, env: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], m[0]), text)


def runtime_stage(dockerfile: Path):
    """The global ARG defaults and the instructions of the stage named `runtime`."""
    args, stage, inside, seen_from = {}, [], False, False
    for keyword, arg in instructions(dockerfile):
        if keyword == "FROM":
            seen_from = True
            inside = arg.split()[-1] == "runtime"
            if inside:
                stage.append((keyword, arg))
            continue
        if inside:
            stage.append((keyword, arg))
        elif keyword == "ARG" and not seen_from:
            name, _, default = arg.partition("=")
            args[name] = default
    if not stage:
        sys.exit(f"{dockerfile}: no stage named `runtime`")
    return args, stage


class Rootfs:
    def __init__(self, root: Path):
        self.root = root
        self.mounts = []

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def bind(self, host: Path, inside: str, read_only=True):
        target = self.path(inside)
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(host), str(target)], check=True)
        self.mounts.append(target)
        if read_only:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)

    def run(self, command: str, env: dict, user=None, workdir="/", check=True):
        prefix = ["chroot"]
        if user:
            prefix.append(f"--userspec={user}")
        script = f"cd {shlex.quote(workdir)} && {command}"
        return subprocess.run(
            prefix + [str(self.root), "/bin/sh", "-c", script],
            env=env, check=check, capture_output=not check, text=True,
        )

    def unmount_all(self):
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(target)], check=False)
        self.mounts.clear()


def stage_binaries(bin_dir: Path, out: Path):
    """The build stage's /out/bin: the binaries with the image's RUNPATH."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("trainer", "rollout-worker"):
        src = bin_dir / name
        if not src.is_file():
            sys.exit(f"{src}: missing (build it, or pass --bin-dir)")
        shutil.copy2(src, out / name)
        subprocess.run(["patchelf", "--set-rpath", IMAGE_RUNPATH, str(out / name)], check=True)


def replay(stage, args, fs: Rootfs, context: Path, build_paths: dict, log):
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    scope = dict(args)
    user, workdir = None, "/"
    for keyword, arg in stage[1:]:
        text = expand(arg, {**scope, **env})
        if keyword == "ARG":
            name, _, default = arg.partition("=")
            scope.setdefault(name, default)
        elif keyword == "RUN":
            log(f"RUN {text[:100]}")
            fs.run(text, env, user, workdir)
        elif keyword == "COPY":
            words = shlex.split(text)
            source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            src, dst = [w for w in words if not w.startswith("--")]
            log(f"COPY {'--from=' + source_stage + ' ' if source_stage else ''}{src} {dst}")
            if source_stage:
                host = build_paths.get(src.rstrip("/"))
                if host is None:
                    sys.exit(f"COPY --from={source_stage} {src}: the replay has no mapping for it")
                fs.bind(host, dst)
            else:
                host = context / src
                target = fs.path(dst)
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if host.is_dir() else shutil.copy2)(host, target)
        elif keyword == "ENV":
            for pair in shlex.split(text):
                name, _, value = pair.partition("=")
                env[name] = value
        elif keyword == "USER":
            user = text
        elif keyword == "WORKDIR":
            workdir = text
            fs.path(text).mkdir(parents=True, exist_ok=True)
        elif keyword in ("CMD", "ENTRYPOINT", "LABEL", "EXPOSE"):
            pass
        else:
            sys.exit(f"runtime stage: the replay does not know `{keyword}`")
    return env, user, workdir


def check(fs: Rootfs, env, user, workdir, fixture_inside, log):
    failures = []

    def expect(ok, what):
        log(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    def sh(cmd, as_user=True):
        return fs.run(cmd, env, user if as_user else None, workdir, check=False)

    whoami = sh("id -u").stdout.strip()
    expect(whoami not in ("", "0"), f"runs as a non-root user (uid {whoami})")
    compilers = sh("for c in cc gcc g++ clang rustc cargo; do command -v $c; done").stdout.split()
    expect(not compilers, f"no compiler in the image ({' '.join(compilers) or 'none found'})")
    for binary in ("trainer", "rollout-worker"):
        missing = sh(f"ldd $(command -v {binary}) | grep 'not found'").stdout.strip()
        expect(not missing, f"every shared library of {binary} resolves {missing}")
    libs = sh("ls /opt/libtorch/lib/*.so* | sort").stdout.split()
    unresolved = set()
    for lib in libs:
        for line in sh(f"ldd {lib} | grep 'not found'").stdout.splitlines():
            unresolved.add(line.split()[0])
    unresolved = {name for name in unresolved if not name.startswith(DRIVER_LIBS)}
    expect(not unresolved, f"libtorch's {len(libs)} libraries resolve, the driver aside "
           f"{sorted(unresolved) if unresolved else ''}")
    # cudarc dlopens libnccl.so through the binaries' RUNPATH (build/torch_rpath.rs).
    nccl = sh("for d in $(echo %s | tr : ' '); do test -r $d/libnccl.so && echo $d; done" % IMAGE_RUNPATH)
    expect(bool(nccl.stdout.strip()), "libnccl.so, which the NCCL backend dlopens, is on the RUNPATH")
    for binary in ("trainer", "rollout-worker"):
        done = sh(f"{binary} --help >/dev/null")
        expect(done.returncode == 0, f"`{binary} --help` runs {done.stderr[-300:]}")
    done = sh("python3 /opt/grpo/scripts/launch --help >/dev/null")
    expect(done.returncode == 0, f"`scripts/launch --help` runs with the image's python3 {done.stderr[-300:]}")
    done = sh(f"rollout-worker generate --model {fixture_inside} --prompt 'The capital of' "
              "--max-new-tokens 8 --temperature 0 --device auto")
    expect(done.returncode == 0 and done.stdout.strip(),
           f"`rollout-worker generate` decodes on the fixture ({done.stdout.strip()[:60]!r}) {done.stderr[-300:]}")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dockerfile", type=Path, required=True)
    parser.add_argument("--context", type=Path, required=True)
    parser.add_argument("--rootfs", type=Path, required=True, help="a fresh debootstrap minbase tree")
    parser.add_argument("--bin-dir", type=Path, required=True)
    parser.add_argument("--libtorch", type=Path, required=True, help="the wheel's torch/ package")
    parser.add_argument("--fixture", type=Path, required=True, help="a checkpoint directory")
    opts = parser.parse_args()

    args, stage = runtime_stage(opts.dockerfile)
    site = args["SITE"]
    fs = Rootfs(opts.rootfs)
    staged = opts.rootfs.parent / "out-bin"
    stage_binaries(opts.bin_dir, staged)
    build_paths = {
        f"{site}/torch/lib": opts.libtorch.resolve() / "lib",
        f"{site}/nvidia": (opts.libtorch.resolve() / ".." / "nvidia").resolve(),
        "/out/bin": staged,
    }

    def log(line):
        print(f"[runtime-stage] {line}", flush=True)

    shutil.copy2("/etc/resolv.conf", fs.path("/etc/resolv.conf"))
    try:
        fs.bind(Path("/proc"), "/proc", read_only=False)
        fs.bind(Path("/dev"), "/dev", read_only=False)
        env, user, workdir = replay(stage, args, fs, opts.context, build_paths, log)
        # A copy readable by the image's user, as a volume mounted for it would be
        # (save_file writes safetensors with mode 0600).
        shutil.copytree(opts.fixture.resolve(), fs.path("/data/model"))
        subprocess.run(["chmod", "-R", "a+rX", str(fs.path("/data"))], check=True)
        failures = check(fs, env, user, workdir, "/data/model", log)
    finally:
        fs.unmount_all()
    if failures:
        log(f"{len(failures)} check(s) failed")
        sys.exit(1)
    log("the runtime stage holds what the binaries need")


if __name__ == "__main__":
    main()

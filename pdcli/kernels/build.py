"""JIT build of pdcli/csrc with torch.utils.cpp_extension.load, once per process.

The build directory is keyed by source hash + torch + CUDA + arch, so a stale build is never
loaded and a warm one loads in a second. Without a GPU or nvcc the engine falls back to the
pure-torch reference path and says so once; PDCLI_REQUIRE_KERNEL=1 makes that an error.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import time

import torch

from pdcli import envs

logger = logging.getLogger("pdcli.kernels")

CSRC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "csrc")
SOURCES = ("bindings.cpp", "store_kvcache.cu", "decode_attention.cu", "decode_attention_persistent.cu",
           "prefill_attention.cu", "prefill_attention_sm90.cu", "prefill_attention_sm90_ws.cu", "wgmma_probe.cu",
           "layernorm.cu", "activation.cu", "rotary.cu", "gemv.cu", "copy_blocks.cu", "merge_attn_states.cu",
           "argmax.cu")


class KernelUnavailable(RuntimeError):
    pass


def source_hash() -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(CSRC)):
        if name.endswith((".cu", ".cuh", ".cpp", ".h")):
            h.update(name.encode())
            with open(os.path.join(CSRC, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def build_key(arch: str) -> str:
    raw = f"{source_hash()}|torch={torch.__version__}|cuda={torch.version.cuda}|arch={arch}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def build_root() -> str:
    """A git-ignored folder of the checkout when run from one, else the user cache."""
    if os.environ.get("PDCLI_KERNEL_BUILD_DIR"):
        return os.environ["PDCLI_KERNEL_BUILD_DIR"]
    repo = os.path.dirname(os.path.dirname(CSRC))
    if os.path.isdir(os.path.join(repo, ".git")) and os.access(repo, os.W_OK):
        return os.path.join(repo, ".kernel_build")
    return os.path.join(envs.cache_dir(), "kernels")


def unavailable_reason() -> str | None:
    if envs.disable_kernel():
        return "PDCLI_DISABLE_KERNEL is set"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found"
    return None


@functools.cache
def load():
    """The compiled extension module; raises KernelUnavailable if it cannot be had."""
    reason = unavailable_reason()
    if reason:
        raise KernelUnavailable(reason)
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}.{minor}"
    key = build_key(arch)
    build_dir = os.path.join(build_root(), key)
    os.makedirs(build_dir, exist_ok=True)
    name = f"pdcli_kernels_{key}"
    if os.path.exists(os.path.join(build_dir, f"{name}.so")):  # the key covers every input: no need to ask ninja
        module = load_built(name, build_dir)
    else:
        module = build_once(name, build_dir, lambda: _build(name, build_dir, arch))
    if hasattr(module, "set_pdl"):
        module.set_pdl(major >= 9 and envs.pdl())
    return module


def load_built(name: str, build_dir: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(build_dir, f"{name}.so"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_once(name: str, build_dir: str, build):
    """One build at a time per build directory, under an flock the kernel drops when its holder dies: a build
    killed midway never blocks a later start. torch's own lock (a `lock` file it removes when done) is left
    behind by a killed build; holding the flock, no one else is building, so such a file is stale and goes."""
    import fcntl

    with open(f"{build_dir}.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.path.exists(os.path.join(build_dir, f"{name}.so")):  # built by another process meanwhile
                return load_built(name, build_dir)
            stale = os.path.join(build_dir, "lock")
            if os.path.exists(stale):
                logger.warning("removing %s, left by a kernel build that was killed", stale)
                os.remove(stale)
            return build()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(name: str, build_dir: str, arch: str):
    from torch.utils.cpp_extension import load as cpp_load

    major, minor = arch.split(".")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    kwargs = dict(name=name, sources=[os.path.join(CSRC, s) for s in SOURCES],
                  build_directory=build_dir, extra_cflags=["-O3", "-std=c++17"],
                  extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                                     "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                                     *arch_flags(arch)],
                  verbose=False)
    start = time.perf_counter()
    try:
        from rich.console import Console

        console = Console(stderr=True)
        with console.status(f"building pdcli CUDA kernels for sm_{major}{minor} (first run only)"):
            module = cpp_load(**kwargs)
        logger.info("built pdcli CUDA kernels in %.0f s -> %s", time.perf_counter() - start, build_dir)
    except Exception as e:  # a compiler error is reported, then the reference path takes over
        raise KernelUnavailable(f"kernel build failed: {str(e).splitlines()[-1] if str(e) else e!r}") from e
    return module


@functools.cache
def load_lt():
    """The cuBLASLt extension (csrc/lt_matmul.cpp: heuristic candidates and a call through one), built apart
    from the kernels since it links cuBLASLt; raises KernelUnavailable if it cannot be had."""
    reason = unavailable_reason()
    if reason:
        raise KernelUnavailable(reason)
    major, minor = torch.cuda.get_device_capability()
    key = build_key(f"{major}.{minor}")
    build_dir = os.path.join(build_root(), f"{key}_lt")
    os.makedirs(build_dir, exist_ok=True)
    name = f"pdcli_lt_{key}"
    if os.path.exists(os.path.join(build_dir, f"{name}.so")):
        return load_built(name, build_dir)

    def build():
        from torch.utils.cpp_extension import load as cpp_load

        lib = loaded_library("libcublasLt.so")
        ld = [f"-L{os.path.dirname(lib)}", f"-l:{os.path.basename(lib)}", f"-Wl,-rpath,{os.path.dirname(lib)}"] \
            if lib else ["-lcublasLt"]
        inc = os.path.join(os.path.dirname(os.path.dirname(lib)), "include") if lib else None
        try:
            return cpp_load(name=name, sources=[os.path.join(CSRC, "lt_matmul.cpp")], build_directory=build_dir,
                            extra_cflags=["-O3", "-std=c++17"], extra_ldflags=ld, with_cuda=True,
                            extra_include_paths=[inc] if inc and os.path.isdir(inc) else None, verbose=False)
        except Exception as e:
            raise KernelUnavailable(f"cuBLASLt extension build failed: {str(e).splitlines()[-1] if str(e) else e!r}")

    return build_once(name, build_dir, build)


def loaded_library(prefix: str) -> str | None:
    """The path of a shared library this process has loaded whose name starts with prefix (torch's own
    cuBLASLt: linking that one keeps a single copy in the process), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if os.path.basename(path).startswith(prefix) and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


def arch_flags(arch: str) -> list[str]:
    """nvcc flags of the target: on Hopper (9.0) sm_90a, whose wgmma the prefill kernel uses (named here: an
    arch flag of ours makes torch add none of its own, and not every torch knows "9.0a"); else torch's from
    TORCH_CUDA_ARCH_LIST."""
    return ["-gencode=arch=compute_90a,code=sm_90a", "-DPDCLI_SM90A"] if arch == "9.0" else []


_warned = False


def get():
    """The extension, or None (reference path) after one warning; PDCLI_REQUIRE_KERNEL=1 raises."""
    global _warned
    try:
        return load()
    except KernelUnavailable as e:
        if envs.require_kernel():
            raise KernelUnavailable(f"PDCLI_REQUIRE_KERNEL=1 but the CUDA kernels are unavailable: {e}") from e
        if not _warned:
            _warned = True
            logger.warning("using the pure-torch attention path (%s)", e)
        return None

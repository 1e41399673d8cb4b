"""Environment knobs (PDCLI_*), read in one place."""
import os


def _bool(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(int(default))).strip().lower() in ("1", "true", "yes", "on")


def require_kernel() -> bool:
    return _bool("PDCLI_REQUIRE_KERNEL")


def disable_kernel() -> bool:
    return _bool("PDCLI_DISABLE_KERNEL")


def cache_dir() -> str:
    return os.environ.get("PDCLI_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pdcli"))


def prefill_kernel() -> str:
    """The paged prefill attention kernel: "auto" (default: per chunk length, the fastest of those that matched
    the reference when the engine started, kernels/prefill_choice.py; mma.sync alone off Hopper), "mma"
    (mma.sync, any sm_80+ GPU), "wgmma", "wgmma_ws" or "wgmma_tma" (Hopper's tensor cores, plain, warp-specialised,
    or that with K/V loaded by TMA, where the build has them), through PDCLI_PREFILL_KERNEL."""
    value = os.environ.get("PDCLI_PREFILL_KERNEL", "").strip().lower()
    return value if value in ("mma", "wgmma", "wgmma_ws", "wgmma_tma") else "auto"


def blas_choice() -> bool:
    """A cuBLASLt algorithm for the linears at the shapes and decode batch sizes where one was timed faster than
    torch's default when the engine started (default on, kernels/blas_choice.py); PDCLI_BLAS_CHOICE=0: torch's
    default everywhere."""
    return _bool("PDCLI_BLAS_CHOICE", default=True)


def pdl() -> bool:
    """The decode step's own kernels (norms, RoPE + KV store, attention and its merge, SiLU-and-mul) launched to
    overlap the kernel before them (programmatic dependent launch, sm_90+; csrc/launch.cuh): default on;
    PDCLI_PDL=0: plain launches."""
    return _bool("PDCLI_PDL", default=True)


def decode_persistent() -> bool:
    """The balanced decode as one wave of CTAs that each take several parts in turn, the next part's K/V loading
    while this one's ends (default on, csrc/decode_attention_persistent.cu); PDCLI_DECODE_PERSISTENT=0: a CTA per
    part."""
    return _bool("PDCLI_DECODE_PERSISTENT", default=True)


def decode_split() -> str:
    """How the decode kernel cuts sequences into split-KV parts: "balanced" (default: parts of equal key counts,
    one wave of CTAs, so one long context beside many short ones is spread over as many CTAs as its share of the
    keys) or "uniform" (PDCLI_DECODE_SPLIT=uniform: every sequence into the same number of parts of its own
    length; its long sequences' few CTAs ran 1.09-1.44x longer on mixed batches, one H100, 2026-12-05)."""
    value = os.environ.get("PDCLI_DECODE_SPLIT", "").strip().lower()
    return "uniform" if value == "uniform" else "balanced"


def gemv_mode() -> str:
    """The skinny-matmul kernel for linears with 1-4 rows: "tuned" (default: where it beat cuBLAS when timed
    per shape at start), "off" (PDCLI_GEMV=0: cuBLAS always), "always" (PDCLI_GEMV=always: A/B runs, tests)."""
    value = os.environ.get("PDCLI_GEMV", "1").strip().lower()
    return "always" if value == "always" else "tuned" if _bool("PDCLI_GEMV", default=True) else "off"

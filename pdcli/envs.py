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


def gemv() -> bool:
    """The skinny-matmul kernel for linears with 1-4 rows (on: faster than cuBLAS on H100, PDCLI_GEMV=0 for cuBLAS)."""
    return _bool("PDCLI_GEMV", default=True)

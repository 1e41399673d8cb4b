"""CPU tests of the kernel build key and the fallback to the reference path."""
import os

import pytest
import torch

from pdcli.kernels import build, ops


def test_build_key_changes_with_source_and_arch(tmp_path, monkeypatch):
    k1 = build.build_key("9.0")
    assert k1 == build.build_key("9.0") and k1 != build.build_key("8.0")
    fake = tmp_path / "csrc"
    fake.mkdir()
    for name in os.listdir(build.CSRC):
        (fake / name).write_bytes(open(os.path.join(build.CSRC, name), "rb").read())
    monkeypatch.setattr(build, "CSRC", str(fake))
    assert build.build_key("9.0") == k1
    (fake / "decode_attention.cu").write_text("// changed\n" + (fake / "decode_attention.cu").read_text())
    assert build.build_key("9.0") != k1


def test_build_root_in_checkout_is_ignored_by_git():
    root = build.build_root()
    repo = os.path.dirname(os.path.dirname(build.CSRC))
    if os.path.isdir(os.path.join(repo, ".git")):
        assert root == os.path.join(repo, ".kernel_build")
        assert "/.kernel_build/" in open(os.path.join(repo, ".gitignore")).read()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_no_gpu_falls_back_to_reference(monkeypatch):
    build.load.cache_clear()
    monkeypatch.setattr(build, "_warned", False)
    assert build.unavailable_reason() == "no CUDA GPU"
    with pytest.raises(build.KernelUnavailable):
        build.load()
    assert build.get() is None
    ops._kernels_for.cache_clear()
    assert ops.kernel_path(torch.device("cuda"), torch.bfloat16, 128, 4) == "reference"
    assert ops.kernel_path(torch.device("cpu"), torch.float32, 128, 4) == "reference"
    monkeypatch.setenv("PDCLI_REQUIRE_KERNEL", "1")
    with pytest.raises(build.KernelUnavailable, match="PDCLI_REQUIRE_KERNEL"):
        build.get()
    ops._kernels_for.cache_clear()


def test_disable_env_wins(monkeypatch):
    monkeypatch.setenv("PDCLI_DISABLE_KERNEL", "1")
    assert build.unavailable_reason() == "PDCLI_DISABLE_KERNEL is set"

"""A CUDA device made of fake tensors on the CPU wheel of torch, for benchmarks/simulate_step.py.

PyTorch's fake tensors carry a shape, a dtype and a device and allocate nothing,
so a whole 13B training step can run on a CPU while MemTracker follows every
tensor. What stands between the CPU wheel and a fake CUDA step, supplied here:

* a CUDA device guard and "CUDA is built" in ATen's hooks (a tiny C++ shim,
  compiled once with the local g++ against torch's headers): autograd asks
  both for every CUDA tensor, and the CPU wheel has neither. A CUDA build of
  torch needs no shim (FakeTensorMode installs its own guard there);
* CUDA placeholders for the few ops whose CUDA kernel is missing from the CPU
  wheel, so that they are not decomposed into temporaries CUDA never allocates;
* what Python code asks of a GPU: CUDA autocast refuses to start without one,
  bitsandbytes synchronizes after each optimizer step, transformers keeps masks
  for fake tensors that it drops for real data.

benchmarks/fake_kernels.py supplies what the CUDA kernels themselves decide and allocate.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

_SHIM = r"""
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace at {
// The CPU wheel's hooks say CUDA is not built; autograd then finds no stream for a CUDA tensor.
struct BuiltCUDAHooks final : CUDAHooksInterface {
  bool isBuilt() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return false; }
};
}  // namespace at

extern "C" int install_fake_cuda() {
  static c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> guard;  // what torch installs on a CUDA build without GPU
  auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(c10::DeviceType::CUDA)];
  if (slot.load() != nullptr) return 0;
  slot.store(&guard);
  // ATen created its hooks object at import and keeps it; same layout, so it takes the vtable of the subclass.
  static at::BuiltCUDAHooks built;
  auto* hooks = const_cast<at::CUDAHooksInterface*>(&at::detail::getCUDAHooks());
  *reinterpret_cast<void**>(hooks) = *reinterpret_cast<void**>(&built);
  return at::detail::getCUDAHooks().isBuilt() ? 1 : -1;
}
"""
_loaded: list = []  # kept for the life of the process: the shim (its guard and vtable) and the kernel registrations


def install_fake_cuda() -> str:
    """Make fake CUDA tensors usable by autograd on this build of torch; says what was done."""
    if torch.backends.cuda.is_built():
        return "CUDA build of torch: FakeTensorMode's own device guard"
    if _loaded:
        return "shim already loaded"
    torch_dir = Path(torch.__file__).parent
    tag = hashlib.sha256((_SHIM + torch.__version__).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-llava"
    lib = cache / f"fake_cuda_{tag}.so"
    if not lib.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        src = cache / f"fake_cuda_{tag}.cpp"
        src.write_text(_SHIM)
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               f"-I{torch_dir / 'include'}", f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(lib),
               f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]  # fmt: skip
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise RuntimeError(
                f"cannot build the fake-CUDA shim (a C++17 compiler and torch's headers are needed): {detail[-600:]}"
            ) from None
    handle = ctypes.CDLL(str(lib))
    if handle.install_fake_cuda() < 0:
        raise RuntimeError("the fake-CUDA shim loaded but ATen still reports no CUDA")
    _loaded.extend([handle, _claim_cuda_kernels()])
    return f"fake-CUDA shim {lib}"


def _claim_cuda_kernels() -> torch.library.Library:
    """Ops with a CPU kernel and a generic composite but no CUDA kernel in this build get a CUDA placeholder.

    Without one, the dispatcher runs the composite for CUDA tensors before any
    mode sees the op: silu_backward becomes sigmoid, sub, add, three muls, five
    full-size temporaries that CUDA's fused kernel never allocates. With the
    placeholder the op reaches FakeTensorMode whole; the placeholder never runs.
    """

    def never(*args, **kwargs):
        raise RuntimeError("a CUDA kernel was called on a CPU build of torch")

    def has(name: str, key: str) -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)

    lib = torch.library.Library("aten", "IMPL")
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("aten::") and has(name, "CPU") and not has(name, "CUDA") and has(name, "CompositeImplicitAutograd"):
            lib.impl(name.removeprefix("aten::"), never, "CUDA")
    return lib


@contextlib.contextmanager
def cuda_python_side() -> Iterator[None]:
    """What Python code asks of a GPU and of real data, answered as a GPU run with real data would answer it.

    CUDA autocast refuses to start without a GPU; bitsandbytes synchronizes the
    device after each optimizer step; transformers takes a fake tensor for a graph
    being traced and then keeps the causal mask it drops for real data (no padding:
    SDPA's is_causal, so flash attention). The fake tensors here stand for real
    batches whose values Shadows knows.
    """
    import bitsandbytes.functional as bnb_functional
    import torch.cuda.amp.common as amp_common
    import transformers.masking_utils as masking
    import transformers.modeling_utils as modeling

    # bitsandbytes builds its 8-bit code table on first use from Python floats (tolist), which a fake tensor has not
    if "dynamic" not in bnb_functional.name2qmap:
        bnb_functional.name2qmap["dynamic"] = bnb_functional.create_dynamic_map()
    traced = masking.is_tracing  # still true under dynamo or torch.jit, not for a fake tensor
    patches = [
        (amp_common, "amp_definitely_not_available", lambda: False),
        (torch.cuda, "is_bf16_supported", lambda *a, **k: True),
        (torch.cuda, "synchronize", lambda *a, **k: None),
        (masking, "is_tracing", lambda tensor=None: traced()),
        (modeling, "is_tracing", lambda tensor=None: traced()),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def movable_fake_modules(fake_mode) -> Iterator[None]:
    """Let `module.to(device)` move fake parameters (peft moves each adapter to its base layer's device).

    Module._apply always swaps fake parameters, and torch refuses to swap a tensor
    a weak reference points to; FakeTensorMode's converter memo holds one to each
    tensor it made. Dropping those entries only costs a re-conversion later.
    """
    original = torch.utils.swap_tensors
    memo = fake_mode.fake_tensor_converter.meta_converter.tensor_memo

    def swap(a: torch.Tensor, b: torch.Tensor) -> None:
        for key, value in list(memo.items()):
            if value is a or value is b:
                del memo[key]
        original(a, b)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original

"""Keep `torch._dynamo` (about 2 s of imports: sympy, torch._inductor, torch.fx's symbolic shapes) out of a
process that never compiles.

torch wraps many of its own Python functions in `torch._disable_dynamo` (torch/_compile.py): the
`__torch_dispatch__` of every TorchDispatchMode subclass (netdiet's op counter and storage tracker among them),
the Python meta kernels of torch._refs and torch._decomp that a meta-device simulation runs, and
`Optimizer.add_param_group` / `zero_grad`. On its first call the wrapper imports torch._dynamo only to build
`torch._dynamo.disable(fn)` and caches that on the function as `fn.__dynamo_disable`. While nothing is being
compiled, that disabled function is `fn` itself: it clears a frame-evaluation callback that only torch._dynamo can
install, so with torch._dynamo not imported there is none to clear, and no export is running.

`without_dynamo_import()` fills that cache with `fn` itself for every such wrapper for the length of a block, when
torch._dynamo is not imported yet (when it is, the block does nothing: there is nothing left to save), and on exit
takes away exactly the entries it put there, so afterwards torch behaves as if the block had never run (the next
wrapped call outside it imports torch._dynamo as usual). Every figure is the same: the functions called are the
same functions. A wrapper created inside the block (a module first imported there) is not filled and may still
import torch._dynamo; that costs time, never a number. What imports torch._dynamo itself is untouched: an
optimizer's step (`_use_grad_for_differentiable`), torch.utils.checkpoint (reads torch._dynamo.config: a simulation
with activation checkpointing imports it) and transformers' modelling code (torch.compiler.disable at import).
"""
from __future__ import annotations

import contextlib
import gc
import sys
import threading
import types
from typing import Iterator

import torch

_DISABLE_CACHE = "__dynamo_disable"     # the attribute torch/_compile.py's wrapper caches its disabled function in
_WRAPPER_CODE = torch._disable_dynamo(lambda: None).__code__   # the code every `_disable_dynamo` wrapper runs
_lock = threading.Lock()
_state = {"depth": 0, "modules_seen": -1}
_wrapped: list = []        # the functions behind every wrapper found (rescanned when a module was imported since)
_seeded: list = []         # the functions whose cache this block filled, emptied again on exit


def _wrapped_functions() -> list:
    """The function behind each `_disable_dynamo` wrapper that exists now (one scan of the heap, ~30 ms, repeated
    only after new modules were imported)."""
    if _state["modules_seen"] != len(sys.modules) and "fn" in _WRAPPER_CODE.co_freevars:
        slot = _WRAPPER_CODE.co_freevars.index("fn")
        found = []
        for f in gc.get_referrers(_WRAPPER_CODE):
            if isinstance(f, types.FunctionType) and f.__closure__ is not None:
                try:
                    found.append(f.__closure__[slot].cell_contents)
                except ValueError:  # an empty cell
                    continue
        _wrapped[:] = found
        _state["modules_seen"] = len(sys.modules)
    return _wrapped


@contextlib.contextmanager
def without_dynamo_import() -> Iterator[None]:
    """Within the block, torch's `_disable_dynamo` wrappers call their function without importing torch._dynamo
    (see the module docstring); blocks nest and may overlap across threads, the last to close undoes what the
    first did. (A torch.compile that another thread starts while a block is open would trace into those functions
    instead of skipping them: netdiet opens the block only around its own meta-device simulations.)"""
    with _lock:
        _state["depth"] += 1
        if _state["depth"] == 1 and "torch._dynamo" not in sys.modules:
            for fn in _wrapped_functions():
                cache = getattr(fn, "__dict__", None)
                if cache is not None and _DISABLE_CACHE not in cache:
                    cache[_DISABLE_CACHE] = fn
                    _seeded.append(fn)
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                for fn in _seeded:
                    if fn.__dict__.get(_DISABLE_CACHE) is fn:
                        delattr(fn, _DISABLE_CACHE)
                _seeded.clear()

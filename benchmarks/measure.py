"""
Measuring tools shared by the benchmarks: interleaved timing, FLOPs, and peak memory (torch's
profiler on the CPU; on the meta device, the bytes autograd keeps and the peak of live tensors,
from shapes alone).
"""
import ctypes
import gc
import os
import statistics
import time
import weakref

import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode   # torch internals, as in count_flops
from tqdm import tqdm

# -----------------------------------------------------------------------------
# time and FLOPs

def median(xs):
    return statistics.median(xs)

def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

def cpu_stall_s():
    """Seconds (since boot) during which some runnable task waited for a CPU (Linux PSI); None if
    unavailable. Our own threads do not exceed the cores, so a rise while timing means other load
    took our CPUs."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None

def interleaved_times(fns, reps):
    """Time each of `fns` `reps` times, interleaved A B, B A, A B, ... so that slow drifts of the
    machine (thermal, other load) hit all of them alike and the order within a pair does not favour
    one. Returns the times and, per measurement, the fraction of it other load kept a runnable task
    off a CPU."""
    times, stalls = [[] for _ in fns], [[] for _ in fns]
    # a progress bar on stderr, gone when done
    for r in tqdm(range(reps), desc="timing", leave=False):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            s0 = cpu_stall_s()
            dt = timed(fns[i])
            times[i].append(dt)
            stalls[i].append(None if s0 is None else (cpu_stall_s() - s0) / dt)
    return times, stalls

def matmul_flops_per_s(n=2048, reps=8):
    """This machine's fp32 matmul speed: median over `reps` square n x n matmuls (2 n^3 FLOPs
    each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    return 2 * n ** 3 / median([timed(lambda: a @ b) for _ in range(reps)])

def count_flops(fn):
    """FLOPs of one call of fn, by torch's FlopCounterMode (matmuls and attention). Its registry
    lacks the CPU flash-attention ops SDPA dispatches to on CPU, so they get torch's own SDPA
    formulas here."""
    # torch internals, which move between releases: imported where used, so a rename breaks one
    # measurement only
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad_out, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(
                grad_out, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()

# -----------------------------------------------------------------------------
# memory

try:
    _libc = ctypes.CDLL("libc.so.6") if os.path.exists("/proc/self/clear_refs") else None
except OSError:       # not glibc
    _libc = None

def _proc_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None

def peak_memory(fn):
    """Peak memory of one call of fn above what was alive before it, measured two ways, in bytes.

    tensors: the peak of live torch tensor bytes. torch's CPU allocator reports every allocation and
      free to the profiler when profile_memory=True; summing those events in time order gives the
      exact high-water mark of activations, autograd-saved tensors, temporaries and gradients
      created by fn (parameters and inputs allocated before are the baseline, not counted).
      tracemalloc would see none of this, and RSS mixes in malloc's caching; this is the number to
      compare. It misses buffers oneDNN/MKL allocate themselves.
    rss: the growth of the process's peak resident set (Linux VmHWM) over its resident size just
      before fn, after giving malloc's free memory back to the OS (malloc_trim) and resetting VmHWM
      (clear_refs 5). It adds library scratch buffers and whatever freed memory glibc keeps mapped
      during fn (its mmap threshold rises to the largest block freed so far, so one model's
      allocation sizes can make it retain tens of MiB more than another's): the process-level view,
      but allocator-dependent (None without /proc/self/clear_refs).
    The tensor peak reads torch's private profiler event tree (torch._C._profiler), as torch's own
    memory profiler does.
    """
    from torch._C._profiler import _EventType          # torch internals, as in count_flops
    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    rss0 = None
    if _libc is not None:
        _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0 = _proc_kib("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    rss = None if rss0 is None else (_proc_kib("VmHWM") - rss0) * 1024
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    live = peak = 0
    # frees of blocks allocated before the window report nothing useful
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return {"tensors": peak, "rss": rss}

def nbytes(module):
    # what a module's weights and buffers take wherever they are
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

# memory from shapes alone, on the meta device as on the CPU: what autograd keeps for backward, and
# the peak of the tensors alive at once

def saved_bytes(model, fn):
    """Bytes autograd keeps for backward while fn runs (parameters excluded, each storage counted
    once)."""
    params = {id(p) for p in model.parameters()}
    # the counted tensors are held until the end: a tensor freed during fn (a few are) would hand
    # its id() to a new one, which would then go uncounted, and the total would change from run to
    # run
    seen, total = {}, [0]
    def pack(t):
        base = t if t._base is None else t._base
        if id(base) not in seen and id(base) not in params:
            seen[id(base)] = base
            total[0] += base.numel() * base.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]

class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors alive at once while it is active, counting every tensor an op
    creates (each storage once) until the last tensor on it is freed; what existed before
    (the weights) is not counted. Works on the meta device, where tensors have shapes and no data:
    inference peaks of flux-dev on a CPU machine. (On CPU it equals peak_memory's profiler
    count.)"""
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs = {}                                  # storage -> tensors alive on it

    def _drop(self, key, nbytes):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        ids, storages = {id(t) for t in given}, {t.untyped_storage()._cdata for t in given}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in ids:   # an in-place op returns its input
                continue
            s = t.untyped_storage()
            key, nbytes = s._cdata, s.nbytes()
            if key not in self.refs:
                # a view of a tensor from before (a weight's transpose): not new
                if key in storages:
                    continue
                self.refs[key] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._drop, key, nbytes)
        return out

def live_peak(fn):
    with torch.no_grad(), LiveBytes() as m:
        fn()
    return m.peak

"""Launch plans: the eager CUDA path of an op call, recorded once per call key and replayed.

An op on CUDA tensors spends most of its host time in Python that decides the same things every call
for the same shapes: argument checks, dispatch, CuPy views of the tensors, the backend's choice of
kernel, grid and arguments, fresh output allocation, wrapping results back into tensors. For a call
*key* (op, and per argument: dtype, shape, strides, device and pointer alignment of a tensor; type and
exact value of anything else) the normal path is run once under a recorder that notes every
``_runtime.launch`` (kernel, grid, block, shared memory, arguments) and every allocation; array
arguments are mapped to slots (an input tensor + byte offset, or an allocation + byte offset). A
later call with the same key replays the launches with the new tensors' pointers (CuPy passes a
Python int as a 64-bit argument, a pointer's size) and allocates the outputs with torch directly:
the same kernels with the same arguments, so the results are bitwise those of the normal path.

A recording becomes a plan only when the normal path did nothing but launches through
``_runtime.launch`` and allocations through ``cupy.empty`` (checked, not assumed):

* every allocation's nearest Python caller is ``cupy.empty`` (an ``astype``, a copying
  ``ascontiguousarray``, ``zeros``, a reduction... allocate from elsewhere and are refused);
* no CuPy function or method ran outside ``_runtime`` other than view-making ones (``transpose``,
  ``reshape``, a non-copying ``ascontiguousarray``, the stream/allocator plumbing): ``get``,
  ``item``, ``fill``, ``astype``, ``copy``... are refused (profile hook: CuPy's methods are C calls; the
  line trace below also refuses calls of CuPy ufunc objects, which the profile hook does not see);
* no executed line of the backend stores into a CuPy array (``out[...] = 0``), updates one in place
  (``a += b``) or converts one to a host number (``int(a)``) (line trace + the statement's AST);
* every array argument of a launch lies in an input tensor or an allocation; integer constants that
  look like a pointer into one are refused; every output is a whole allocation, not copied.

A float16/bfloat16 input that the backend casts to float32 in ``_arrays.contiguous`` (conv and norm
parameters) is cast by torch in the recording and in each replay (an exact widening: the same bits as CuPy's
cast). A key is recorded on its second call (a one-off shape costs no recording); a refused key is tried
``RECORD_TRIES`` times, then runs the normal path for good.

What the path read is part of the plan: the environment variables read while recording, and the simple module-level settings (lowercase names bound to str/int/float/bool/None)
of the backend modules that ran; a replay first checks they still hold, else records again.
Anything unusual runs the normal path: the fast path off (``SSMCORE_FASTPATH=0`` or
``_plans.ENABLED = False``), keyword arguments, a tensor not on CUDA or not a plain tensor, a
non-default stream (so also CUDA-graph capture), autocast, deterministic algorithms, dispatch or
torch-function modes, a patched ``_runtime.launch`` (the emulator), a device other than CuPy's
current one (an active profiler or debugger only stops new recordings). Plans hold no tensors (kernels, constants and offsets only). Not detected: a backend
*function* replaced at run time (a test monkeypatching a launcher) -- call :func:`clear` after doing that.

How a replay runs (session 7; each part selectable for before/after measurements):

* Launches (``DRIVER_LAUNCH``, ``SSMCORE_PLAN_LAUNCH=cupy`` for the session-6 form): CuPy's kernel call
  converts every argument into a parameter object per launch (tens of arguments per ssmcore kernel); a plan
  instead keeps, per launch, the kernel's function pointer, the padded grid / block, the stream pointer, a
  parameter array whose constant entries point at CuPy's own by-value form of each constant (its ``CScalar``,
  the same bytes) and whose array entries point into a small buffer that the replay fills with the call's
  pointers (one ``struct.pack_into``), then calls ``cupy.cuda.driver.launchKernel``. The buffers are per plan:
  a replay holds the plan's lock, and a call finding it held (another thread mid-replay) takes the CuPy-call
  replay. A thread's first driver launch makes sure it has a CUDA context, as CuPy's call does. A kernel that
  is not a plain ``RawKernel`` / ``Function``, or a constant CuPy versions pass differently (None), keeps the
  CuPy call for the whole plan.
* Memory (``FREE_EARLY``, ``SSMCORE_PLAN_FREE=0`` for the session-6 form): the recorder holds the blocks
  weakly (a scratch block the normal path drops goes back to torch at that point, also while recording; a result
  is matched to its block by torch storage, held by a weak reference, and address), and a replay allocates each
  block just before its first launch
  and drops each scratch block after its last one (stream order makes that safe, as it does for the normal path).
* The eager calls (``ops.eager.<op>``, what the drop-ins and modules call) try :func:`hit` first: one pass over
  the arguments for everything ``ops._plain_eager`` and :func:`run` check and for the key, then the replay; a miss
  takes the normal path (which records). ``ops.eager.<op>.first(...)``: only the first result, for a drop-in that
  drops the others (``selective_scan_fn`` without the last state, ``causal_conv1d_fn`` without final states, the SSD
  with neither state, ``rms_norm_fn`` without prenorm): a second replay of the same plan, compiled at its first use,
  whose other results are scratch blocks (kept with the plan when small) and whose placeholders are not made.
* Small scratch (``KEEP_SCRATCH`` bytes per plan, ``SSMCORE_PLAN_KEEP_SCRATCH``, 256 KiB; driver launches only):
  allocated once with the plan and reused by every replay, which allocates only its results. Safe because
  plans replay only on the legacy default stream, where one replay's kernels run after the previous one's.
"""

from __future__ import annotations

import ast
import collections.abc
import ctypes
import os
import struct
import sys
import threading
import weakref

import numpy as np
import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from . import _bridge

ENABLED = os.environ.get("SSMCORE_FASTPATH", "1") != "0"
# Replays launch through the CUDA driver (``cupy.cuda.driver.launchKernel``) with each launch's kernel-parameter
# array built once per plan (constants packed once, only the pointer slots rewritten per call); "cupy": through
# CuPy's kernel call, which converts every argument per launch (the session-6 replay). Read when a plan is built.
DRIVER_LAUNCH = os.environ.get("SSMCORE_PLAN_LAUNCH", "driver") != "cupy"
# A replay allocates each block just before its first launch and drops a scratch block after its last one (stream
# order makes that safe, as in the normal path), and the recorder holds the blocks weakly (the recording call
# keeps nothing alive longer than the normal path). 0: every block up front, held to the end (session 6).
FREE_EARLY = os.environ.get("SSMCORE_PLAN_FREE", "1") != "0"
# A driver-launch plan whose scratch blocks total at most this many bytes allocates them once, when it is built, and
# reuses them in every replay (no allocation per call at small shapes): safe because a plan replays only on the
# device's legacy default stream, which runs one replay's launches after the previous one's. 0: never. At most
# KEEP_SCRATCH_TOTAL bytes are kept over all plans (counted until clear(); plans past it allocate per call).
KEEP_SCRATCH = int(os.environ.get("SSMCORE_PLAN_KEEP_SCRATCH", str(1 << 18)))
KEEP_SCRATCH_TOTAL = 32 << 20
# The eager calls (ops.eager.<op>) check and replay in one pass (hit()), and drop-ins that drop results replay a
# first-result-only variant. 0: they take the checks of ops._plain_eager + run() and the full replay (OVH7's form).
ONE_PASS = os.environ.get("SSMCORE_PLAN_ONE_PASS", "1") != "0"
_kept_bytes = 0
MAX_PLANS = 4096

_PLANS: dict = {}  # key -> _Plan or _Refused
_SEEN: dict = {}  # key -> calls so far, for keys not recorded yet
RECORD_AFTER = 2  # a key is recorded on its RECORD_AFTER-th call (its first calls run the normal path only)
STATS = {"hits": 0, "recorded": 0, "refused": 0, "rerecorded": 0}
REFUSED: dict = {}  # op name -> the last reason a recording was refused

_PLAIN = (Tensor, torch.nn.Parameter)
_Parameter = torch.nn.Parameter
# what hit() calls per call, bound once (module attribute loads, not torch's Python wrappers' own lookups)
_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_tracing_state = torch._C._get_tracing_state
_autocast_enabled = torch.is_autocast_enabled
_deterministic = torch.are_deterministic_algorithms_enabled
_grad_enabled = torch.is_grad_enabled
_get_device = None  # cupy.cuda.runtime.getDevice, set by _import
_lock = threading.Lock()
_rt = None  # ssmcore.backends.cupy._runtime, imported with the first CUDA call
_raw_stream = None  # torch's current raw CUDA stream of a device (torch._C._cuda_getCurrentRawStream), set by _import
_arrays = None  # ssmcore.backends.cupy._arrays
_cupy = None


def clear() -> None:
    """Forget every plan and refusal (plans are also dropped wholesale past MAX_PLANS)."""
    global _kept_bytes
    _PLANS.clear()
    _SEEN.clear()
    REFUSED.clear()
    _kept_bytes = 0


class _Refused:
    __slots__ = ("reason", "tries")

    def __init__(self, reason, tries):
        self.reason = reason
        self.tries = tries


# Recordings of one key before its refusal stands: the first calls of a process also import the backend,
# compile kernels and create stream objects (CuPy work outside launches), which a later call does not do.
RECORD_TRIES = 2
MAX_RERECORDS = 64  # re-recordings of one key (its environment / module settings changed) before it is refused


class _Plan:
    __slots__ = ("replay", "env", "env_encoded", "knobs", "n_launches", "source", "rerecords", "valid", "parts",
                 "first", "first_source")

    def __init__(self, replay, env, knobs, n_launches, source, parts=None):
        self.replay, self.env, self.knobs = replay, env, knobs
        # what _compile needs to build the first-result-only replay (see first()), compiled at its first use
        self.parts, self.first, self.first_source = parts, None, None
        try:
            encode_key, encode_value = os.environ.encodekey, os.environ.encodevalue
            self.env_encoded = tuple((encode_key(k), None if v is None else encode_value(v)) for k, v in env)
        except (AttributeError, TypeError, ValueError):
            self.env_encoded = None
        self.n_launches, self.source = n_launches, source
        self.rerecords = 0
        self.valid = _validator(self)


def _validator(plan):
    """A function of no arguments: True while the environment variables and module settings the recording read
    still hold (generated code: one dict lookup or attribute load and compare per item, no loop)."""
    ns = {"_MISSING": _MISSING, "_os": os, "_getattr": getattr, "_fallback": lambda: _still_valid(plan)}
    terms = []
    head = "    _env = _os.environ\n"
    if plan.env_encoded is not None:
        # os._Environ's dict of encoded keys and values: no encoding per call (another mapping: the plain loop)
        head += ("    _data = _getattr(_env, '_data', None)\n"
                 "    if type(_data) is not dict:\n        return _fallback()\n")
        for n, (k, v) in enumerate(plan.env_encoded):
            ns[f"_ek{n}"], ns[f"_ev{n}"] = k, v
            terms.append(f"_data.get(_ek{n}) == _ev{n}")
    else:
        for n, (k, v) in enumerate(plan.env):
            ns[f"_ek{n}"], ns[f"_ev{n}"] = k, v
            terms.append(f"_env.get(_ek{n}) == _ev{n}")
    for n, (module, attr, v) in enumerate(plan.knobs):
        ns[f"_m{n}"], ns[f"_a{n}"], ns[f"_v{n}"], ns[f"_t{n}"] = module, attr, v, type(v)
        # the same value of the same type (1, 1.0 and True differ as settings)
        terms.append(f"((_x := _getattr(_m{n}, _a{n}, _MISSING)) is _v{n} or (type(_x) is _t{n} and _x == _v{n}))")
    body = " and\n            ".join(terms) if terms else "True"
    source = f"def valid():\n{head}    return ({body})\n"
    exec(compile(source, "<ssmcore launch plan check>", "exec"), ns)
    return ns["valid"]


def _key(name, args, grad=False):
    """(key, pointers, device) of a call, or None when the fast path does not apply (with ``grad``: also when a
    tensor requires grad, as :func:`hit` needs)."""
    parts = [name]
    ptrs = []
    device = None
    for a in args:
        ta = type(a)
        if ta is Tensor or ta is _Parameter:
            if not a.is_cuda or (grad and a.requires_grad):
                return None
            dev = a.get_device()
            if device is None:
                device = dev
            elif dev != device:
                return None
            p = a.data_ptr()
            ptrs.append(p)
            parts.append((a.dtype, a.shape, a.stride(), p & 63))
        elif a is None:
            ptrs.append(0)
            parts.append(None)
        elif ta is bool or ta is int or ta is str:
            ptrs.append(0)
            parts.append((ta, a))
        elif ta is float:
            ptrs.append(0)
            parts.append((ta, a.hex()))  # exact bits (0.0 and -0.0 differ; a NaN never hits)
        else:
            return None  # (a tensor subclass among them: the op's dispatch, as ops._plain_eager says)
    if device is None:
        return None
    parts.append(device)
    return tuple(parts), ptrs, device


def _context_ok(device) -> bool:
    """Nothing unusual around the call (see the module doc)."""
    return (_rt.launch is _rt._ORIGINAL_LAUNCH
            and not torch.is_autocast_enabled("cuda")
            and not torch.are_deterministic_algorithms_enabled()
            and not torch._C._len_torch_dispatch_stack()
            and not torch._C._is_torch_function_mode_enabled()
            and _raw_stream(device) == 0
            and _cupy.cuda.runtime.getDevice() == device)


def _import():
    global _rt, _cupy, _arrays
    try:
        import cupy

        from ssmcore.backends.cupy import _arrays as arrays
        from ssmcore.backends.cupy import _runtime
    except ImportError:
        return False
    global _launch_kernel, _CScalar, _raw_stream, _get_device
    _raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _bridge._current_raw_stream
    _get_device = cupy.cuda.runtime.getDevice
    _cupy, _arrays, _rt = cupy, arrays, _runtime  # (_rt last: hit() takes _rt set as everything set)
    try:
        from cupy._core._scalar import CScalar
        from cupy.cuda import function as cupy_function

        # CuPy >= 13 passes a scalar argument as a CScalar (and an array as a CIntptr): the same bytes here
        # (CUDA only: the HIP build was not measured)
        if (int(cupy.__version__.split(".")[0]) >= 13 and hasattr(cupy_function, "CIntptr")
                and not _runtime.is_hip()):
            _launch_kernel, _CScalar = cupy.cuda.driver.launchKernel, CScalar
    except Exception:  # noqa: BLE001 - no driver launch: replays call the kernels through CuPy
        _launch_kernel = _CScalar = None
    return True


def run(name, fn, args, kwargs):
    """``fn(*args, **kwargs)`` (an op's implementation), replayed from a plan when one applies."""
    if not ENABLED or kwargs:
        return fn(*args, **kwargs)
    found = _key(name, args)
    if found is None or (_rt is None and not _import()):
        return fn(*args)
    key, ptrs, device = found
    if not _context_ok(device):
        return fn(*args)
    plan = _PLANS.get(key)
    tries = rerecords = 0
    if plan is None and RECORD_AFTER > 1:
        seen = _SEEN.get(key, 0) + 1
        if seen < RECORD_AFTER:  # a key met once (a one-off shape) is not worth a recording yet
            if len(_SEEN) >= MAX_PLANS:
                _SEEN.clear()
            _SEEN[key] = seen
            return fn(*args)
        _SEEN.pop(key, None)
    if plan is not None:
        if type(plan) is _Refused:
            if plan.tries >= RECORD_TRIES:
                return fn(*args)
            tries = plan.tries
        elif plan.valid():
            STATS["hits"] += 1
            return plan.replay(ptrs, args)
        else:
            STATS["rerecorded"] += 1
            rerecords = plan.rerecords + 1
            if rerecords > MAX_RERECORDS:  # a setting that changes all the time (a counter?): stop recording
                _PLANS[key] = _Refused("the settings it read change between calls", RECORD_TRIES)
                return fn(*args)
    return _record(name, fn, args, key, ptrs, device, tries, rerecords)


MISS = object()  # hit(): no plan replayed (take the normal path)


def hit(name, args, first=False):
    """The replayed result of op ``name`` on ``args`` -- only its first result when ``first`` -- or MISS.

    One pass for what ``ops._plain_eager`` and :func:`run` check (nothing traces, compiles or intercepts, autograd
    has nothing to record, plain CUDA tensors of one device, the legacy default stream, no autocast...) and the call
    key: the eager calls of ``ops.eager`` (the drop-ins) try it first; a miss (no plan yet, a refused or stale one,
    anything unusual) takes their normal path, which also records. The key is :func:`_key`'s."""
    if (not ENABLED or not ONE_PASS or _rt is None or torch.compiler.is_compiling() or _len_dispatch_stack()
            or _function_mode_enabled() or _peek_interpreter_stack() is not None or _tracing_state() is not None
            or _forward_ad._current_level >= 0 or _rt.launch is not _rt._ORIGINAL_LAUNCH
            or _autocast_enabled("cuda") or _deterministic()):
        return MISS
    found = _key(name, args, _grad_enabled())
    if found is None:
        return MISS
    key, ptrs, device = found
    plan = _PLANS.get(key)
    if (type(plan) is not _Plan or _raw_stream(device) != 0 or _get_device() != device
            or not plan.valid()):
        return MISS
    STATS["hits"] += 1
    if first:
        replay = plan.first
        if replay is None:
            replay = _first_replay(plan)
            if replay is None:
                return plan.replay(ptrs, args)[0]
        return replay(ptrs, args)
    return plan.replay(ptrs, args)


def _first_replay(plan):
    """The plan's replay returning only its first result: the other results' blocks become scratch (kept with the
    plan when small, as any scratch), placeholders are not made. The same launches with the same arguments, so the
    first result is bitwise the full replay's."""
    if plan.parts is None:
        return None
    blocks, launches, outputs, as_tuple, used, device, casts = plan.parts
    if not as_tuple or not outputs or outputs[0] is None:
        return None
    j0 = outputs[0][0]
    replay, source = _compile(blocks, launches, outputs[:1], False, {j0: 0}, device, casts)
    plan.first, plan.first_source = replay, source
    return replay


def _still_valid(plan) -> bool:
    environ = os.environ
    data = getattr(environ, "_data", None)  # os._Environ's dict of encoded keys and values: no encoding per call
    if data is not None and plan.env_encoded is not None:
        for k, v in plan.env_encoded:
            if data.get(k) != v:
                return False
    else:
        for k, v in plan.env:
            if environ.get(k) != v:
                return False
    for module, attr, v in plan.knobs:
        got = getattr(module, attr, _MISSING)
        if got is not v and (type(got) is not type(v) or got != v):
            return False
    return True


_MISSING = object()


# ------------------------------------------------------------------------------------------ recording

_HERE = os.path.dirname(os.path.abspath(__file__))


def _dirs():
    import ssmcore
    from ssmcore.backends.cupy import _runtime

    root = os.path.dirname(os.path.abspath(ssmcore.__file__)) + os.sep
    backend = os.path.dirname(os.path.abspath(_runtime.__file__)) + os.sep
    cupy_dir = os.path.dirname(os.path.abspath(_cupy.__file__)) + os.sep
    # line-traced: ssmcore's core (checks, dispatch, ops) and the CuPy backend
    return (root, backend), backend, cupy_dir, _runtime.function.__code__.co_filename


# CuPy C functions/methods that only make views or set up the stream/device/allocator.
_C_OK = frozenset({
    "ascontiguousarray", "transpose", "reshape", "view", "swapaxes", "squeeze", "ravel", "getDevice",
    "get_current_stream", "__enter__", "__exit__", "_get_thread_local_allocator", "_set_thread_local_allocator",
    "expand_dims", "broadcast_to", "diagonal",
})


def _is_cupy_callable(fn) -> bool:
    module = getattr(fn, "__module__", None)
    if isinstance(module, str) and module.startswith("cupy"):
        return True
    owner = getattr(fn, "__objclass__", None)
    if owner is None:
        owner = getattr(fn, "__self__", None)
        if owner is None or type(owner).__name__ == "module":
            return False
        owner = type(owner)
    return isinstance(getattr(owner, "__module__", None), str) and owner.__module__.startswith("cupy")


_LINE_CHECKS: dict = {}  # filename -> {line: ((kind, name), ...)}


def _line_checks(filename):
    """Per source line of ``filename``: what to check before it runs. ('array', name): refuse when ``name`` is a
    CuPy array (a subscript store into it, an in-place update of it, int()/float()/bool() of it); ('refuse', text):
    refuse whenever the line runs (a form whose target we cannot look up)."""
    checks = _LINE_CHECKS.get(filename)
    if checks is not None:
        return checks
    checks = {}
    try:
        with open(filename) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        _LINE_CHECKS[filename] = None
        return None

    def add(node, check):
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
            checks.setdefault(line, []).append(check)

    def target_check(t, node):
        if isinstance(t, ast.Name):
            return ("array", t.id)
        if isinstance(t, ast.Subscript):
            base = t.value
            while isinstance(base, ast.Subscript):
                base = base.value
            if isinstance(base, ast.Name):
                return ("array", base.id)
            # name.attr[.attr...][...] = v (e.g. a dict attribute of an object): looked up when the line runs
            chain = []
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and chain:
                return ("array", (base.id,) + tuple(reversed(chain)))
        return ("refuse", ast.unparse(node)[:60])

    for node in ast.walk(tree):
        if isinstance(node, ast.AugAssign):
            add(node, target_check(node.target, node))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Subscript) and isinstance(sub.ctx, ast.Store):
                        add(node, target_check(sub, node))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "cupy"):
            # cupy.<f>(...): a Python function is seen by the profile hook; a ufunc / kernel object is not
            obj = getattr(_cupy, node.func.attr, None) if _cupy is not None else None
            if not (isinstance(obj, type) or type(obj).__name__ == "function"):
                add(node, ("refuse", ast.unparse(node)[:60]))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("int", "float", "bool", "complex") and node.args):
            arg = node.args[0]
            while isinstance(arg, ast.Subscript):
                arg = arg.value
            if isinstance(arg, ast.Name):
                add(node, ("array", arg.id))
    checks = {line: tuple(v) for line, v in checks.items()}
    _LINE_CHECKS[filename] = checks
    return checks


class _EnvSpy(collections.abc.MutableMapping):
    """``os.environ`` while recording: notes the keys the recording thread reads."""

    def __init__(self, env, recorder):
        self._env = env
        self._rec = recorder

    def _note(self, key):
        if threading.get_ident() == self._rec.thread:
            self._rec.env[key] = self._env.get(key)

    def __getitem__(self, key):
        self._note(key)
        return self._env[key]

    def get(self, key, default=None):
        self._note(key)
        return self._env.get(key, default)

    def __contains__(self, key):
        self._note(key)
        return key in self._env

    def __setitem__(self, key, value):
        self._env[key] = value

    def __delitem__(self, key):
        del self._env[key]

    def __iter__(self):
        if threading.get_ident() == self._rec.thread:
            self._rec.refuse("the environment was iterated")
        return iter(self._env)

    def __len__(self):
        return len(self._env)

    def copy(self):
        return self._env.copy()

    def __getattr__(self, name):
        return getattr(self._env, name)


class _LineTracer:
    """The local trace function of one line-checked frame (see :func:`_line_checks`): refuses the recording when a
    checked line stores into, updates or converts a CuPy array. Holds no reference to itself (no cycle)."""

    __slots__ = ("rec", "checks")

    def __init__(self, rec, checks):
        self.rec, self.checks = rec, checks

    def __call__(self, frame, event, arg):
        if event == "line":
            try:
                self.check(frame)
            except Exception as err:
                self.rec.refuse(f"recorder error {err!r}")
        return self

    def check(self, frame):
        todo = self.checks.get(frame.f_lineno)
        if not todo:
            return
        rec = self.rec
        for kind, what in todo:
            if kind == "refuse":
                rec.refuse(f"line {frame.f_lineno} of {os.path.basename(frame.f_code.co_filename)}: {what}")
            else:
                if isinstance(what, tuple):  # an attribute chain: a failed lookup refuses
                    name, attrs = what[0], what[1:]
                    value = frame.f_locals.get(name, frame.f_globals.get(name))
                    for attr in attrs:
                        value = getattr(value, attr)
                    what = ".".join((name,) + attrs)
                else:
                    value = frame.f_locals.get(what, frame.f_globals.get(what))
                if isinstance(value, _cupy.ndarray):
                    rec.refuse(f"line {frame.f_lineno} of {os.path.basename(frame.f_code.co_filename)} works on "
                               f"array {what}")


class _Recorder:
    def __init__(self, args, ptrs, device):
        self.thread = threading.get_ident()
        self.device = device
        self.args = args
        self.ptrs = ptrs
        # [(weak reference to the _Block, requested bytes, its address, weak reference to its torch storage)]
        self.blocks = []
        self.hold = []  # the _Blocks themselves, when FREE_EARLY is off (the session-6 recorder kept them all)
        self.casts = []  # [(float32 tensor made by torch, argument index)]
        self.launches = []  # [(kernel, grid, block, template, shared_mem, stream)]
        self.reason = None
        self.rt_depth = 0
        self.modules = {}
        self.env = {}
        self.extents = [(p, p + _bridge.span_bytes(a)) for a, p in zip(args, ptrs) if isinstance(a, Tensor)]
        self.watched, self.backend_dir, self.cupy_dir, self.rt_file = _dirs()

    def refuse(self, why):
        if self.reason is None:
            self.reason = why
            if threading.get_ident() == self.thread:  # nothing more to learn: run the rest of the call untraced
                sys.setprofile(None)
                sys.settrace(None)

    # -- hooks
    def on_alloc(self, size, block):
        if threading.get_ident() != self.thread:
            return
        try:
            self._on_alloc(size, block, sys._getframe(2))  # 0: this, 1: _torch_malloc, 2: who allocated
        except Exception as err:  # a recorder bug must not break the call: refuse the plan instead
            self.refuse(f"recorder error {err!r}")

    def _on_alloc(self, size, block, caller):
        if caller.f_code is not _EMPTY_CODE:
            self.refuse(f"allocation in {caller.f_code.co_name} ({os.path.basename(caller.f_code.co_filename)}:"
                        f"{caller.f_lineno})")
        if block is not None:
            # held weakly: a scratch block goes back to torch when the normal path drops it, as without the
            # recorder (a launch's arrays hold their blocks, so a block a launch uses is alive to be matched)
            p = block.tensor.data_ptr()
            self.blocks.append((weakref.ref(block), size, p, _StorageWeakRef(block.tensor.untyped_storage())))
            if not FREE_EARLY:
                self.hold.append(block)
            self.extents.append((p, p + size))

    def on_launch(self, kernel, grid, block, args, shared_mem):
        if threading.get_ident() != self.thread:
            return
        try:
            self._on_launch(kernel, grid, block, args, shared_mem)
        except Exception as err:
            self.refuse(f"recorder error {err!r}")

    def _on_launch(self, kernel, grid, block, args, shared_mem):
        ndarray = _cupy.ndarray
        template = []
        for a in args:
            if isinstance(a, ndarray):
                template.append(self._slot(a))
            elif a is None or isinstance(a, (np.generic, bool, int, float)):
                if isinstance(a, (np.integer, int)) and not isinstance(a, bool) and int(a) >= 4096 and any(
                        lo <= int(a) < hi for lo, hi in self.extents):
                    self.refuse("an integer argument that points into an array")
                template.append(("C", a))
            else:
                self.refuse(f"a launch argument of type {type(a).__name__}")
                template.append(("C", a))
        self.launches.append((kernel, grid, block, tuple(template), shared_mem, _cupy.cuda.get_current_stream()))

    def on_cast(self, a, dtype):
        """``_arrays.contiguous`` casting ``a`` (a whole input tensor, float16/bfloat16, C-contiguous) to float32:
        done by torch (``Tensor.to``, exact for these widenings, as CuPy's cast is), so a replay repeats it."""
        if threading.get_ident() != self.thread:
            return None
        try:
            if np.dtype(dtype) != np.float32 or a.dtype.name not in ("float16", "bfloat16"):
                return None
            owner = getattr(a.data.mem, "_owner", None)
            found = [i for i, t in enumerate(self.args) if t is owner]
            if len(found) != 1 or not isinstance(owner, Tensor):
                return None
            i = found[0]
            if (a.data.ptr != self.ptrs[i] or tuple(a.shape) != tuple(owner.shape) or not a.flags.c_contiguous
                    or not owner.is_contiguous() or owner.dtype not in (torch.float16, torch.bfloat16)):
                return None
            t = owner.to(torch.float32)
            self.casts.append((t, i))
            return _bridge._cupy_view("cast", t)
        except Exception as err:
            self.refuse(f"recorder error {err!r}")
            return None

    def _slot(self, a):
        if a.size == 0:
            self.refuse("an empty array argument")
            return ("C", None)
        mem = a.data.mem
        owner = getattr(mem, "_owner", None)
        ptr = a.data.ptr
        if type(owner) is _bridge._Block:
            for j, (ref, _, _, _) in enumerate(self.blocks):
                if ref() is owner:
                    return ("B", j, ptr - mem.ptr)
            self.refuse("an allocation made outside the call")
            return ("C", None)
        for k, (t, _) in enumerate(self.casts):
            if t is owner:
                return ("X", k, ptr - t.data_ptr())
        found = [i for i, t in enumerate(self.args) if t is owner]
        if len(found) != 1 or not isinstance(owner, Tensor):
            self.refuse("an array of unknown origin" if not found else "one tensor passed as two arguments")
            return ("C", None)
        i = found[0]
        return ("P", i, ptr - self.ptrs[i])

    def on_profile(self, frame, event, arg):
        try:
            self._on_profile(frame, event, arg)
        except Exception as err:
            self.refuse(f"recorder error {err!r}")

    def _on_profile(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            filename = code.co_filename
            if filename == self.rt_file:
                self.rt_depth += 1
            elif self.rt_depth:
                pass
            elif filename.startswith(self.cupy_dir):
                if code not in _CUPY_OK_CODES:
                    self.refuse(f"cupy's {code.co_name}")
            elif filename.startswith(self.backend_dir):
                name = frame.f_globals.get("__name__")
                if name:
                    self.modules[name] = sys.modules.get(name)
        elif event == "return":
            if frame.f_code.co_filename == self.rt_file:
                self.rt_depth -= 1
        elif event == "c_call" and not self.rt_depth and _is_cupy_callable(arg):
            name = getattr(arg, "__name__", "?")
            if name not in _C_OK:
                self.refuse(f"cupy's {name}")

    def on_trace(self, frame, event, arg):
        # Global trace function: line-trace the frames of ssmcore's own files (not _runtime, not cupy).
        try:
            return self._on_trace(frame)
        except Exception as err:
            self.refuse(f"recorder error {err!r}")
            return None

    def _on_trace(self, frame):
        filename = frame.f_code.co_filename
        if filename.startswith(self.watched) and filename != self.rt_file and not self.rt_depth:
            checks = _line_checks(filename)
            if checks is None:
                self.refuse(f"no source for {os.path.basename(filename)}")
                return None
            if checks:
                return self._local_tracer(checks)
        return None

    def _local_tracer(self, checks):
        # an object, not a closure: a nested function returning itself would sit in a reference cycle (its closure
        # cell holds it) with the recorder, and so the op's arguments, alive until the next cyclic collection
        return _LineTracer(self, checks)

    def release(self):
        """Drop what the recording held (the op's arguments, torch casts, launch arguments, module and block
        references): whatever still refers to the recorder (a frame's trace function) then keeps nothing alive,
        and a late call of its hooks touches neither the plans nor this thread's trace and profile functions."""
        self.thread = None
        self.args = self.ptrs = None
        self.casts, self.hold, self.blocks, self.launches, self.extents = [], [], [], [], []
        self.modules, self.env = {}, {}

    # -- the plan
    def finish(self, out):
        results = out if isinstance(out, tuple) else (out,)
        outputs = []  # per result: None (placeholder) or block index
        used = {}
        for t in results:
            if not isinstance(t, Tensor) or type(t) not in _PLAIN:
                self.refuse("a result that is not a tensor")
                return None
            if t.numel() == 0:
                if t.shape == (0,) and t.dtype == torch.float32:
                    outputs.append(None)
                    continue
                self.refuse("an empty result")
                return None
            base = t.untyped_storage().data_ptr()
            # a result's tensor holds its block's storage, not the _Block: matched by storage (a weak reference
            # keeps a dead block's storage object from being reused, so a copy placed where a freed block was does
            # not match it) and address, the latest such block (an earlier one there was freed before it was made)
            cdata = t.untyped_storage()._cdata
            j = next((j for j in range(len(self.blocks) - 1, -1, -1)
                      if self.blocks[j][3].cdata == cdata and self.blocks[j][2] == base), None)
            if j is None or j in used or t.storage_offset() != 0 or _bridge.span_bytes(t) != self.blocks[j][1]:
                self.refuse("a result that is not exactly one fresh allocation (copied, aliased or partial)")
                return None
            used[j] = len(outputs)
            outputs.append((j, tuple(t.shape), tuple(t.stride()), t.dtype))
        if self.reason is not None:
            return None
        knobs = []
        for module in self.modules.values():
            if module is None:
                continue
            for attr, value in vars(module).items():
                if (attr[:1].islower() and not attr.startswith("_")
                        and (value is None or type(value) in (str, int, float, bool))):
                    knobs.append((module, attr, value))
        env = tuple(sorted((k, v) for k, v in self.env.items() if isinstance(k, str)))
        casts = [i for _, i in self.casts]
        replay, source = _compile(self.blocks, self.launches, outputs, isinstance(out, tuple), used, self.device,
                                  casts)
        sizes = [(None, b[1]) for b in self.blocks]  # (the plan holds no block, no weak reference either)
        parts = (sizes, self.launches, outputs, isinstance(out, tuple), used, self.device, casts)
        return _Plan(replay, env, tuple(knobs), len(self.launches), source, parts)


_EMPTY_CODE = None
_CUPY_OK_CODES: frozenset = frozenset()
_StorageWeakRef = None  # torch.multiprocessing.reductions.StorageWeakRef, imported with the first recording


def _torch_device(index):
    return torch.device("cuda", index)


def _compile(blocks, launches, outputs, as_tuple, used, device, casts=()):
    """The replay function (and its Python source): allocations, launches with pointer arithmetic, results.

    With DRIVER_LAUNCH and every kernel launchable through the driver (see :func:`_driver_spec`) the launches go
    through ``launchKernel`` (pointer slots packed into each launch's parameter buffer, under the plan's lock;
    a second thread replaying the same plan at the same time takes the CuPy-call replay); else through CuPy's
    kernel call, as the normal path does."""
    cupy_replay, cupy_source = _compile_one(blocks, launches, outputs, as_tuple, used, device, casts, None)
    specs = [_driver_spec(*launch) for launch in launches] if DRIVER_LAUNCH else None
    if not specs or any(spec is None for spec in specs):
        return cupy_replay, cupy_source
    replay, source = _compile_one(blocks, launches, outputs, as_tuple, used, device, casts, (specs, cupy_replay))
    return replay, source + "\n# when the plan is busy in another thread:\n" + cupy_source


def _driver_spec(kernel, grid, block, template, shared_mem, stream):
    """What a direct driver launch needs -- (function pointer, grid (3), block (3), stream pointer, constants as
    CuPy would pass them) -- or None when the launch must go through CuPy's call."""
    if _launch_kernel is None or _CScalar is None or getattr(kernel, "enable_cooperative_groups", False):
        return None
    function_type = getattr(getattr(_cupy, "cuda", None), "Function", None)
    if function_type is not None and isinstance(kernel, function_type):
        function = kernel
    else:
        function = getattr(kernel, "kernel", None)  # cupy.RawKernel -> its cupy.cuda.Function (this device)
    fptr = getattr(function, "ptr", None)
    sptr = getattr(stream, "ptr", None)
    if type(fptr) is not int or not fptr or type(sptr) is not int:
        return None
    try:
        g = tuple(max(1, int(v)) for v in (tuple(grid) + (1, 1))[:3])
        b = tuple(max(1, int(v)) for v in (tuple(block) + (1, 1))[:3])
        constants = {}
        for m, slot in enumerate(template):
            if slot[0] == "C":
                value = slot[1]
                if value is None or not isinstance(value, (np.generic, bool, int, float)):
                    return None  # (None: CuPy versions differ in what they pass)
                constants[m] = _CScalar(value)  # CuPy's own by-value form of a scalar argument (its _pointer)
    except Exception:  # noqa: BLE001 - anything odd: the CuPy call
        return None
    return fptr, g, b, int(shared_mem), sptr, constants, function


def _compile_one(blocks, launches, outputs, as_tuple, used, device, casts, driver):
    ns = {"_empty": torch.empty, "_empty_strided": torch.empty_strided, "_uint8": torch.uint8,
          "_absent": _bridge.absent, "_f32": torch.float32}
    ns["d"] = _torch_device(device)  # plans are per device (the key holds it)
    lines = ["def replay(P, A):"]
    ind = "    "
    if driver is not None:
        specs, cupy_replay = driver
        ns.update(_lock=threading.Lock(), _slow=cupy_replay, _L=_launch_kernel, _tid=threading.get_ident,
                  _ctx=_CONTEXT_THREADS, _ensure=_ensure_context)
        lines += ["    if not _lock.acquire(False):", "        return _slow(P, A)",
                  "    if _tid() not in _ctx:", "        _ensure()", "    try:"]
        ind = "        "
    for k, i in enumerate(casts):  # parameters cast to float32 (torch, on the current stream, before the launches)
        lines.append(f"{ind}x{k} = A[{i}].to(_f32)")
        lines.append(f"{ind}c{k} = x{k}.data_ptr()")
    first, last = {}, {}  # block -> index of the first / last launch that uses it
    for n, launch in enumerate(launches):
        for slot in launch[3]:
            if slot[0] == "B":
                first.setdefault(slot[1], n)
                last[slot[1]] = n
    needed = set(used) | set(first)
    kept = set()  # scratch blocks allocated once with the plan (driver launches only, small scratch only)
    scratch = [j for j in first if j not in used]
    scratch_bytes = sum(((blocks[j][1] + 15) >> 4) << 4 for j in scratch)
    global _kept_bytes
    if (driver is not None and scratch and scratch_bytes <= KEEP_SCRATCH
            and _kept_bytes + scratch_bytes <= KEEP_SCRATCH_TOTAL):
        _kept_bytes += scratch_bytes
        for j in scratch:
            t = ns[f"_kept{j}"] = torch.empty(((blocks[j][1] + 15) >> 4) << 4, dtype=torch.uint8, device=ns["d"])
            lines.append(f"{ind}b{j} = {t.data_ptr()}")
            kept.add(j)
        needed -= kept
    early = FREE_EARLY and bool(launches)
    allocate_at = {}  # launch index -> blocks allocated just before it (-1: up front)
    for j in sorted(needed):
        at = first.get(j, 0) if early else -1
        allocate_at.setdefault(at if early else -1, []).append(j)
    free_after = {}  # launch index -> scratch blocks dropped after it
    if early:
        for j, n in last.items():
            if j not in used and j not in kept:
                free_after.setdefault(n, []).append(j)

    def allocate(j):
        size = blocks[j][1]
        if j in used:
            _, shape, stride, dtype = outputs[used[j]]
            ns[f"_dt{j}"] = dtype
            lines.append(f"{ind}o{j} = _empty_strided({shape!r}, {stride!r}, dtype=_dt{j}, device=d)")
        else:
            lines.append(f"{ind}o{j} = _empty(({((size + 15) >> 4) << 4},), dtype=_uint8, device=d)")
        lines.append(f"{ind}b{j} = o{j}.data_ptr()")

    for j in allocate_at.get(-1, ()):
        allocate(j)
    for n, (kernel, grid, block, template, shared_mem, stream) in enumerate(launches):
        for j in allocate_at.get(n, ()) if early else ():
            allocate(j)
        items = []  # (parameter index, expression) of the per-call arguments
        for m, slot in enumerate(template):
            if slot[0] == "P":
                items.append((m, f"P[{slot[1]}] + {slot[2]}" if slot[2] else f"P[{slot[1]}]"))
            elif slot[0] == "B":
                items.append((m, f"b{slot[1]} + {slot[2]}" if slot[2] else f"b{slot[1]}"))
            elif slot[0] == "X":
                items.append((m, f"c{slot[1]} + {slot[2]}" if slot[2] else f"c{slot[1]}"))
            else:
                items.append((m, None))
        if driver is None:
            ns[f"_k{n}"], ns[f"_g{n}"], ns[f"_bl{n}"], ns[f"_s{n}"] = kernel, grid, block, stream
            exprs = []
            for m, expr in items:
                if expr is None:
                    ns[f"_c{n}_{m}"] = template[m][1]
                    expr = f"_c{n}_{m}"
                exprs.append(expr)
            lines.append(f"{ind}_k{n}(_g{n}, _bl{n}, ({', '.join(exprs)}{',' if len(exprs) == 1 else ''}), "
                         f"shared_mem={int(shared_mem)}, stream=_s{n})")
        else:
            fptr, g, b, smem, sptr, constants, function = specs[n]
            variable = [(m, expr) for m, expr in items if expr is not None]
            # one buffer per launch: the pointer slots (8 bytes each, as CuPy passes an int), written per call;
            # the parameter array (one address per kernel parameter) and the constants are fixed
            slots = (ctypes.c_uint64 * max(1, len(variable)))()
            params = (ctypes.c_void_p * max(1, len(template)))()
            base = ctypes.addressof(slots)
            for k, (m, _) in enumerate(variable):
                params[m] = base + 8 * k
            for m, scalar in constants.items():
                params[m] = scalar.ptr
            ns[f"_keep{n}"] = (slots, params, constants, kernel, function)  # alive as long as the plan (module too)
            if variable:
                ns[f"_pk{n}"] = struct.Struct(f"<{len(variable)}Q").pack_into
                ns[f"_v{n}"] = slots
                lines.append(f"{ind}_pk{n}(_v{n}, 0, {', '.join(expr for _, expr in variable)})")
            lines.append(f"{ind}_L({fptr}, {g[0]}, {g[1]}, {g[2]}, {b[0]}, {b[1]}, {b[2]}, {smem}, {sptr}, "
                         f"{ctypes.addressof(params)}, 0)")
        for j in free_after.get(n, ()):
            lines.append(f"{ind}del o{j}")
    results = [f"o{o[0]}" if o is not None else "_absent(d)" for o in outputs]
    if as_tuple:
        lines.append(f"{ind}return ({', '.join(results)}{',' if len(results) == 1 else ''})")
    else:
        lines.append(f"{ind}return {results[0]}")
    if driver is not None:
        lines += ["    finally:", "        _lock.release()"]
    source = "\n".join(lines)
    exec(compile(source, "<ssmcore launch plan>", "exec"), ns)
    return ns["replay"], source


_launch_kernel = None  # cupy.cuda.driver.launchKernel, set by _import
_CScalar = None  # cupy._core._scalar.CScalar: what CuPy's kernel call makes of a scalar argument
_CONTEXT_THREADS: set = set()  # threads known to have a current CUDA context (CuPy's call checks per launch)


def _ensure_context() -> None:
    """What CuPy's kernel call does before a launch: make sure this thread has a current CUDA context."""
    if _cupy.cuda.driver.ctxGetCurrent() == 0:
        _cupy.cuda.runtime.free(0)  # cudaFree(0): the runtime binds the current device's primary context
    _CONTEXT_THREADS.add(threading.get_ident())


def _record(name, fn, args, key, ptrs, device, tries=0, rerecords=0):
    """Run ``fn`` under the recorder; cache a plan (or the refusal)."""
    global _EMPTY_CODE, _CUPY_OK_CODES, _kept_bytes, _StorageWeakRef
    if (sys.getprofile() is not None or sys.gettrace() is not None or not _stream_known(device)
            or not _lock.acquire(blocking=False)):
        # a profiler, debugger or another recording is running, or the first call on this stream: not now
        return fn(*args)
    rec = None
    try:
        if _EMPTY_CODE is None:
            from cupy._creation import basic, from_data
            from torch.multiprocessing.reductions import StorageWeakRef

            _StorageWeakRef = StorageWeakRef
            _EMPTY_CODE = basic.empty.__code__
            _CUPY_OK_CODES = frozenset({basic.empty.__code__, from_data.ascontiguousarray.__code__})
        rec = _Recorder(args, ptrs, device)
        environ = os.environ
        os.environ = _EnvSpy(environ, rec)
        _rt._recorder = rec.on_launch
        _bridge._alloc_hook = rec.on_alloc
        _arrays._cast_hook = rec.on_cast
        sys.setprofile(rec.on_profile)
        sys.settrace(rec.on_trace)
        try:
            out = fn(*args)
        finally:
            sys.settrace(None)
            sys.setprofile(None)
            _bridge._alloc_hook = None
            _arrays._cast_hook = None
            _rt._recorder = None
            os.environ = environ
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
            _kept_bytes = 0
        plan = rec.finish(out)
        if plan is None:
            STATS["refused"] += 1
            REFUSED[name] = rec.reason
            _PLANS[key] = _Refused(rec.reason, tries + 1)
        else:
            STATS["recorded"] += 1
            plan.rerecords = rerecords
            _PLANS[key] = plan
        return out
    finally:
        if rec is not None:
            rec.release()  # nothing of the call outlives it through the recorder (see _Recorder.release)
        _lock.release()


def _stream_known(device) -> bool:
    """True when the adapter has already made its CuPy stream object for torch's default stream of ``device``
    (the first call makes it, with CuPy calls a recording would refuse)."""
    return (device, 0) in _bridge._streams


def plans_of(name):
    """The plans and refusals recorded for op ``name`` (for tests and benchmarks)."""
    return [(k, p) for k, p in _PLANS.items() if k[0] == name]

"""Argument checks shared by every op.

Every op validates all of its arguments before any kernel runs and raises a
``ValueError`` (wrong shape, range, value) or ``TypeError`` (wrong kind of
object, wrong dtype) whose message names the argument, says what was expected
and what was given.

Shapes are checked with :class:`Dims`: an expected shape is written with the
dimension letters of the glossary (B batch, L length, D channels, N state size,
G groups, H heads, P head dim, W conv width, S sequences), and the first array
that shows a letter fixes its size for the rest of the call::

    dims = Dims()
    dims.check("u", u, "BDL", ACT)
    dims.check("delta", delta, "BDL", ACT)   # must match u's B, D, L
    dims.check("A", A, "DN", PARAM)
"""

from __future__ import annotations

import math
import numbers

# Activation dtypes: float32/float16/bfloat16 everywhere, float64 on the CPU.
ACT = ("float32", "float16", "bfloat16", "float64")
# Parameter dtypes (A, D, biases, norm weights): float32, float64 on the CPU.
PARAM = ("float32", "float64")
# Everything floating we accept anywhere.
FLOAT = ACT
# Integer index arrays (seq_idx, cu_seqlens, *_indices, cache_seqlens).
INDEX = ("int32", "int64")


# dtype -> its name: NumPy builds ``dtype.name`` in Python on every access (several microseconds),
# and every op reads it for each argument. Keyed by the dtype itself (hashable, compares by value).
_DTYPE_NAMES: dict = {}


def dtype_name(a) -> str:
    """The dtype's name as NumPy/CuPy spell it ('bfloat16' for ml_dtypes' bfloat16)."""
    dtype = a.dtype
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        name = _DTYPE_NAMES[dtype] = dtype.name
        return name
    except TypeError:  # an unhashable dtype-like object
        return dtype.name


def _shape_text(letters) -> str:
    return "(" + ", ".join(str(x) for x in letters) + ")"


_LETTERS: dict = {}


def _letters(spec) -> tuple:
    """A shape spec as a tuple of letters (str) and fixed sizes (int), memoised per spec."""
    try:
        return _LETTERS[spec]
    except KeyError:
        pass
    except TypeError:  # unhashable (a list)
        return _normalise_letters(spec)
    letters = _normalise_letters(spec)
    if len(_LETTERS) < 1024:
        _LETTERS[spec] = letters
    return letters


def _normalise_letters(spec) -> tuple:
    out = []
    for x in spec:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, numbers.Integral) and not isinstance(x, bool):
            out.append(int(x))
        else:
            raise TypeError(f"shape spec: expected dimension letters or ints, got {x!r}")
    return tuple(out)


class Dims:
    """Binds dimension letters to sizes across the arguments of one call."""

    def __init__(self, **known: int):
        self.sizes: dict[str, int] = dict(known)
        self.source: dict[str, str] = {k: "the arguments" for k in known}

    def __getitem__(self, letter: str) -> int:
        return self.sizes[letter]

    def bind(self, letter: str, size: int, source: str) -> None:
        """Fix a letter's size from something other than an array's shape."""
        if letter in self.sizes and self.sizes[letter] != size:
            raise ValueError(
                f"{source}: gives {letter}={size}, but {self.source[letter]} gave {letter}={self.sizes[letter]}"
            )
        self.sizes.setdefault(letter, size)
        self.source.setdefault(letter, source)

    def check(self, name: str, a, letters, dtypes=None, *, optional: bool = True):
        """Check that ``a`` has the shape spelled by ``letters`` and one of ``dtypes``.

        ``letters`` is a string of dimension letters or a sequence mixing letters
        and ints (fixed sizes). ``None`` passes when ``optional``.
        """
        if a is None:
            if optional:
                return None
            raise TypeError(f"{name}: an array is required, got None")
        check_is_array(name, a)
        letters = _letters(letters)
        shape = a.shape
        if type(shape) is not tuple or not all(type(s) is int for s in shape):
            shape = tuple(int(s) for s in shape)
        if len(shape) != len(letters):
            raise ValueError(
                f"{name}: expected a {len(letters)}-d array of shape {_shape_text(letters)}, got shape {shape}"
            )
        sizes = self.sizes
        for letter, size in zip(letters, shape):
            if type(letter) is not str:  # a fixed size
                if size != letter:
                    raise ValueError(f"{name}: expected shape {_shape_text(letters)}, got shape {shape}")
                continue
            bound = sizes.get(letter)
            if bound is None:
                sizes[letter] = size
                self.source[letter] = name
            elif bound != size:
                want = _shape_text(sizes.get(x, x) for x in letters)
                raise ValueError(
                    f"{name}: expected shape {_shape_text(letters)} = {want} ({letter}={bound} "
                    f"from {self.source[letter]}), got shape {shape}"
                )
        if dtypes is not None:
            check_dtype(name, a, dtypes)
        return a


class ValidCache:
    """Signatures of argument sets that passed an op's shape and dtype checks.

    The checks of ``Dims`` depend only on each array's shape and dtype, on which arguments are
    None, and on a few hashable options; an op whose checks passed for one signature passes them
    again for the same signature, so a decode loop validates once. Checks that read values or flags
    (indices, lengths, writability) are not covered and run every call. Bounded: cleared when full.
    """

    __slots__ = ("_seen", "_maxsize")

    def __init__(self, maxsize: int = 256):
        self._seen: set = set()
        self._maxsize = maxsize

    @staticmethod
    def signature(library: str, arrays, options=()) -> tuple | None:
        """The key of one call: (library, (shape, dtype) or None per array, options); None when unhashable."""
        try:
            key = (library, tuple(None if a is None else (a.shape, a.dtype) for a in arrays), options)
            hash(key)
        except (TypeError, AttributeError):
            return None
        return key

    def __contains__(self, key) -> bool:
        return key is not None and key in self._seen

    def add(self, key) -> None:
        if key is None:
            return
        if len(self._seen) >= self._maxsize:
            self._seen.clear()
        self._seen.add(key)


def check_is_array(name: str, a) -> None:
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        raise TypeError(f"{name}: expected an array (NumPy, CuPy or any __dlpack__ producer), got {type(a).__name__}")


def check_dtype(name: str, a, dtypes) -> None:
    got = dtype_name(a)
    if got not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(dtypes)}, got {got}")


def check_same_dtype(name: str, a, ref_name: str, ref) -> None:
    if a is not None and dtype_name(a) != dtype_name(ref):
        raise TypeError(f"{name}: expected dtype {dtype_name(ref)} (the dtype of {ref_name}), got {dtype_name(a)}")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool,)) and not (hasattr(value, "dtype") and value.dtype == bool and value.shape == ()):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_finite_float(name: str, value, *, positive: bool = False, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value}")
    return value


def check_int(name: str, value, *, minimum=None, maximum=None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected an int <= {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def stream_capturing(xp) -> bool:
    """True when ``xp`` is CuPy and its current stream is capturing a CUDA graph.

    Checks that read array values back to the host (a ``.max()`` turned into an int) synchronise
    the stream, which is illegal during capture; the callers skip them then and rely on the kernels'
    own bounds safety. A query that fails (e.g. the legacy stream while another stream captures in
    global mode) counts as capturing: a host sync there would fail too.
    """
    if getattr(xp, "__name__", "") != "cupy":
        return False
    try:
        return int(xp.cuda.runtime.streamIsCapturing(xp.cuda.get_current_stream().ptr)) != 0
    except Exception:
        return True


def check_indices(name, idx, n_rows, xp):
    """Pool indices: < n_rows; non-negative ones distinct (two rows updating one state would race).

    Skipped while the current CuPy stream captures a CUDA graph (the check reads values back to the
    host); the kernels then treat an index outside [0, n_rows) as padding, and repeated indices are
    not detected (rows sharing a state race; the result is unspecified but stays in bounds).
    """
    if idx is None or idx.size == 0 or stream_capturing(xp):
        return
    if int(idx.max()) >= n_rows:
        raise ValueError(f"{name}: expected indices < {n_rows} (the first dimension of the state), got max {int(idx.max())}")
    used = idx[idx >= 0]
    if int(xp.unique(used).size) != int(used.size):
        raise ValueError(f"{name}: expected distinct non-negative indices (each state row is updated once), got repeats")


def check_writable(name, a):
    if not getattr(getattr(a, "flags", None), "writeable", True):
        raise ValueError(f"{name}: is read-only, but it is updated in place")

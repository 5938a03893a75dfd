"""Pickles from the network, read without running anything: `safe_loads`.

Flow-GRPO's reward clients send `pickle.dumps({...})` bodies (JPEG bytes, GenEval records, and prompts as a
numpy array from `np.array_split`). `pickle.loads` on such a body runs whatever callable it names, and even a
restricted `find_class` leaves `REDUCE`/`BUILD` on the allowed globals, numpy's `__setstate__` of a
hostile state and the C unpickler's memo (an array sized by the largest index: a 4-byte `LONG_BINPUT`
of 2**32 asks for 32 GB) open. So this module does not use the unpickler at all: it walks the opcodes
with `pickletools.genops` (a parser: it decodes each opcode's argument and builds nothing) and runs a
small stack machine of its own over a whitelist of opcodes:

- data: None, bools, ints (at most 255 bytes), floats, str, bytes, bytearray, tuples, lists and dicts
  (keys: str, int, float, bool, None or bytes: hashing a nested tuple recurses in C);
- the memo is a dict, and `MARK`, `POP`, `DUP` work as in pickle;
- globals resolve to tokens, never to the objects: numpy's array reconstruction (`_reconstruct`,
  `ndarray`, `dtype`, `scalar`, protocol 5's `_frombuffer`, under `numpy.core` or `numpy._core`) and
  `_codecs.encode(text, "latin1")` and `bytes()` (protocol 2's bytes). `REDUCE` calls a token's own checked
  constructor, which builds the value with numpy's public API: `_reconstruct` only as
  `(ndarray, (0,), b"b")` (an empty array), `dtype(typestr, False, True)` only for a plain type
  (bool, int, uint, float, complex, fixed-length str or bytes: never object, structured or sized 0);
- `BUILD` is allowed once on a dtype (its byte order, with a state numpy itself writes for that
  type; the sender's flags are never used) and once on an array from `_reconstruct` (version 1, a shape of at most 32
  non-negative dims, a checked dtype, bytes whose length is exactly the shape's size: numpy gets only
  states it writes itself);
- every other opcode (`INST`, `OBJ`, `NEWOBJ`, `EXT*`, persistent ids, out-of-band buffers, sets,
  protocol-0 text forms) is refused, and so is data after `STOP`.

Each opcode makes at most one small object (with the walk's bookkeeping, ~200 bytes) and there are at
most `max_ops` of them, so a body of n bytes costs O(n + max_ops) memory. After loading, the result is walked without recursion: a cycle, a
nesting deeper than `max_depth` (the consumers' json, pydantic and repr recurse) or a leftover token
is refused. Any refusal is an `UnsafePickleError` (the service's 400) naming the opcode or global.
"""

from __future__ import annotations

import pickletools
from typing import Any

import numpy as np

from .errors import UnsafePickleError

MAX_DEPTH = 32  # GenEval records are ~6 deep; json.dumps, pydantic and repr recurse over nesting
MAX_DIMS = 32
MAX_LONG_BYTES = 255  # LONG1; LONG4's 4 GB integers are refused

# opcodes whose only effect is to push the decoded argument
_PUSH_ARG = {"BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
             "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_KEY_TYPES = (str, int, float, bool, type(None), bytes)


class _Token:
    """A global the pickle named: only `REDUCE` (and `_reconstruct`'s first argument) may use it."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


RECONSTRUCT, NDARRAY, DTYPE, SCALAR, FROMBUFFER, CODECS_ENCODE, EMPTY_BYTES = (
    _Token(n) for n in ("numpy _reconstruct", "numpy.ndarray", "numpy.dtype", "numpy scalar", "numpy _frombuffer",
                        "_codecs.encode", "bytes"))

# (module, name) -> token: what numpy 1.x and 2.x write for arrays, dtypes and scalars, and protocol 2's bytes
GLOBALS = {
    **{(m, "_reconstruct"): RECONSTRUCT for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): FROMBUFFER for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): NDARRAY,
    ("numpy", "dtype"): DTYPE,
    ("_codecs", "encode"): CODECS_ENCODE,
    **{(m, "bytes"): EMPTY_BYTES for m in ("builtins", "__builtin__")},  # protocol 2's b"": bytes()
}


class _DtypeSpec:
    """A `numpy.dtype(typestr, False, True)` call, before its BUILD sets the byte order; made a real dtype
    (`resolve`) only where an array or scalar uses it."""

    def __init__(self, typestr: str):
        self.dtype = _plain_dtype(typestr)
        self.built = False

    def build(self, state: Any) -> None:
        if self.built:
            raise UnsafePickleError("a numpy dtype is built twice")
        # only str, int and None compared below: == on an array would not give a bool
        if not (type(state) is tuple and len(state) == 8 and all(type(x) in (str, int, type(None)) for x in state)
                and state[1] in ("<", ">", "|", "=")):
            raise UnsafePickleError("a numpy dtype's state is not one numpy writes")
        order = state[1]
        expected = (self.dtype if order in "|=" else self.dtype.newbyteorder(order)).__reduce__()[2]
        # the state numpy writes for this plain type, but for its flags (which we never pass on)
        if state[:7] != expected[:7] or type(state[7]) is not int:
            raise UnsafePickleError(f"a numpy dtype's state does not match its type {self.dtype.str!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)
        self.built = True


def _plain_dtype(typestr: Any) -> np.dtype:
    """The dtype of a plain typestr ('f8', 'U16', 'b1'...): no objects, fields, sub-arrays or zero size."""
    if not isinstance(typestr, str) or len(typestr) > 16 or not typestr[:1].isalpha() or not typestr[1:].isdigit():
        raise UnsafePickleError(f"numpy dtype {str(typestr)[:40]!r} is not allowed: only bool, int, float, complex, str and bytes")
    try:
        dtype = np.dtype(typestr)
    except (TypeError, ValueError):
        raise UnsafePickleError(f"numpy dtype {typestr!r} is not a valid dtype") from None
    if dtype.kind not in "biufcUS" or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise UnsafePickleError(f"numpy dtype {typestr!r} is not allowed: only bool, int, float, complex, str and bytes")
    return dtype


def _dtype_of(value: Any) -> np.dtype:
    if not isinstance(value, _DtypeSpec):
        raise UnsafePickleError("a numpy array or scalar must name a dtype made by numpy.dtype")
    return value.dtype


def _shape(value: Any) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and len(value) <= MAX_DIMS and all(type(d) is int and d >= 0 for d in value)):
        raise UnsafePickleError(f"a numpy shape must be a tuple of at most {MAX_DIMS} non-negative integers")
    return value


def _data(value: Any, dtype: np.dtype, shape: tuple[int, ...]) -> bytes | bytearray:
    size = dtype.itemsize
    for d in shape:
        size *= d
    if not isinstance(value, (bytes, bytearray)):
        raise UnsafePickleError("a numpy array's data must be bytes (object arrays are not allowed)")
    if len(value) != size:
        raise UnsafePickleError(f"a numpy array's data has {len(value)} bytes; its shape and dtype need {size}")
    return value


def _args(args: Any, n: int, name: str) -> tuple:
    if not isinstance(args, tuple) or len(args) != n:
        raise UnsafePickleError(f"{name} called with arguments it does not take")
    return args


def _reduce(func: Any, args: Any, unbuilt: dict[int, Any]) -> Any:
    """REDUCE: only a token's checked constructor runs."""
    if func is RECONSTRUCT:  # an empty array, filled by its BUILD
        sub, shape, code = _args(args, 3, "_reconstruct")
        if sub is not NDARRAY or _shape(shape) != (0,) or type(code) not in (bytes, str) or code not in (b"b", "b"):
            raise UnsafePickleError("_reconstruct is only allowed as numpy writes it: (ndarray, (0,), b'b')")
        out = np.empty((0,), np.int8)
        unbuilt[id(out)] = out
        return out
    if func is DTYPE:
        typestr, align, copy = _args(args, 3, "numpy.dtype")
        if type(align) not in (bool, int) or align != 0 or type(copy) not in (bool, int) or copy != 1:
            raise UnsafePickleError("numpy.dtype is only allowed as numpy writes it: dtype(typestr, False, True)")
        spec = _DtypeSpec(typestr)
        unbuilt[id(spec)] = spec
        return spec
    if func is SCALAR:
        dtype_spec, data = _args(args, 2, "numpy scalar")
        dtype = _dtype_of(dtype_spec)
        return np.frombuffer(_data(data, dtype, ()), dtype)[0]
    if func is FROMBUFFER:  # protocol 5: (buffer, dtype, shape, order)
        buf, dtype_spec, shape, order = _args(args, 4, "_frombuffer")
        dtype, shape = _dtype_of(dtype_spec), _shape(shape)
        if type(order) is not str or order not in ("C", "F"):
            raise UnsafePickleError("_frombuffer's order must be 'C' or 'F'")
        return np.frombuffer(_data(buf, dtype, shape), dtype).reshape(shape, order=order)
    if func is CODECS_ENCODE:  # protocol 2's bytes: _codecs.encode(text, 'latin1')
        text, codec = _args(args, 2, "_codecs.encode")
        if type(text) is not str or type(codec) is not str or codec != "latin1":
            raise UnsafePickleError("_codecs.encode is only allowed as (text, 'latin1')")
        try:
            return text.encode("latin1")
        except UnicodeEncodeError:
            raise UnsafePickleError("_codecs.encode: text is not latin-1") from None
    if func is EMPTY_BYTES:
        if args != ():
            raise UnsafePickleError("bytes is only allowed as bytes()")
        return b""
    raise UnsafePickleError(f"calling {type(func).__name__ if not isinstance(func, _Token) else func} is not allowed")


def _build(target: Any, state: Any, unbuilt: dict[int, Any]) -> None:
    """BUILD: once, on a dtype or an array that REDUCE just made."""
    if unbuilt.pop(id(target), None) is not target:
        raise UnsafePickleError(f"BUILD on {type(target).__name__} is not allowed")
    if isinstance(target, _DtypeSpec):
        target.build(state)
        return
    if not (type(state) is tuple and len(state) == 5 and type(state[0]) is int and state[0] == 1):
        raise UnsafePickleError("a numpy array's state is not one numpy writes")
    _, shape, dtype_spec, fortran, data = state
    dtype, shape = _dtype_of(dtype_spec), _shape(shape)
    if type(fortran) is not bool:
        raise UnsafePickleError("a numpy array's order flag must be a bool")
    try:
        target.__setstate__((1, shape, dtype, fortran, _data(data, dtype, shape)))
    except (ValueError, TypeError, MemoryError) as e:  # numpy's own checks, e.g. a size it cannot address
        raise UnsafePickleError(f"a numpy array's state was refused: {e}") from None


def safe_loads(data: bytes, max_ops: int = 1_000_000, max_depth: int = MAX_DEPTH) -> Any:
    """The object a pickle describes, from plain data and non-object numpy arrays only (see the module
    doc); `UnsafePickleError` for anything else, a malformed pickle or more than `max_ops` opcodes."""
    try:
        result = _run(data, max_ops)
    except UnsafePickleError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, MemoryError) as e:  # a case the checks missed: still a 400
        raise UnsafePickleError(f"malformed pickle: {type(e).__name__}") from None
    check_plain(result, max_depth)
    return result


def _run(data: bytes, max_ops: int) -> Any:
    """The stack machine: the loaded object, not yet walked by `check_plain`."""
    stack: list = []
    marks: list[list] = []
    memo: dict[int, Any] = {}
    unbuilt: dict[int, Any] = {}  # id -> object (kept alive so an id is never reused) awaiting its one BUILD
    ops = genops_checked(data)
    result, n_ops = None, 0

    def pop() -> Any:
        if not stack:
            raise UnsafePickleError("malformed pickle: the stack is empty")
        return stack.pop()

    def peek() -> Any:
        if not stack:
            raise UnsafePickleError("malformed pickle: the stack is empty")
        return stack[-1]

    def pop_mark() -> list:
        nonlocal stack
        if not marks:
            raise UnsafePickleError("malformed pickle: no MARK")
        items, stack = stack, marks.pop()
        return items

    def top(kind: type, what: str):
        if not stack or type(stack[-1]) is not kind:
            raise UnsafePickleError(f"malformed pickle: {what} needs a {kind.__name__}")
        return stack[-1]

    def set_items(d: dict, items: list) -> None:
        if len(items) % 2:
            raise UnsafePickleError("malformed pickle: odd number of dict items")
        for k, v in zip(items[::2], items[1::2]):
            if type(k) not in _KEY_TYPES:
                raise UnsafePickleError(f"a dict key of type {type(k).__name__} is not allowed")
            d[k] = v

    for op, arg, pos in ops:
        n_ops += 1
        if n_ops > max_ops:
            raise UnsafePickleError(f"the pickle has more than {max_ops} opcodes")
        name = op.name
        if name in _PUSH_ARG:
            if name == "LONG1" and arg.bit_length() > 8 * MAX_LONG_BYTES:  # LONG1's length byte bounds it anyway
                raise UnsafePickleError("integer too large")
            stack.append(arg)
        elif name in _CONSTANTS:
            stack.append(_CONSTANTS[name])
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "STOP":
            result = pop()
            if stack or marks:
                raise UnsafePickleError("malformed pickle: items left on the stack at STOP")
            break
        elif name == "MARK":
            marks.append(stack)
            stack = []
        elif name == "POP":
            pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(peek())
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = peek()
        elif name == "MEMOIZE":
            memo[len(memo)] = peek()
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise UnsafePickleError(f"malformed pickle: memo {arg} is not set")
            stack.append(memo[arg])
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(name[-1])
            if len(stack) < k:
                raise UnsafePickleError("malformed pickle: the stack is empty")
            items = tuple(stack[-k:])
            del stack[-k:]
            stack.append(items)
        elif name == "TUPLE":
            items = pop_mark()  # first: it rebinds `stack`
            stack.append(tuple(items))
        elif name == "APPEND":
            item = pop()
            top(list, "APPEND").append(item)
        elif name == "APPENDS":
            items = pop_mark()
            top(list, "APPENDS").extend(items)
        elif name == "SETITEM":
            v, k = pop(), pop()
            set_items(top(dict, "SETITEM"), [k, v])
        elif name == "SETITEMS":
            items = pop_mark()
            set_items(top(dict, "SETITEMS"), items)
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            stack.append(_global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = pop(), pop()
            if not (isinstance(module, str) and isinstance(attr, str)):
                raise UnsafePickleError("malformed pickle: STACK_GLOBAL needs two strings")
            stack.append(_global(module, attr))
        elif name == "REDUCE":
            args, func = pop(), pop()
            stack.append(_reduce(func, args, unbuilt))
        elif name == "BUILD":
            state = pop()
            if not stack:
                raise UnsafePickleError("malformed pickle: the stack is empty")
            _build(stack[-1], state, unbuilt)
        else:
            raise UnsafePickleError(f"pickle opcode {name} is not allowed")
    else:
        raise UnsafePickleError("malformed pickle: no STOP")
    if pos + 1 != len(data):
        raise UnsafePickleError("malformed pickle: data after STOP")
    return result


def genops_checked(data: bytes):
    """`pickletools.genops` over `data`, its parse errors (truncated, unknown opcode, bad UTF-8) as
    UnsafePickleError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnsafePickleError("a pickle must be bytes")
    it = pickletools.genops(bytes(data))
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:  # pickletools raises ValueError (and UnicodeDecodeError...) for a malformed stream
            raise UnsafePickleError(f"malformed pickle: {str(e)[:200]}") from None
        yield item


def _global(module: str, name: str) -> _Token:
    token = GLOBALS.get((module, name))
    if token is None:
        raise UnsafePickleError(f"global {module[:100]}.{name[:100]} is not allowed")
    return token


def check_plain(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a leftover token or dtype, a reference cycle, or containers nested deeper than `max_depth`
    along any path, without recursion. Shared sub-objects (pickle's memo: one GenEval record for a
    prompt's several images) are walked once: each container's height is computed once, post-order."""
    height: dict[int, int] = {}  # id -> nesting height of a container whose children are all walked
    on_path: set[int] = set()
    todo: list[tuple[Any, bool]] = [(value, False)]
    while todo:
        obj, leaving = todo.pop()
        children = obj.values() if isinstance(obj, dict) else obj
        if leaving:
            on_path.discard(id(obj))
            h = 1 + max((height.get(id(c), 0) for c in children), default=0)
            if h > max_depth:
                raise UnsafePickleError(f"the pickle is nested deeper than {max_depth} levels")
            height[id(obj)] = h
            continue
        if isinstance(obj, _Token):
            raise UnsafePickleError(f"a bare {obj} is not allowed as a value")
        if isinstance(obj, _DtypeSpec):
            raise UnsafePickleError("a bare numpy dtype is not allowed as a value")
        if not isinstance(obj, (list, tuple, dict)) or id(obj) in height:
            continue  # scalars, str, bytes and arrays (plain dtypes only, by construction); or walked already
        if id(obj) in on_path:
            raise UnsafePickleError("a pickle with a reference cycle is not allowed")
        if len(on_path) >= max_depth:  # the path is too deep already: stop before walking further
            raise UnsafePickleError(f"the pickle is nested deeper than {max_depth} levels")
        on_path.add(id(obj))
        todo.append((obj, True))
        todo.extend((c, False) for c in children)

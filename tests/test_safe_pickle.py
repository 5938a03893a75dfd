"""The safe unpickler (rewarders/safe_pickle.py): what Flow-GRPO's clients pickle loads exactly as
`pickle.loads` would; hostile pickles are refused and nothing they name runs."""

import os
import pickle
import struct
import subprocess
import tracemalloc

import numpy as np
import pytest
from t2i_reward.rewarders.errors import MalformedBodyError, UnsafePickleError
from t2i_reward.rewarders.safe_pickle import safe_loads

RECORD = {"tag": "color_attr", "include": [{"class": "giraffe", "count": 1, "color": "brown"},
                                           {"class": "stop sign", "count": 1, "color": "white"}],
          "prompt": "a photo of a brown giraffe and a white stop sign"}


def flow_grpo_like_body():
    """The structures Flow-GRPO's clients pickle, plus numpy scalars and arrays numpy writes in several ways."""
    prompts = np.array_split(["a photo of a cat", "a dog", "three apples"], 1)[0]  # dtype <U16, as Flow-GRPO sends
    records = list(np.array_split([RECORD, dict(RECORD, tag="counting")] * 2, 1)[0])  # list() of an object array
    return {"images": [b"\xff\xd8\xff\xe0jpeg", b"\xff\xd8second"], "prompts": prompts, "meta_datas": records,
            "only_strict": True, "f64": np.float64(0.25), "i64": np.int64(-3), "flag": np.bool_(True), "word": prompts[1],
            "fortran_be": np.arange(12, dtype=">f4").reshape(3, 4).T, "c": np.array([1 + 2j]), "big": 2**100,
            "nested": (1, (2.5, None), []), "empty": np.zeros((0, 3), np.uint8)}


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_loads_what_pickle_loads(protocol):
    data = pickle.dumps(flow_grpo_like_body(), protocol=protocol)
    ours, theirs = safe_loads(data), pickle.loads(data)
    assert same(ours, theirs)
    assert ours["prompts"].tolist() == ["a photo of a cat", "a dog", "three apples"]
    assert ours["meta_datas"][0] is ours["meta_datas"][2]  # pickle's memo: one record object, shared


def test_numpy_1x_module_names_load():
    """numpy 1.x clients write numpy.core.multiarray; numpy 2 writes numpy._core.multiarray."""
    data = pickle.dumps(np.array(["ab", "c"]), protocol=4).replace(b"\x16numpy._core.multiarray", b"\x15numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    assert safe_loads(data).tolist() == ["ab", "c"]


class Reduces:
    """An object whose pickle calls `func(*args)` on load: how every hostile pickle below runs code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile(path):
    """Pickles that create `path` when unpickled with pickle.loads."""
    return {
        "os.system": pickle.dumps(Reduces(os.system, f"touch {path}")),
        "builtins.eval": pickle.dumps(Reduces(eval, f"open({str(path)!r}, 'w').close()")),
        "builtins.exec": pickle.dumps(Reduces(exec, f"open({str(path)!r}, 'w').close()")),
        "subprocess.Popen": pickle.dumps(Reduces(subprocess.call, ["touch", str(path)])),
        "posix.system (protocol 0)": f"cposix\nsystem\n(V touch {path}\ntR.".encode(),
        "inside a numpy body": pickle.dumps({"prompts": np.array(["a"]), "x": Reduces(os.system, f"touch {path}")}),
    }


@pytest.mark.parametrize("name", list(hostile("x")))
def test_hostile_globals_run_nothing(tmp_path, name):
    path = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError, match="not allowed"):
        safe_loads(hostile(path)[name])
    assert not path.exists()


def test_the_hostile_pickles_are_live(tmp_path):
    """The payloads above do run under pickle.loads: the refusal is what stops them."""
    path = tmp_path / "ran"
    for name, data in hostile(path).items():
        pickle.loads(data)
        assert path.exists(), f"payload {name} did not run"
        path.unlink()


def test_unpicklable_error_is_a_malformed_body():
    assert issubclass(UnsafePickleError, MalformedBodyError)  # the service's 400


def obj_array_pickles():
    records = np.array_split([RECORD] * 2, 1)[0]  # an object array: a client that forgot list()
    return {"object array of dicts": pickle.dumps({"meta_datas": records}),
            "object array of ints": pickle.dumps(np.array([1, 2], dtype=object)),
            "structured dtype with an object field": pickle.dumps(np.zeros(2, dtype=[("a", "O"), ("b", "f4")])),
            "datetime": pickle.dumps(np.array(["2020-01-01"], dtype="M8[D]")),
            "object scalar": pickle.dumps(np.array([None], dtype=object)[0:1])}


@pytest.mark.parametrize("name", list(obj_array_pickles()))
def test_object_and_exotic_dtypes_are_refused(name):
    with pytest.raises(UnsafePickleError, match="dtype|not allowed"):
        safe_loads(obj_array_pickles()[name])


# ---- the allowed globals, called with what numpy never writes

G_RECON = b"\x8c\x16numpy._core.multiarray\x8c\x0c_reconstruct\x93"
G_NDARRAY = b"\x8c\x05numpy\x8c\x07ndarray\x93"
G_DTYPE = b"\x8c\x05numpy\x8c\x05dtype\x93"


def p4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def short_bytes(b: bytes) -> bytes:
    return b"C" + bytes([len(b)]) + b


def short_str(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()


def dtype_ops(typestr: str, state: bytes | None = None) -> bytes:
    ops = G_DTYPE + short_str(typestr) + b"\x89\x88\x87R"  # dtype(typestr, False, True)
    if state is not None:
        ops += state + b"b"
    return ops


def array_ops(shape_ops: bytes, dtype: bytes, data: bytes, recon_shape: bytes = b"K\x00\x85") -> bytes:
    """_reconstruct(ndarray, recon_shape, b'b') then BUILD (1, shape, dtype, False, data)."""
    return G_RECON + G_NDARRAY + recon_shape + short_bytes(b"b") + b"\x87R" + b"(K\x01" + shape_ops + dtype + b"\x89" + short_bytes(data) + b"tb"


F8_STATE = b"(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"


def test_hand_written_array_pickle_loads():
    """The helpers below write what numpy writes: a control for the refusals that follow."""
    out = safe_loads(p4(array_ops(b"K\x02\x85", dtype_ops("f8", F8_STATE), struct.pack("<2d", 1.5, -2))))
    assert out.dtype == np.float64 and out.tolist() == [1.5, -2.0]


@pytest.mark.parametrize("name, body", [
    ("_reconstruct of a huge shape", G_RECON + G_NDARRAY + b"J\x00\xca\x9a;\x85" + short_bytes(b"b") + b"\x87R"),
    ("_reconstruct of another class", G_RECON + G_DTYPE + b"K\x00\x85" + short_bytes(b"b") + b"\x87R"),
    ("_reconstruct with 2 arguments", G_RECON + G_NDARRAY + b"K\x00\x85\x86R"),
    ("ndarray called directly", G_NDARRAY + b"J\x00\xca\x9a;\x85\x85R"),
    ("dtype('O')", dtype_ops("O")),
    ("dtype('O8')", dtype_ops("O8")),
    ("dtype of a list", G_DTYPE + b"]\x89\x88\x87R"),
    ("dtype('V0')", dtype_ops("V0")),
    ("dtype('U0')", dtype_ops("U0")),
    ("dtype without copy", G_DTYPE + short_str("f8") + b"\x89\x89\x87R"),
    ("dtype state of another size", dtype_ops("U4", b"(K\x03\x8c\x01<NNNK\x08K\x04K\x08t")),
    ("dtype state with fields", dtype_ops("f8", b"(K\x03\x8c\x01<N]}J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t")),
    ("dtype state with a bad order", dtype_ops("f8", b"(K\x03\x8c\x01!NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t")),
    ("dtype built twice", dtype_ops("f8", F8_STATE) + F8_STATE + b"b"),
    ("array data shorter than its shape", array_ops(b"K\x03\x85", dtype_ops("f8", F8_STATE), b"\0" * 16)),
    ("array data longer than its shape", array_ops(b"K\x01\x85", dtype_ops("f8", F8_STATE), b"\0" * 16)),
    ("array of a huge shape, no data", array_ops(b"J\xff\xff\xff\x7fJ\xff\xff\xff\x7f\x86", dtype_ops("f8", F8_STATE), b"")),
    ("array with a negative dim", array_ops(b"J\xff\xff\xff\xff\x85", dtype_ops("f8", F8_STATE), b"")),
    ("array state with a list for data", array_ops(b"K\x01\x85", dtype_ops("f8", F8_STATE), b"")[:-3] + b"]tb"),
    ("array state with a str dtype", array_ops(b"K\x01\x85", short_str("O"), b"\0" * 8)),
    ("array built twice", array_ops(b"K\x01\x85", dtype_ops("f8", F8_STATE), b"\0" * 8)
     + b"(K\x01K\x01\x85" + dtype_ops("f8", F8_STATE) + b"\x89" + short_bytes(b"\0" * 8) + b"tb"),
    ("BUILD on a dict", b"}}b"),
    ("BUILD on a list", b"]}b"),
    ("scalar of the wrong size", b"\x8c\x16numpy._core.multiarray\x8c\x06scalar\x93" + dtype_ops("f8", F8_STATE) + short_bytes(b"\0" * 4) + b"\x86R"),
    ("_codecs.encode with another codec", b"\x8c\x07_codecs\x8c\x06encode\x93" + short_str("x\x9c") + short_str("zlib") + b"\x86R"),
    ("REDUCE of a str", short_str("os") + b")R"),
])
def test_allowed_globals_with_hostile_arguments_are_refused(name, body):
    with pytest.raises(UnsafePickleError):
        safe_loads(p4(body))


def test_numpy_itself_refuses_a_mismatched_state():
    """The second line of defence behind our own length check: numpy's __setstate__ checks the size too."""
    a = np.empty((0,), np.int8)
    with pytest.raises(ValueError):
        a.__setstate__((1, (1000,), np.dtype("f8"), False, b"\0" * 8))


@pytest.mark.parametrize("name, data", [
    ("empty", b""),
    ("not a pickle", b"not a pickle at all"),
    ("json", b'{"images": []}'),
    ("truncated", pickle.dumps({"images": [b"x" * 100]})[:-20]),
    ("no STOP", pickle.dumps([1, 2])[:-1]),
    ("data after STOP", pickle.dumps([1]) + b"extra"),
    ("bytes longer than the body", b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc."),
    ("str longer than the body", b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"abc."),
    ("bad UTF-8", b"\x80\x04\x8c\x02\xff\xfe."),
    ("unknown opcode", b"\x80\x04\xff."),
    ("APPEND on a dict", b"\x80\x04}K\x01a."),
    ("SETITEM on a list", b"\x80\x04]K\x01K\x02s."),
    ("TUPLE without MARK", b"\x80\x04K\x01t."),
    ("POP of an empty stack", b"\x80\x040N."),
    ("GET of an unset memo", b"\x80\x04h\x05."),
    ("items left at STOP", b"\x80\x04K\x01K\x02."),
    ("a tuple as a dict key", b"\x80\x04}K\x01\x85K\x02s."),
    ("a set", pickle.dumps({1, 2})),
    ("a frozenset", pickle.dumps(frozenset([1]))),
    ("LONG4", b"\x80\x04\x8b\x04\x00\x00\x00\x01\x02\x03\x04."),
    ("INST", b"(cbuiltins\nlist\ni."),
    ("OBJ", b"\x80\x02(cbuiltins\nlist\no."),
    ("NEWOBJ", b"\x80\x02cbuiltins\nlist\n)\x81."),
    ("EXT1", b"\x80\x02\x82\x01."),
    ("persistent id", b"\x80\x02K\x01Q."),
    ("out-of-band buffer", b"\x80\x05\x97."),
    ("protocol 0 text", pickle.dumps({"a": 1}, protocol=0)),
    ("a bare dtype", pickle.dumps(np.dtype("f8"))),
    ("a bare global", p4(G_NDARRAY)),
])
def test_malformed_and_unsupported_pickles_are_refused(name, data):
    with pytest.raises(UnsafePickleError):
        safe_loads(data)


def nested_lists(depth: int) -> bytes:
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


def test_deep_nesting_is_refused_without_recursion():
    data = nested_lists(100_000)
    assert isinstance(pickle.loads(data), list)  # the stdlib builds it: json, pydantic and repr would then recurse
    with pytest.raises(UnsafePickleError, match="nested deeper than 32"):
        safe_loads(data)
    assert safe_loads(nested_lists(32)) is not None
    with pytest.raises(UnsafePickleError, match="nested deeper"):
        safe_loads(nested_lists(33))


def test_a_deep_path_through_a_shared_object_is_refused():
    """A shared list met first near the root and again deep down: the deepest path counts."""
    # root = [shared, [[...31 lists...[shared]]]]: shared (memo 0) is at depth 2 and at depth 33
    data = b"\x80\x04]" + b"]\x94a" + b"]" * 31 + b"h\x00" + b"a" * 32 + b"."
    assert safe_loads(data, max_depth=33)[0] is not None
    with pytest.raises(UnsafePickleError, match="nested deeper"):
        safe_loads(data)


def test_shared_references_are_walked_once():
    """30 levels of [x, x]: 2**30 paths, 31 objects; loads at once."""
    ops = [b"\x80\x04K\x07"]
    for i in range(30):  # memo the top as i, pop it, push [memo i, memo i]
        get = b"j" + struct.pack("<I", i)
        ops.append(b"r" + struct.pack("<I", i) + b"0](" + get + get + b"e")
    data = b"".join(ops) + b"."
    out = safe_loads(data)
    for _ in range(30):
        assert out[0] is out[1]
        out = out[0]
    assert out == 7


def test_a_cycle_is_refused():
    data = b"\x80\x04]\x94h\x00a."  # a list that contains itself
    assert pickle.loads(data)[0] is not None
    with pytest.raises(UnsafePickleError, match="cycle"):
        safe_loads(data)


def test_a_huge_memo_index_allocates_nothing():
    """LONG_BINPUT 4e9 makes the C unpickler grow its memo array to the index (tens of GB); the memo here is a dict."""
    data = b"\x80\x04K\x05r\xff\xff\xff\xf00j\xff\xff\xff\xf0."
    tracemalloc.start()
    try:
        assert safe_loads(data) == 5
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_the_number_of_opcodes_is_bounded():
    data = b"\x80\x04](" + b"N" * 5000 + b"e."
    assert len(safe_loads(data)) == 5000
    with pytest.raises(UnsafePickleError, match="more than 1000 opcodes"):
        safe_loads(data, max_ops=1000)


def test_a_body_of_small_objects_costs_a_bounded_amount_per_opcode():
    """Each opcode makes at most one small object: 50k empty lists (one byte each in the body) stay within
    ~250 bytes an opcode (the list, and the walk's bookkeeping), so `max_ops` bounds what a small body makes."""
    n = 50_000
    data = b"\x80\x04](" + b"]" * n + b"e."
    tracemalloc.start()
    try:
        assert len(safe_loads(data, max_ops=n + 10)) == n
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 250 * n

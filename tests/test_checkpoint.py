"""Tests for eamamba_ref.io.pth_reader / eamamba_ref.io.checkpoint.

Golden values come from torch itself (torch.save + torch.load(weights_only=True)) or, in the tests
that run without torch, from hand-assembled pickles whose expected tensors are worked out by hand.
"""

import collections
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eamamba_ref.io import pth_reader
from eamamba_ref.io.checkpoint import (HEADER_KEY, CheckpointError, CheckpointExistsError,
                                       load_converted, load_state, save_converted)
from eamamba_ref.io.pth_reader import LazyTensor, materialize, read_pth

# --------------------------------------------------------------------------------------------------
# Hand-assembled pickles (protocol 2 opcodes), so the format and the attacks need no torch.


def p_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def p_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def p_int(i):
    return b"J" + struct.pack("<i", i)


def p_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def p_call(fn, *args):
    return fn + p_tuple(*args) + b"R"


def p_tensor(key, numel, offset, size, stride, storage="FloatStorage"):
    pid = p_tuple(p_str("storage"), p_global("torch", storage), p_str(key), p_str("cpu"), p_int(numel)) + b"Q"
    return p_call(
        p_global("torch._utils", "_rebuild_tensor_v2"),
        pid, p_int(offset), p_tuple(*map(p_int, size)), p_tuple(*map(p_int, stride)),
        b"\x89", p_call(p_global("collections", "OrderedDict")),
    )


def p_dict(**items):
    return b"}(" + b"".join(p_str(k) + v for k, v in items.items()) + b"u"


def write_archive(path, pickle_body, storages=(), byteorder=b"little", prefix="archive",
                  compression=zipfile.ZIP_STORED):
    """A torch.save-style zip: <prefix>/data.pkl, <prefix>/byteorder, <prefix>/data/<key>."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr(f"{prefix}/data.pkl", b"\x80\x02" + pickle_body + b".")
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in storages:
            zf.writestr(f"{prefix}/data/{key}", data)
    return path


# --------------------------------------------------------------------------------------------------
# Torch-free tests


def test_hand_made_archive_views_and_byte_order(tmp_path):
    """One 12-element storage seen as a 3x4 matrix, its transpose, a strided slice and an offset
    window; values worked out by hand from arange(12). Also stored big-endian."""
    body = p_dict(
        m=p_tensor("0", 12, 0, (3, 4), (4, 1)),
        t=p_tensor("0", 12, 0, (4, 3), (1, 4)),
        s=p_tensor("0", 12, 1, (2, 2), (8, 2)),
        w=p_tensor("0", 12, 5, (3,), (1,)),
        e=p_tensor("0", 12, 2, (2, 3), (0, 1)),  # expand: stride 0
    )
    expect = {
        "m": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
        "t": [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]],
        "s": [[1, 3], [9, 11]],
        "w": [5, 6, 7],
        "e": [[2, 3, 4], [2, 3, 4]],
    }
    for order, code in ((b"little", "<f4"), (b"big", ">f4")):
        storage = [("0", np.arange(12, dtype=code).tobytes())]
        path = write_archive(tmp_path / f"{order.decode()}.pth", body, storage, order)
        got = read_pth(path)
        assert set(got) == set(expect)
        for k, v in expect.items():
            assert got[k].dtype == np.float32 and got[k].dtype.isnative
            np.testing.assert_array_equal(got[k], np.array(v, np.float32))
        got["s"][0, 0] = -1  # views are independent copies: the matrix is unchanged
        assert got["m"][0, 1] == 1


def test_deflated_entries(tmp_path):
    """torch writes stored entries, but a re-zipped checkpoint may be deflated: still readable."""
    data = np.arange(1000, dtype="<f4")
    path = write_archive(tmp_path / "z.pth", p_dict(w=p_tensor("0", 1000, 0, (10, 100), (100, 1))),
                         [("0", data.tobytes())], compression=zipfile.ZIP_DEFLATED)
    np.testing.assert_array_equal(load_state(path)[2]["w"], data.reshape(10, 100))


def test_missing_byteorder_record_means_little_endian(tmp_path):
    path = write_archive(tmp_path / "x.pth", p_tensor("0", 2, 0, (2,), (1,), "LongStorage"),
                         [("0", np.array([7, -3], "<i8").tobytes())], byteorder=None)
    np.testing.assert_array_equal(read_pth(path), [7, -3])


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("__builtin__", "exec"),
                                         ("posix", "system"), ("subprocess", "call")])
def test_malicious_global_refused_and_not_executed(tmp_path, module, name):
    marker = tmp_path / "pwned"
    if name == "system" or name == "call":
        arg = p_str(f"touch '{marker}'") if name == "system" else p_tuple(p_str("touch"), p_str(str(marker)))
    else:
        arg = p_str(f"open({str(marker)!r}, 'w').close()")
    body = p_call(p_global(module, name), arg)
    path = write_archive(tmp_path / "evil.pth", body)
    with pytest.raises(CheckpointError, match=rf"refusing to load global (builtins|{module})\.{name}"):
        read_pth(path)
    with pytest.raises(CheckpointError, match="refusing"):
        load_state(path)
    assert not marker.exists()
    if module == "builtins":  # the payload is live: a plain unpickler does run it
        pickle.loads(b"\x80\x02" + body + b".")
        assert marker.exists()


def test_global_refused_deep_inside_a_valid_checkpoint(tmp_path):
    body = p_dict(model=p_dict(sd=p_tensor("0", 1, 0, (1,), (1,))),
                  extra=p_call(p_global("numpy.core.multiarray", "_reconstruct"), p_int(0)))
    path = write_archive(tmp_path / "x.pth", body, [("0", b"\0\0\0\0")])
    with pytest.raises(CheckpointError, match=r"numpy\.core\.multiarray\._reconstruct"):
        read_pth(path)


def test_allowed_stand_ins_cannot_be_modified_by_build(tmp_path):
    # BUILD with a slot-state dict would setattr(_rebuild_tensor_v2, '__defaults__', ...) on a plain function.
    body = p_global("torch._utils", "_rebuild_tensor_v2") + b"N}" + p_str("__defaults__") + b"N" + b"s\x86b"
    with pytest.raises(CheckpointError, match="state"):
        read_pth(write_archive(tmp_path / "x.pth", body))


@pytest.mark.parametrize(
    "offset,size,stride,match",
    [(0, (4, 4), (4, 1), "overruns"), (9, (4,), (1,), "overruns"), (0, (2,), (1000000,), "overruns"),
     (-1, (2,), (1,), "geometry"), (0, (2, 2), (1,), "geometry")],
)
def test_out_of_bounds_view_refused(tmp_path, offset, size, stride, match):
    """as_strided does not check bounds; a crafted view must not read memory outside its storage."""
    path = write_archive(tmp_path / "x.pth", p_tensor("0", 12, offset, size, stride),
                         [("0", np.zeros(12, np.float32).tobytes())])
    with pytest.raises(CheckpointError, match=match):
        read_pth(path)


def test_storage_size_mismatch_and_missing_storage(tmp_path):
    short = write_archive(tmp_path / "a.pth", p_tensor("0", 12, 0, (12,), (1,)), [("0", b"\0" * 40)])
    with pytest.raises(CheckpointError, match="holds 40 bytes"):
        read_pth(short)
    missing = write_archive(tmp_path / "b.pth", p_tensor("7", 1, 0, (1,), (1,)))
    with pytest.raises(CheckpointError, match="missing"):
        read_pth(missing)


@pytest.mark.parametrize(
    "content,match",
    [(b"", "empty file"), (b"hello, I am not a checkpoint\n" * 10, "not a PyTorch checkpoint"),
     (pickle.dumps({"a": 1}, protocol=2), "bare pickle"), (b"PK\x03\x04" + b"\0" * 100, "truncated")],
)
def test_garbage_refused(tmp_path, content, match):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_state(path)
    assert "\n" not in str(info.value)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="data.pkl"):
        read_pth(plain)
    npz = tmp_path / "a.npz"
    np.savez(npz, w=np.ones(2))
    with pytest.raises(CheckpointError, match="NumPy .npz"):
        load_state(npz)


def test_converted_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    sd = {
        "patch_embed.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "encoder_level1.0.attn.A_logs": rng.standard_normal((16, 4)).astype(np.float32),
        "norm.num_batches_tracked": np.array(7, np.int64),
        "file": np.arange(3, dtype=np.int32),  # would clash with np.savez's own 'file' parameter
        "half": np.array([1.5, -2.0], np.float16),
    }
    args = {"dim": 8, "num_blocks": [1, 1, 1, 1], "scan_type": "diagonal", "bias": False, "eps": 1e-5}
    meta = {"source": "unit test", "sha256": "0" * 64}
    path = tmp_path / "m.npz"
    save_converted(path, "eamamba", args, sd, meta)
    ck = load_converted(path)
    assert (ck.name, ck.args, ck.meta) == ("eamamba", args, meta)
    assert list(ck.state_dict) == list(sd)
    for k, v in sd.items():
        assert ck.state_dict[k].dtype == v.dtype and ck.state_dict[k].shape == v.shape
        np.testing.assert_array_equal(ck.state_dict[k], v)
    # Plain NumPy, no pickle, reads it too.
    with np.load(path, allow_pickle=False) as npz:
        assert json.loads(str(npz[HEADER_KEY]))["format_version"] == 1
        np.testing.assert_array_equal(npz["patch_embed.weight"], sd["patch_embed.weight"])
    # load_state on a converted file: floats as float32, ints kept.
    name, got_args, state = load_state(path, weights="raw")
    assert name == "eamamba" and got_args == args
    assert state["half"].dtype == np.float32 and state["norm.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(state["half"], [1.5, -2.0])
    assert os.listdir(tmp_path) == ["m.npz"]  # no temp file left behind


def test_converted_no_overwrite_without_flag(tmp_path):
    path = tmp_path / "m.npz"
    save_converted(path, "eamamba", {"dim": 1}, {"w": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointExistsError, match="overwrite=True") as info:
        save_converted(path, "eamamba", {"dim": 2}, {"w": np.ones(2, np.float32)})
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, ValueError)
    assert load_converted(path).args == {"dim": 1}
    save_converted(path, "eamambasr", {"dim": 2}, {"w": np.ones(2, np.float32)}, overwrite=True)
    ck = load_converted(path)
    assert ck.name == "eamambasr" and ck.args == {"dim": 2}
    np.testing.assert_array_equal(ck.state_dict["w"], [1, 1])
    assert os.listdir(tmp_path) == ["m.npz"]


def test_converted_bad_input(tmp_path):
    path = tmp_path / "m.npz"
    with pytest.raises(CheckpointError, match="JSON"):
        save_converted(path, "eamamba", {"f": object()}, {"w": np.zeros(1)})
    with pytest.raises(CheckpointError, match="key"):
        save_converted(path, "eamamba", {}, {HEADER_KEY: np.zeros(1)})
    with pytest.raises(CheckpointError, match="numeric"):
        save_converted(path, "eamamba", {}, {"w": np.array([None, 1])})
    assert not os.listdir(tmp_path)
    np.savez(path, w=np.ones(2))
    with pytest.raises(CheckpointError, match="not an eamamba_ref converted"):
        load_converted(path)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr(HEADER_KEY + ".npy", b"not a npy file")
    with pytest.raises(CheckpointError, match="corrupt converted"):
        load_converted(bad)


# --------------------------------------------------------------------------------------------------
# Hostile pickles and files, unit by unit (tests/test_hostile_checkpoints.py runs whole crafted files
# through the command-line entry points under a memory limit).


@pytest.mark.parametrize("key", ["w", b"w", 7, -(2**60) + 1, 1.5, None, True, (1, "a", (2.0, None)),
                                 frozenset({1, 2}), tuple(range(63))])
def test_plain_dict_keys_are_accepted(tmp_path, key):
    assert pth_reader._check_key(key) >= 1
    body = b"}" + pickle.dumps(key, protocol=2)[2:-1] + b"Ns"   # {key: None}, pickled by Python itself
    assert read_pth(write_archive(tmp_path / "k.pth", body)) == {key: None}


THIRTY = [p_int(i) for i in range(30)]


def nested(depth):
    return p_int(0) + b"\x85" * depth                    # ((((0,),),)...) by TUPLE1


@pytest.mark.parametrize("key_ops, match", [
    (nested(200_000), "more than 64 parts"),            # a plain unpickler segfaults hashing this key
    (b")q\x00" + b"0h\x00h\x00\x86q\x00" * 100, "more than 64 parts"),   # 2**100 leaves sharing 100 tuples
    (p_tuple(*[p_int(i) for i in range(65)]), "more than 64 parts"),
    (p_tuple(*THIRTY, p_tuple(*THIRTY, p_tuple(*THIRTY))), "more than 64 parts"),  # < 64 per level, 93 in all
    (b"\x8a\x08" + (2**61 - 1).to_bytes(8, "little"), "61-bit integer"),         # LONG1
    (p_global("builtins", "complex") + p_tuple(b"G" + struct.pack(">d", 1.0), b"G" + struct.pack(">d", 2.0)) + b"R",
     "of type complex"),
    (p_tensor("0", 1, 0, (1,), (1,)), "of type LazyTensor"),
], ids=["deep", "shared", "wide", "zigzag", "bigint", "complex", "tensor"])
def test_unsafe_dict_keys_are_refused_before_hashing(tmp_path, key_ops, match):
    body = b"}" + key_ops + b"Ns"
    path = write_archive(tmp_path / "k.pth", body, [("0", b"\0" * 4)])
    with pytest.raises(CheckpointError, match=match) as info:
        read_pth(path, lazy=True)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


@settings(max_examples=40, deadline=None)
@given(st.recursive(st.one_of(st.integers(-(2**59), 2**59), st.text(max_size=5), st.none(), st.booleans()),
                    lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=80))
def test_property_key_check_counts_every_part(key):
    """A key is accepted exactly when it has at most 64 parts (tuples count as parts, with their items)."""
    def parts(x):
        return 1 + sum(parts(v) for v in x) if isinstance(x, tuple) else 1
    if parts(key) <= pth_reader._MAX_KEY_PARTS:
        assert pth_reader._check_key(key) == parts(key)
        hash(key)
    else:
        with pytest.raises(CheckpointError, match="parts"):
            pth_reader._check_key(key)


def test_unpickling_is_metered(tmp_path, monkeypatch):
    """Every opcode costs a step and calls cost the size of their arguments: a pickle that would build
    far more than any checkpoint stops at the budget, whichever way it spends it."""
    ints = b"".join(p_int(i) for i in range(1000))
    set_calls = b"]q\x00(" + ints + b"ecbuiltins\nset\nq\x01h\x00\x85q\x02(" + b"h\x01h\x02R" * 5000 + b"l"
    floods = [b"(" + b"}" * 100_000 + b"l", b"(" + b"\x8f" * 30_000 + b"l", set_calls]
    monkeypatch.setattr(pth_reader, "_MAX_WORK", 200_000)
    for i, body in enumerate(floods):
        path = write_archive(tmp_path / f"f{i}.pth", body)
        with pytest.raises(CheckpointError, match="more than 200,000 unpickling steps"):
            read_pth(path)
    # the same kinds of pickle, ten times smaller, are fine
    assert len(read_pth(write_archive(tmp_path / "ok.pth", b"(" + b"}" * 10_000 + b"l"))) == 10_000
    got = read_pth(write_archive(tmp_path / "ok2.pth", set_calls.replace(b"h\x01h\x02R" * 5000, b"h\x01h\x02R" * 10)))
    assert len(got) == 10 and got[0] == set(range(1000))


@pytest.mark.parametrize("body, match", [
    (p_call(p_global("collections", "OrderedDict"), p_tuple(p_tuple(p_str("a"), p_int(1)))), "OrderedDict called"),
    (p_call(p_global("builtins", "set"), p_str("abc")), "not a list"),
    (p_call(p_global("builtins", "complex"), p_str("1+2j")), "complex called"),
    (p_call(p_global("torch", "device"), p_tuple(p_str("cuda")), p_int(0)), "torch.device called"),
    (p_call(p_global("torch", "Size"), p_tuple(*[p_int(1)] * 40)), "torch.Size called"),
    (p_call(p_global("torch", "Size"), p_tuple(p_str("1"))), "torch.Size called"),
    (p_global("builtins", "set") + p_tuple() + b"\x81", "malformed data.pkl"),           # NEWOBJ on a stand-in
    (p_global("b" * 100_000, "x"), r"refusing to load global b+\.\.\.b+\.x "),      # long names clipped
], ids=["OrderedDict", "set", "complex", "device", "Size40", "Size_str", "newobj", "long_global"])
def test_stand_ins_check_their_arguments(tmp_path, body, match):
    with pytest.raises(CheckpointError, match=match) as info:
        read_pth(write_archive(tmp_path / "x.pth", body))
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("size, stride, match", [((1,) * 33, (1,) * 33, "33 dimensions"),
                                                 ((2**30, 2**30), (0, 0), "larger than any array")])
def test_unrepresentable_shapes_refused(tmp_path, size, stride, match):
    path = write_archive(tmp_path / "x.pth", p_tensor("0", 1, 0, size, stride), [("0", b"\0" * 4)])
    with pytest.raises(CheckpointError, match=match):
        read_pth(path, lazy=True)


def test_read_budget_refuses_zip_bombs_and_stride0_blowups_before_reading(tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(pth_reader._Archive, "read", lambda self, key: reads.append(key))
    w = np.zeros(12, np.float32).tobytes()
    # storage of 3 MB behind a 48-byte tensor: refused (its zip entry is small but declares 3 MB)
    bomb = write_archive(tmp_path / "bomb.pth", p_dict(w=p_tensor("0", 750_000, 0, (12,), (1,))),
                         [("0", b"\0" * 3_000_000)], compression=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(bomb) < 20_000
    with pytest.raises(CheckpointError, match="zip bomb"):
        read_pth(bomb)
    with pytest.raises(CheckpointError, match="zip bomb"):
        load_state(bomb)
    # 12 stored floats seen as 3000 x 3000 (stride 0): refused
    blowup = write_archive(tmp_path / "s0.pth", p_dict(w=p_tensor("0", 12, 0, (3000, 3000), (0, 0))), [("0", w)])
    with pytest.raises(CheckpointError, match="stride 0"):
        load_state(blowup)
    assert reads == []                                    # nothing was read or inflated
    # the rule's edges: storage up to 2x the tensors (+1 MiB) and tensors up to 16x the storage (+16 MiB)
    class Fake:
        def __init__(self, nbytes, storage):
            self.nbytes, self.storage_id, self.storage_nbytes = nbytes, id(self), storage
    assert pth_reader.check_read_budget([Fake(10**8, 2 * 10**8 + 2**20)]) == 10**8
    assert pth_reader.check_read_budget([Fake(16 * 10**8 + 2**24, 10**8)]) > 0
    for fake in (Fake(10**8, 2 * 10**8 + 2**20 + 1), Fake(16 * 10**8 + 2**24 + 1, 10**8)):
        with pytest.raises(CheckpointError):
            pth_reader.check_read_budget([fake])
    with pytest.raises(CheckpointError, match="exceed the 1,000 bytes allowed"):
        pth_reader.check_read_budget([Fake(1001, 1001)], max_bytes=1000)


@pytest.mark.parametrize("value, match", [
    (np.zeros(3, np.complex64), "complex64; weights must be real"),
    (np.zeros(3, "M8[s]"), "datetime64"),
    (np.zeros(3, [("a", "<f4")]), "weights must be real"),
    (np.array(["a"]), "<U1"),
    (np.array([1.0, np.nan, np.inf], np.float32), "holds 2 NaN/Inf values"),
    (np.array([1e300], np.float64), "holds 1 NaN/Inf values beyond float32's range"),
])
def test_state_dicts_with_unusable_values_are_refused(tmp_path, value, match):
    path = tmp_path / "m.npz"
    save_converted(path, "eamamba", {}, {"w": value, "ok": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match=match) as info:
        load_state(path)
    assert "'w'" in str(info.value)
    assert load_converted(path).state_dict["w"].dtype == value.dtype      # the raw reader returns them as stored


def test_converted_entries_are_checked_against_their_declared_size(tmp_path):
    path = tmp_path / "m.npz"
    save_converted(path, "eamamba", {"dim": 1}, {"w": np.arange(6, dtype=np.float32)})
    with zipfile.ZipFile(path) as zf:
        header = zf.read(HEADER_KEY + ".npy")
    def rebuild(name, entry, extra=()):
        out = tmp_path / name
        with zipfile.ZipFile(out, "w") as zf:
            zf.writestr(HEADER_KEY + ".npy", header)
            zf.writestr("w.npy", entry)
            for n, data in extra:
                zf.writestr(n, data)
        return out
    npy = io.BytesIO()
    np.lib.format.write_array(npy, np.arange(6, dtype=np.float32))
    good = npy.getvalue()
    np.testing.assert_array_equal(load_converted(rebuild("ok.npz", good)).state_dict["w"], np.arange(6))
    for name, entry, extra, match in [
        ("short.npz", good[:-4], (), "declares 148 bytes, but its header describes 152"),
        ("long.npz", good + b"\0" * 4, (), "declares 156 bytes"),
        ("pickled.npz", good.replace(b"'<f4'", b"'|O' "), (), "Python objects"),
        ("extra.npz", good, (("notes.txt", b"hi"),), "unexpected entry 'notes.txt'"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            load_converted(rebuild(name, entry, extra))
    # a JSON header declared larger than 1 MiB is refused before it is read
    big = tmp_path / "bighead.npz"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zf:
        text = io.BytesIO()
        np.lib.format.write_array(text, np.array(json.dumps({"format_version": 1, "pad": "x" * 2**20})))
        zf.writestr(HEADER_KEY + ".npy", text.getvalue())
    with pytest.raises(CheckpointError, match="malformed __eamamba_ref__ header"):
        load_converted(big)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["<f4", ">f4", "<f2", ">f8", "<i8", ">u2", "|b1"]),
       st.lists(st.integers(0, 4), min_size=0, max_size=3), st.booleans(), st.integers(0, 2**31 - 1))
def test_property_converted_entries_read_like_numpy(dtype, shape, fortran, seed):
    """Whatever byte order and memory order an entry was written in, it reads as np.load reads it
    (np.load is the independent reference), in native byte order and C order."""
    import tempfile
    rng = np.random.default_rng(seed)
    arr = (rng.standard_normal(shape) * 50).astype(dtype)
    if fortran:
        arr = np.asfortranarray(arr)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.npz")
        save_converted(path, None, None, {"a": arr})
        got = load_converted(path).state_dict["a"]
        with np.load(path, allow_pickle=False) as ref:
            expect = ref["a"]
    assert got.dtype.isnative and got.flags.c_contiguous and got.dtype == expect.dtype.newbyteorder("=")
    np.testing.assert_array_equal(got, expect)


def test_brief_is_bounded():
    from eamamba_ref.io.untrusted import brief
    t = ()
    for _ in range(200):
        t = (t, t)                                         # repr would take 2**200 steps
    long_values = [t, "x" * 10**7, b"y" * 10**7, 10**5000, list(range(10**6)), {i: i for i in range(10**5)},
                   collections.OrderedDict((str(i), [i] * 100) for i in range(1000)), object()]
    for v in long_values:
        assert len(brief(v)) < 200


# --------------------------------------------------------------------------------------------------
# Tests against real torch.save files


def _torch():
    return pytest.importorskip("torch")


def to_numpy(t):
    torch = _torch()
    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def assert_same(ours, theirs, where="root"):
    """Structure, types, dtypes, shapes and values of read_pth's result equal torch.load's."""
    torch = _torch()
    if isinstance(theirs, torch.Tensor):
        expect = to_numpy(theirs)
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == expect.dtype and ours.shape == expect.shape, where
        np.testing.assert_array_equal(ours, expect, err_msg=where)
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        for k in theirs:
            assert_same(ours[k], theirs[k], f"{where}/{k}")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def official_checkpoint(torch, seed=0):
    torch.manual_seed(seed)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    ema = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, betas=(0.9, 0.999))
    net(torch.randn(2, 3, 5, 5).permute(0, 1, 3, 2)).sum().backward()  # a BN step, then Adam state
    opt.step()
    return {
        "model": {"name": "eamamba", "args": {"dim": 4, "num_blocks": [1, 2], "scan_type": "diagonal",
                                               "bias": False, "ffn_expansion_factor": 2.0, "upscale": None},
                  "sd": net.state_dict(), "sd_e": ema.state_dict()},
        "optimizer": {"name": "adamw", "args": {"lr": 3e-4, "betas": (0.9, 0.999)}, "sd": opt.state_dict()},
        "current_iter": 1234,
        "state": torch.get_rng_state(),
    }


def test_official_checkpoint_matches_torch_load(tmp_path):
    torch = _torch()
    path = tmp_path / "current_iter-last.pth"
    torch.save(official_checkpoint(torch), path)
    ours, theirs = read_pth(path), torch.load(path, weights_only=True)
    assert_same(ours, theirs)
    assert ours["state"].dtype == np.uint8 and ours["state"].shape == (5056,)
    assert ours["model"]["sd"]._metadata == theirs["model"]["sd"]._metadata  # the BUILD'd attribute
    assert isinstance(ours["optimizer"]["sd"]["state"][0]["exp_avg"], np.ndarray)


def test_load_state_ema_raw_and_laziness(tmp_path, monkeypatch):
    torch = _torch()
    ck = official_checkpoint(torch)
    path = tmp_path / "ck.pth"
    torch.save(ck, path)
    reads = []
    real_read = pth_reader._Archive.read
    monkeypatch.setattr(pth_reader._Archive, "read", lambda self, key: reads.append(key) or real_read(self, key))
    for weights, key in (("ema", "sd_e"), ("raw", "sd")):
        reads.clear()
        name, args, sd = load_state(path, weights=weights)
        assert name == "eamamba" and args == ck["model"]["args"]
        assert list(sd) == list(ck["model"][key])
        for k, v in ck["model"][key].items():
            expect = to_numpy(v)
            assert sd[k].dtype == (np.float32 if expect.dtype.kind == "f" else expect.dtype)
            np.testing.assert_array_equal(sd[k], expect)
        assert sd["1.num_batches_tracked"].dtype == np.int64
        # Only the chosen state dict's storages were read: not the other one, the optimizer or RNG state.
        assert len(reads) == len(ck["model"][key]) == len(set(reads))
    lazy = read_pth(path, lazy=True)
    t = lazy["optimizer"]["sd"]["state"][0]["exp_avg"]
    assert isinstance(t, LazyTensor) and t.shape == (4, 3, 3, 3) and t.dtype == np.float32
    reads.clear()
    ema = materialize(lazy["model"]["sd_e"])
    np.testing.assert_array_equal(ema["0.weight"], to_numpy(ck["model"]["sd_e"]["0.weight"]))
    assert len(reads) == len(ck["model"]["sd_e"])


def test_load_state_missing_ema_and_bad_weights(tmp_path):
    torch = _torch()
    path = tmp_path / "ck.pth"
    torch.save({"model": {"name": "eamamba", "args": {}, "sd": {"w": torch.ones(2)}}}, path)
    with pytest.raises(CheckpointError, match="no 'sd_e'.*weights='raw'"):
        load_state(path)
    assert list(load_state(path, weights="raw")[2]) == ["w"]
    with pytest.raises(ValueError, match="'ema' or 'raw'"):
        load_state(path, weights="best")
    torch.save({"epoch": 3, "net": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="neither an official"):
        load_state(path)


def test_bare_state_dict_and_module_prefix(tmp_path):
    torch = _torch()
    sd = collections.OrderedDict(
        [("conv.weight", torch.randn(2, 3, dtype=torch.float16)), ("conv.bias", torch.randn(2, dtype=torch.bfloat16)),
         ("w64", torch.randn(3, dtype=torch.float64)), ("bn.num_batches_tracked", torch.tensor(5))]
    )
    path = tmp_path / "sd.pth"
    torch.save(sd, path)
    name, args, got = load_state(path)
    assert name is None and args is None and list(got) == list(sd)
    for k, v in sd.items():
        expect = to_numpy(v)
        assert got[k].dtype == (np.float32 if v.is_floating_point() else np.int64)
        np.testing.assert_array_equal(got[k], expect.astype(got[k].dtype))
    torch.save(collections.OrderedDict(("module." + k, v) for k, v in sd.items()), path)
    assert list(load_state(path)[2]) == list(sd)
    # Only a prefix on every key is the DataParallel wrapper; a mixed dict is left alone.
    torch.save({"module.a": torch.ones(1), "b": torch.ones(1)}, path)
    assert list(load_state(path)[2]) == ["module.a", "b"]


@pytest.mark.parametrize(
    "dtype", ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
              "complex64", "uint16", "uint32"],
)
def test_dtypes(tmp_path, dtype):
    torch = _torch()
    dt = getattr(torch, dtype)
    base = (torch.arange(-6, 6) * 37).reshape(3, 4)
    t = base.to(dt) if dt not in (torch.uint16, torch.uint32) else base.abs().to(torch.int64).to(dt)
    path = tmp_path / "t.pth"
    torch.save({"t": t, "tT": t.T, "scalar": t[1, 2]}, path)
    got = read_pth(path)
    expect = t.float() if dt == torch.bfloat16 else t
    expect_np = expect.numpy() if dt not in (torch.uint16, torch.uint32) else np.asarray(t.tolist(), dtype=dtype)
    for key, e in (("t", expect_np), ("tT", expect_np.T), ("scalar", expect_np[1, 2:3].reshape(()))):
        assert isinstance(got[key], np.ndarray)
        assert got[key].dtype == e.dtype and got[key].shape == e.shape
        np.testing.assert_array_equal(got[key], e)


def test_views_of_one_storage(tmp_path):
    torch = _torch()
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {"full": t, "every_other_row": t[::2], "T": t.T, "block": t[1:3, 2:5], "offset": t.flatten()[5:11],
             "expand": t[1:2].expand(3, 6), "scalar": t[2, 3], "col": t[:, 4], "empty": t[:0]}
    path = tmp_path / "v.pth"
    torch.save(views, path)
    with zipfile.ZipFile(path) as zf:  # torch.save writes the one shared storage, whole
        assert len([n for n in zf.namelist() if "/data/" in n]) == 1
    ours = read_pth(path)
    assert_same(ours, torch.load(path, weights_only=True))
    assert all(a.flags.writeable and a.flags.c_contiguous for a in ours.values())


def test_non_tensor_objects(tmp_path):
    torch = _torch()
    t = torch.ones(2)
    t.note = "attr"  # saved through torch._tensor._rebuild_from_type_v2
    p = torch.nn.Parameter(torch.zeros(3))
    p.extra = 1  # saved through _rebuild_parameter_with_state
    obj = {"dev": torch.device("cuda", 1), "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "bytes": b"\x00\xff",
           "set": {1, 2}, "complex": 1 - 2j, "none": None, "nested": [(1, "a"), {"x": [t]}], "t": t, "p": p}
    path = tmp_path / "o.pth"
    torch.save(obj, path)
    got = read_pth(path)
    assert got["dev"] == "cuda:1" and got["dtype"] == "torch.bfloat16" and got["size"] == (2, 3)
    assert got["bytes"] == b"\x00\xff" and got["set"] == {1, 2} and got["complex"] == 1 - 2j and got["none"] is None
    assert got["nested"][0] == (1, "a")
    np.testing.assert_array_equal(got["nested"][1]["x"][0], [1, 1])
    assert got["nested"][1]["x"][0] is got["t"]  # one tensor saved twice is one array, as in torch.load
    np.testing.assert_array_equal(got["p"], [0, 0, 0])


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torch_formats_refused(tmp_path):
    torch = _torch()
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy torch.save format"):
        read_pth(legacy)
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    with pytest.raises(CheckpointError, match="TorchScript"):
        read_pth(script)


def test_truncated_and_corrupt_files(tmp_path):
    torch = _torch()
    path = tmp_path / "ck.pth"
    torch.save(official_checkpoint(torch), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        short = tmp_path / f"short{cut}.pth"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            load_state(short)
    # Flip one byte inside the first storage: the pickle still loads, the storage's CRC does not match.
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    bad = bytearray(data)
    bad[start] ^= 0xFF
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(bytes(bad))
    lazy = read_pth(corrupt, lazy=True)
    with pytest.raises(CheckpointError, match="CRC"):
        materialize(lazy)


dtypes = st.sampled_from(["float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"])
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True), st.tuples(dtypes, shapes, st.booleans()),
                       max_size=5), st.integers(0, 2**31 - 1))
def test_property_random_tensors_round_trip(spec, seed):
    import tempfile

    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    obj = {}
    for key, (dtype, shape, transpose) in spec.items():
        t = (torch.randn(shape, generator=gen) * 100).to(getattr(torch, dtype))
        obj[key] = t.transpose(0, -1) if transpose and t.dim() > 1 else t
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p.pth")
        torch.save(obj, path)
        assert_same(read_pth(path), torch.load(path, weights_only=True))

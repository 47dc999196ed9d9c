"""Crafted checkpoints through every entry point: one line, a non-zero exit, bounded time and memory.

Each hostile file is small on disk and built here with tests/pth_files.py (no torch): hand-assembled
pickles in a hand-built zip for `.pth`, and `.npz` files with crafted `.npy` headers. All of them go through `load`,
``python -m eamamba_ref.convert`` and ``python -m eamamba_ref.restore --weights`` (and the generic
`load_state` where the attack is below the architecture), each case in a child process limited to
1.5 GB of address space with a time limit, so a crash (the segfault of a 200,000-deep tuple key), a
runaway allocation (zip bombs) or a hang (a key that takes 2**100 steps to hash) fails its case
instead of the test session. The children are forked from one process that imported eamamba_ref
once, which keeps the whole module to a few seconds.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from pth_files import (ARGS, T, deflated_zeros, npy_header, official, p_int, tiny_params, write_npz,
                       write_pth)

from eamamba_ref.io.checkpoint import HEADER_KEY

if not hasattr(os, "fork"):                       # the children are forked and rlimit'ed: POSIX only
    pytest.skip("needs os.fork and resource limits (POSIX)", allow_module_level=True)

MEMORY_LIMIT = 1536 * 2**20
CASE_TIMEOUT = 120      # seconds for the three or four entry points of one case; a pass takes < 2 s


# ----------------------------------------------------------------------------------------------------
# The cases: file builder, expected reason (a regex on the one-line message), entry points.

ENTRY_POINTS = ("load", "convert", "restore")


def deep_tuple_key(p):
    # {((((None,),),)...): None} 200,000 deep (200 kB): CPython's tuple hash recurses without a depth
    # check, so a plain unpickler segfaults on this (the reported file was 2,000,000 deep).
    return write_pth(p, body=b"}N" + b"\x85" * 200_000 + b"Ns")


def shared_tuple_key(p):
    # t_k = (t_{k-1}, t_{k-1}), 100 levels, as a dict key: 2**100 steps to hash, 3 kB on disk.
    return write_pth(p, body=b"})q\x00" + b"0h\x00h\x00\x86q\x00" * 100 + b"Ns")


def colliding_int_keys(p):
    # ints k * (2**61 - 1) all hash to 0: a dict of them is quadratic to build.
    return write_pth(p, {"model": {k * (2**61 - 1): 0 for k in range(1, 20001)}})


def set_call_bomb(p):
    # set(L) on one memoised 10,000-int list, 50,000 times, every result kept: 400 kB -> 25 GB.
    ints = b"".join(p_int(i) for i in range(10000))
    body = b"]q\x00(" + ints + b"ecbuiltins\nset\nq\x01h\x00\x85q\x02(" + b"h\x01h\x02R" * 50000 + b"l"
    return write_pth(p, body=body)


def container_flood(p):
    # 2,000,000 empty dicts in a list, one byte each.
    return write_pth(p, body=b"(" + b"}" * 2_000_000 + b"l")


def huge_memo_index(p):
    # LONG_BINPUT 2**31 - 1: an array-backed memo would grow to 16 GB.
    return write_pth(p, body=b"]r\xff\xff\xff\x7f")


def zip_bomb_storage(p):
    # A right-shaped output conv whose storage declares 3 GB (deflated to 3 MB).
    sd = {k: T(v) for k, v in tiny_params().items()}
    w = tiny_params()["output.weight"]
    sd["output.weight"] = T(w, storage_numel=750 * 2**20, payload=deflated_zeros(3000 * 2**20), method=8,
                            declared=3000 * 2**20)
    return write_pth(p, official(sd=sd))


def stride0_view(p):
    # A 500-byte storage seen as 30000 x 30000 (stride 0): 3.6 GB when copied out.
    return write_pth(p, {"patch_embed.proj.weight": T(np.zeros(125), shape=(30000, 30000), stride=(0, 0))})


def pth_huge_num_blocks(p):
    return write_pth(p, official(args=dict(ARGS, num_blocks=[100_000_000, 0, 0, 0])))


def npz_huge_num_blocks(p):
    return write_npz(p, args=dict(ARGS, num_blocks=[100_000_000, 0, 0, 0]))


def npz_deflate_bomb(p):
    # output.weight's .npy header says 1,048,576,000 float32 (4.2 GB), deflated to 4 MB.
    n = 4000 * 2**20
    head = npy_header((n // 4,))
    return write_npz(p, raw=[("output.weight.npy", deflated_zeros(n, head), 8, len(head) + n)])


def npz_header_bomb(p):
    n = 200 * 2**20                         # a 50 M-character JSON header
    head = npy_header((), f"<U{n // 4}")
    return write_npz(p, raw=[(HEADER_KEY + ".npy", deflated_zeros(n, head), 8, len(head) + n)])


def with_args(**change):
    def build(p):
        return write_npz(p, args=dict(ARGS, **change))
    return build


def with_mamba(**change):
    return with_args(mamba_cfg=dict(ARGS["mamba_cfg"], **change))


def with_weight(key, value, fmt="npz"):
    def build(p):
        params = tiny_params()
        params[key] = value(params[key])
        if fmt == "npz":
            return write_npz(p, arrays=params)
        return write_pth(p, official(sd={k: T(v) for k, v in params.items()}))
    return build


def with_nan(a):
    a = a.copy()
    a.flat[3] = np.nan
    return a


def bare_odd_dim(p):
    # a bare state dict whose first conv says dim 9: the inferred architecture cannot exist
    sd = {k: T(v) for k, v in tiny_params().items()}
    sd["patch_embed.proj.weight"] = T(np.zeros((9, 3, 3, 3)))
    return write_pth(p, sd)


def pth_args_list(p):
    return write_pth(p, official(args=[1, 2, 3]))


def pth_hundred_dims(p):
    sd = {k: T(v) for k, v in tiny_params().items()}
    sd["output.weight"] = T(np.zeros(1), shape=(1,) * 100, stride=(1,) * 100)
    return write_pth(p, official(sd=sd))


def pth_overflowing_shape(p):
    sd = {k: T(v) for k, v in tiny_params().items()}
    sd["output.weight"] = T(np.zeros(1), shape=(2**40, 2**40), stride=(0, 0))
    return write_pth(p, official(sd=sd))


def npz_overflowing_shape(p):
    return write_npz(p, raw=[("output.weight.npy", npy_header((2**40, 2**40)) + bytes(16), 0,
                              len(npy_header((2**40, 2**40))) + 16)])


def npz_hundred_dims(p):
    head = npy_header((1,) * 100)
    return write_npz(p, raw=[("output.weight.npy", head + bytes(4), 0, len(head) + 4)])


STATE = ENTRY_POINTS + ("load_state",)
CASES = {
    # name: (builder, suffix, {entry point: expected reason}) -- one regex for all entry points, or a dict
    "deep_tuple_key": (deep_tuple_key, ".pth", "more than 64 parts", STATE),
    "shared_tuple_key": (shared_tuple_key, ".pth", "more than 64 parts", STATE),
    "colliding_int_keys": (colliding_int_keys, ".pth", "a 61-bit integer; refusing to hash it", STATE),
    # these two run the unpickler to its whole budget (seconds each), so fewer entry points
    "set_call_bomb": (set_call_bomb, ".pth", "unpickling steps", ENTRY_POINTS),
    "container_flood": (container_flood, ".pth", "unpickling steps", ("load",)),
    "huge_memo_index": (huge_memo_index, ".pth", "neither an official EAMamba checkpoint", STATE),
    "zip_bomb_storage": (zip_bomb_storage, ".pth", "zip bomb", STATE),
    "stride0_view": (stride0_view, ".pth", {"load_state": "stride 0", None: "not an EAMamba model"},
                     STATE),
    "pth_huge_num_blocks": (pth_huge_num_blocks, ".pth", "blocks per level 100000000 is outside", ENTRY_POINTS),
    "npz_huge_num_blocks": (npz_huge_num_blocks, ".npz", "blocks per level 100000000 is outside", ENTRY_POINTS),
    "npz_deflate_bomb": (npz_deflate_bomb, ".npz", {"load_state": "not enough memory to read weight 'output.weight'",
                                                    None: r"output.weight has shape \(1048576000,\)"}, STATE),
    "npz_header_bomb": (npz_header_bomb, ".npz", "malformed __eamamba_ref__ header", STATE),
    "string_dim": (with_args(dim="64"), ".npz", "dim must be an integer, got '64'", ENTRY_POINTS),
    "string_d_state": (with_mamba(d_state="16"), ".npz", "mamba_cfg.d_state must be an integer", ENTRY_POINTS),
    "null_ffn_factor": (with_args(ffn_expansion_factor=None), ".npz", "ffn_expansion_factor must be a number",
                        ENTRY_POINTS),
    "string_mamba_cfg": (with_args(mamba_cfg="x"), ".npz", "mamba_cfg must be a dict", ENTRY_POINTS),
    "string_num_blocks": (with_args(num_blocks="abc"), ".npz", "num_blocks must be a short list", ENTRY_POINTS),
    "float_num_blocks": (with_args(num_blocks=[1.5, 1, 1, 1]), ".npz", "num_blocks must be", ENTRY_POINTS),
    "pth_args_list": (pth_args_list, ".pth", "malformed 'name' or 'args'", STATE),
    "bare_odd_dim": (bare_odd_dim, ".pth", "not usable: EAMamba needs an even dim", ENTRY_POINTS),
    "structured_weight": (with_weight("output.weight", lambda a: np.zeros(a.shape, [("x", "<f4")])), ".npz",
                          {"load_state": "must be real numbers", None: "floating point"}, STATE),
    "complex_weight": (with_weight("output.weight", lambda a: a.astype(np.complex64)), ".npz",
                       {"load_state": "must be real numbers", None: "has dtype complex64"}, STATE),
    "datetime_weight": (with_weight("output.weight", lambda a: np.zeros(a.shape, "M8[s]")), ".npz",
                        {"load_state": "must be real numbers", None: "has dtype datetime64"}, STATE),
    "int_weight": (with_weight("output.weight", lambda a: a.astype(np.int32)), ".npz", "floating point",
                   ENTRY_POINTS),
    "nan_weight_npz": (with_weight("output.weight", with_nan), ".npz", "output.weight' holds 1 NaN/Inf", STATE),
    "nan_weight_pth": (with_weight("output.weight", with_nan, "pth"), ".pth", "output.weight' holds 1 NaN/Inf",
                       STATE),
    "inf_weight_pth": (with_weight("patch_embed.proj.weight", lambda a: a + np.inf, "pth"), ".pth", "NaN/Inf",
                       STATE),
    "pth_hundred_dims": (pth_hundred_dims, ".pth", "100 dimensions", STATE),
    "npz_hundred_dims": (npz_hundred_dims, ".npz", "100 dimensions", STATE),
    "pth_overflowing_shape": (pth_overflowing_shape, ".pth", "larger than any array", STATE),
    "npz_overflowing_shape": (npz_overflowing_shape, ".npz", "header describes", STATE),
}

# The child: forked per case from one process that imported everything (single-threaded BLAS/OpenMP,
# so forking is safe), address space limited, each entry point's rc and stderr written to a file.
DRIVER = r"""
import contextlib, io, json, os, resource, sys, time, traceback
import eamamba_ref.io.loading, eamamba_ref.io.checkpoint, eamamba_ref.apps.convert, eamamba_ref.apps.restore
from eamamba_ref.io.checkpoint import CheckpointError
eamamba_ref.apps.restore.default_backend()           # import what the backend probe imports, before forking
cases, limit, timeout, out = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

def run(entry, path, work):
    if entry in ("load", "load_state"):
        try:
            (eamamba_ref.io.loading.load if entry == "load" else eamamba_ref.io.checkpoint.load_state)(path)
            return 0
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if entry == "convert":
        return eamamba_ref.apps.convert.main([path, os.path.join(work, "converted.npz")])
    return eamamba_ref.apps.restore.main(["--weights", path, "--task", "denoise", "-o", work])

results = {}
for name, path, entries in cases:
    work = path + ".out"
    os.mkdir(work)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        res = {}
        for entry in entries:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = run(entry, path, work)
            except BaseException:               # what a user would see as a traceback
                rc = "traceback"
                err.write(traceback.format_exc()[-3000:])
            res[entry] = [rc, err.getvalue()]
        res["left in output folder"] = os.listdir(work)
        with open(work + ".json", "w") as f:
            json.dump(res, f)
        os._exit(0)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            outcome = "exit %d" % os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() - start > timeout:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            outcome = "killed after %g s" % timeout
            break
        time.sleep(0.01)
    res = {"outcome": outcome, "seconds": time.monotonic() - start}
    if os.path.exists(work + ".json"):
        with open(work + ".json") as f:
            res.update(json.load(f))
    results[name] = res
with open(out, "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    cases = []
    for name, (build, suffix, _, entries) in CASES.items():
        path = build(folder / (name + suffix))
        assert os.path.getsize(path) < 6 * 2**20          # small on disk, whatever they declare
        cases.append([name, str(path), list(entries)])
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    out = folder / "results.json"
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases), str(MEMORY_LIMIT), str(CASE_TIMEOUT),
                           str(out)], capture_output=True, text=True, env=env, timeout=CASE_TIMEOUT * len(cases))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_checkpoint_is_one_line_error(outcomes, name):
    res = outcomes[name]
    assert res["outcome"] == "exit 0", f"{name}: the child died ({res['outcome']}): crash, memory or time"
    assert res["seconds"] < 60, f"{name}: {res['seconds']:.1f} s"
    reasons = CASES[name][2]
    for entry in CASES[name][3]:
        rc, err = res[entry]
        assert rc == 2, f"{name} via {entry}: rc {rc}\n{err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{name} via {entry}: {err}"
        assert "Traceback" not in err and len(lines[0]) < 1000
        reason = reasons if isinstance(reasons, str) else reasons.get(entry, reasons[None])
        assert re.search(reason, lines[0]), f"{name} via {entry}: {lines[0]}"
    assert res["left in output folder"] == []            # convert/restore wrote nothing


def test_the_builders_make_valid_files_when_not_tampered_with(tmp_path):
    """The same writers without the attack give files that load: each case fails for its attack."""
    from eamamba_ref.io.checkpoint import load_state
    from eamamba_ref.io.loading import load
    params = tiny_params()
    for path in (write_pth(tmp_path / "ok.pth", official()), write_npz(tmp_path / "ok.npz")):
        model = load(path)
        assert set(model.params) == set(params)
        for k, v in params.items():
            np.testing.assert_array_equal(model.params[k], v)
        assert load_state(path)[0] == "eamamba"

"""Scan orderings and the all-around transform (eamamba_ref.reference.scans).

Golden values are hand-worked from the official definitions (models/module/scan.py of
daidaijr/EAMamba) or come from an independent implementation: the `numpy-hilbert-curve` package
that the official Hilbert scan calls, and (when torch is installed) the PyTorch reference, which is
checked against the official code itself.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eamamba_ref.reference import scans

ORDERINGS = [None, "diagonal", "zigzag", "zorder", "hilbert", "morton"]
CONFIGS = [(t, k) for t in [None, "diagonal", "zigzag", "zorder", "hilbert"] for k in (1, 2, 4, 8)
           if not (t is None and k == 8)]
sizes = st.tuples(st.integers(1, 40), st.integers(1, 40))
fast = settings(max_examples=60, deadline=None)


def rc(order, w):
    """Row and column of every step of an ordering."""
    return np.divmod(np.asarray(order), w)


# ---------------------------------------------------------------- hand-worked small grids
#   3x3 grid:  0 1 2 / 3 4 5 / 6 7 8
HAND_3x3 = {
    None: [0, 1, 2, 3, 4, 5, 6, 7, 8],
    # anti-diagonals r+c = 0..4, rows increasing inside each
    "diagonal": [0, 1, 3, 2, 4, 6, 5, 7, 8],
    # official: diagonals k = -2..2 of the row-flipped grid [[6,7,8],[3,4,5],[0,1,2]] are
    # [0], [3,1], [6,4,2], [7,5], [8]; even k are reversed -> [0], [3,1], [2,4,6], [7,5], [8]
    "zigzag": [0, 3, 1, 2, 4, 6, 7, 5, 8],
}


@pytest.mark.parametrize("scan_type", list(HAND_3x3))
def test_hand_worked_3x3(scan_type):
    assert scans.scan_order(scan_type, 3, 3).tolist() == HAND_3x3[scan_type]


def test_hand_worked_zorder_4x4_reproduces_official_codes():
    # The official code's bit spreading (masks shifted by one place, see scans.py) gives these
    # codes on a 4x4 grid (pixel -> code), worked by hand from its four shift-and-mask lines:
    # column c in {0,1,2,3} -> {0, 3, 18, 19}; row r contributes the same spread << 1.
    codes = [0, 3, 18, 19, 6, 7, 22, 23, 36, 39, 54, 55, 38, 39, 54, 55]
    assert (scans._official_spread_bits(np.arange(4)) == [0, 3, 18, 19]).all()
    # ties (39, 54, 55 appear twice) keep row-major order: with at most 16 pixels torch's sort
    # (libstdc++'s std::sort) is a plain insertion sort, which is stable
    assert scans.scan_order("zorder", 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 12, 9, 13,
                                                         10, 14, 11, 15]
    assert len(set(codes)) == 13   # pinned: the official 'z-order' is not injective


def test_hand_worked_morton_4x4():
    assert scans.scan_order("morton", 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7,
                                                         8, 9, 12, 13, 10, 11, 14, 15]


def test_hand_worked_hilbert():
    # (0,0) -> (0,1) -> (1,1) -> (1,0)
    assert scans.scan_order("hilbert", 2, 2).tolist() == [0, 1, 3, 2]
    # The official procedure pads to the next power-of-two square and drops cells outside:
    # on 2x3 the padded 4x4 curve (0,0) (1,0) (1,1) (0,1) (0,2) (0,3) (1,3) (1,2) (2,2) ... keeps
    # (0,0) (1,0) (1,1) (0,1) (0,2) (1,2)
    assert scans.scan_order("hilbert", 2, 3).tolist() == [0, 3, 4, 1, 2, 5]
    assert scans.scan_order("hilbert", 4, 4).tolist() == [0, 4, 5, 1, 2, 3, 7, 6,
                                                          10, 11, 15, 14, 13, 9, 8, 12]


def test_degenerate_grids():
    for t in ORDERINGS:
        assert scans.scan_order(t, 1, 1).tolist() == [0]          # Hilbert too (official crashes)
        assert sorted(scans.scan_order(t, 1, 7).tolist()) == list(range(7))
        assert sorted(scans.scan_order(t, 7, 1).tolist()) == list(range(7))
    # a single row or column: the diagonal, zigzag and raster orders all walk it straight
    for t in (None, "diagonal", "zigzag"):
        assert scans.scan_order(t, 1, 5).tolist() == list(range(5))
        assert scans.scan_order(t, 5, 1).tolist() == list(range(5))


# ------------------------------------------------------------------------ properties
@fast
@given(size=sizes)
def test_every_ordering_is_a_permutation(size):
    h, w = size
    for t in ORDERINGS:
        order = scans.scan_order(t, h, w)
        assert order.dtype == np.int64 and order.shape == (h * w,)
        assert np.array_equal(np.sort(order), np.arange(h * w))


@fast
@given(size=sizes)
def test_diagonal_visits_antidiagonals_in_order(size):
    h, w = size
    r, c = rc(scans.scan_order("diagonal", h, w), w)
    s = r + c
    assert (np.diff(s) >= 0).all()
    same = np.diff(s) == 0
    assert (np.diff(r)[same] == 1).all()            # rows increase inside an anti-diagonal


@fast
@given(size=sizes)
def test_zigzag_steps_are_8_neighbours(size):
    h, w = size
    r, c = rc(scans.scan_order("zigzag", h, w), w)
    assert (np.maximum(abs(np.diff(r)), abs(np.diff(c))) == 1).all()
    assert (np.diff(r + c) >= 0).all()


@settings(max_examples=20, deadline=None)
@given(k=st.integers(0, 6))
def test_hilbert_on_power_of_two_squares_steps_are_4_neighbours(k):
    n = 2 ** k
    r, c = rc(scans.scan_order("hilbert", n, n), n)
    assert (abs(np.diff(r)) + abs(np.diff(c)) == 1).all()


@fast
@given(size=st.tuples(st.integers(1, 33), st.integers(1, 33)))
def test_hilbert_matches_the_package_the_official_code_uses(size):
    hilbert = pytest.importorskip("hilbert")
    h, w = size
    n = 2 ** int(np.ceil(np.log2(max(h, w)))) if max(h, w) > 1 else 1
    if n == 1:
        return                              # the package cannot encode 0 bits (official crashes)
    coords = np.array([[i, j] for i in range(n) for j in range(n)])
    sorted_coords = coords[np.argsort(hilbert.encode(coords, 2, int(np.log2(n))))]
    keep = (sorted_coords[:, 0] < h) & (sorted_coords[:, 1] < w)
    expected = sorted_coords[keep, 0] * w + sorted_coords[keep, 1]
    assert np.array_equal(scans.scan_order("hilbert", h, w), expected)


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 6), data=st.data())
def test_morton_visits_aligned_blocks_contiguously(k, data):
    n = 2 ** k
    j = data.draw(st.integers(1, k))
    r, c = rc(scans.scan_order("morton", n, n), n)
    block = (r >> j) * (n >> j) + (c >> j)
    # every aligned 2^j x 2^j block occupies one run of 4^j consecutive steps
    runs = block.reshape(-1, 4 ** j)
    assert (runs == runs[:, :1]).all()
    assert len(np.unique(runs[:, 0])) == runs.shape[0]


@fast
@given(size=st.tuples(st.integers(1, 16), st.integers(1, 16)),
       config=st.sampled_from(CONFIGS), merge=st.sampled_from(["add", "concate"]),
       batch=st.integers(1, 2), per_head=st.integers(1, 3))
def test_restore_inverts_all_around(size, config, merge, batch, per_head):
    scan_type, K = config
    h, w = size
    C = K * per_head
    x = np.random.default_rng(0).standard_normal((batch, C, h * w)).astype(np.float32)
    y = scans.all_around(x, size, scan_type, K, merge)
    assert y.shape == (batch, K, C // K if merge == "concate" else C, h * w)
    back = scans.restore(y, size, scan_type, K, merge)
    factor = K if merge == "add" else 1
    np.testing.assert_allclose(back, factor * x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [(30,), 30, (4, 5, 6), None])
def test_a_size_that_is_not_a_pair_is_a_clear_error(size):
    x = np.zeros((1, 8, 30), np.float32)
    for call in (lambda: scans.all_around(x, size, "diagonal", 8, "concate"),
                 lambda: scans.restore(x[:, None], size, "diagonal", 1, "add"),
                 lambda: scans.direction_indices("diagonal", 8, size)):
        with pytest.raises(ValueError, match=r"size must be the map's \(H, W\)"):
            call()


@fast
@given(size=sizes, config=st.sampled_from(CONFIGS))
def test_inverse_index_inverts(size, config):
    table = scans.direction_indices(config[0], config[1], size)
    inverse = scans.direction_indices(config[0], config[1], size, inverse=True)
    t = np.arange(size[0] * size[1])
    for k in range(config[1]):
        assert np.array_equal(table[k][inverse[k]], t)
        assert np.array_equal(inverse[k][table[k]], t)


def test_all_around_is_the_gather_through_the_table():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 8, 6 * 5)).astype(np.float32)
    table = scans.direction_indices("hilbert", 8, (6, 5))
    y = scans.all_around(x, (6, 5), "hilbert", 8, "concate")
    for k in range(8):
        assert np.array_equal(y[:, k], x[:, k:k + 1][..., table[k]].reshape(2, 1, 30))
    y_add = scans.all_around(x, (6, 5), "hilbert", 8, "add")
    for k in range(8):
        assert np.array_equal(y_add[:, k], x[..., table[k]])


# ------------------------------------------- the official directions, pinned on a 2x3 grid
#   grid 0 1 2 / 3 4 5 ; diagonal order [0, 1, 3, 2, 4, 5]
def test_diagonal_eight_directions_hand_worked():
    table = scans.direction_indices("diagonal", 8, (2, 3))
    assert table.tolist() == [
        [0, 1, 3, 2, 4, 5],   # 0: anti-diagonals from the top-left corner
        [5, 4, 2, 3, 1, 0],   # 1: reversed *then* indexed: from the bottom-right corner
        [2, 1, 5, 0, 4, 3],   # 2: left-right flip, then the ordering: from the top-right
        [3, 4, 0, 5, 1, 2],   # 3: flip, reverse, ordering: from the bottom-left
        [0, 1, 2, 3, 4, 5],   # 4..7 ignore the ordering (K = 8 indexes heads 0..3 only):
        [5, 4, 3, 2, 1, 0],   #   row-major, reversed row-major,
        [0, 3, 1, 4, 2, 5],   #   column-major (transpose), reversed column-major
        [5, 2, 4, 1, 3, 0],
    ]


def test_raster_directions_transpose_instead_of_flip():
    # for the raster scan, heads 2 and 3 transpose the grid (column-major sweeps)
    table = scans.direction_indices(None, 4, (2, 3))
    assert table.tolist() == [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0],
                              [0, 3, 1, 4, 2, 5], [5, 2, 4, 1, 3, 0]]


@pytest.mark.parametrize("scan_type", ["diagonal", "zigzag", "zorder", "hilbert"])
def test_reversed_head_is_rotated_grid_ordering(scan_type):
    # Surprising but official: odd heads reverse the sequence *before* the ordering's index is
    # applied, so head 1 visits pixel L-1-order[t] (the ordering on the 180-degree rotated grid),
    # which is NOT the ordering read backwards unless the ordering is symmetric under rotation.
    h, w = 4, 4
    order = scans.scan_order(scan_type, h, w)
    head1 = scans.direction_indices(scan_type, 2, (h, w))[1]
    assert np.array_equal(head1, h * w - 1 - order)
    if scan_type == "hilbert":
        assert not np.array_equal(head1, order[::-1])


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, match", [
    (lambda: scans.scan_order("spiral", 4, 4), "unknown scan_type"),
    (lambda: scans.scan_order("diagonal", 0, 4), "positive integers"),
    (lambda: scans.all_around(np.zeros((1, 6, 16)), (4, 4), "diagonal", 3, "concate"), "scan_count"),
    (lambda: scans.all_around(np.zeros((1, 6, 16)), (4, 4), "diagonal", 4, "concate"), "divisible"),
    (lambda: scans.all_around(np.zeros((1, 8, 15)), (4, 4), "diagonal", 4, "concate"), "length"),
    (lambda: scans.all_around(np.zeros((1, 8, 16)), (4, 4), "diagonal", 4, "mean"), "merge"),
    (lambda: scans.all_around(np.zeros((8, 16)), (4, 4), "diagonal", 4, "add"), "dimensions"),
    (lambda: scans.all_around(np.zeros((1, 8, 16)), (4, 4), None, 8, "add"), "scan_count 8"),
    (lambda: scans.restore(np.zeros((1, 2, 2, 16)), (4, 4), "diagonal", 4, "add"), "directions"),
])
def test_invalid_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_config_spellings():
    assert scans.canonical_scan_type("Diagonal") == "diagonal"     # official configs lower-case it
    assert scans.canonical_scan_type("raster") is None
    assert scans.canonical_scan_type(None) is None


def test_index_arrays_are_cached_and_read_only():
    a = scans.scan_order("hilbert", 37, 23)
    assert a is scans.scan_order("hilbert", 37, 23)
    with pytest.raises(ValueError):
        a[0] = 1


# ------------------------------------------------- against the PyTorch reference (oracle)
@pytest.mark.parametrize("scan_type, K", [c for c in CONFIGS if c[1] > 1])
@pytest.mark.parametrize("merge", ["add", "concate"])
def test_matches_pytorch_reference_transform(scan_type, K, merge):
    torch = pytest.importorskip("torch")
    ref_scan = pytest.importorskip("eamamba_ref.pytorch.scan")
    for h, w in [(2, 3), (5, 7), (8, 8), (12, 4), (9, 13)]:
        transform = ref_scan.ScanTransform(scan_type, K, merge)
        x = np.random.default_rng(h * w).standard_normal((2, 2 * K, h * w)).astype(np.float32)
        expected = transform.apply_scan_transform(torch.from_numpy(x.copy()), (h, w)).numpy()
        got = scans.all_around(x, (h, w), scan_type, K, merge)
        assert np.array_equal(got, expected)
        back = transform.restore_scan_transform(torch.from_numpy(expected.copy()), (h, w)).numpy()
        np.testing.assert_allclose(scans.restore(expected, (h, w), scan_type, K, merge), back,
                                   rtol=1e-6, atol=1e-6)

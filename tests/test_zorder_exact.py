"""The official z-order, ties included, against real PyTorch (eamamba_ref.reference.scans, eamamba_ref.reference.std_sort).

The official code sorts its pixel codes with `torch.argsort` on CPU tensors, and the codes tie, so
the order of tied pixels is part of the ordering. Every expected order here comes from
`torch.argsort` itself, on codes computed with torch operations the way the official code computes
them (int64 `torch.arange` coordinates, int32 mask tensors) -- independently of both
`eamamba_ref.reference.scans` and the PyTorch reference. The heap-sort fallback of the emulated introsort is
exercised by real grids (65x4, 66x26, ...) and by an organ-pipe array, both checked to reach it.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eamamba_ref.reference import scans, std_sort

torch = pytest.importorskip("torch")

# Grids on which the emulated introsort runs out of depth and heap-sorts a range (found by
# sweeping every grid up to 181x181 below 32768 pixels; 33 grids in all).
HEAP_GRIDS = [(65, 2), (65, 4), (65, 11), (66, 16), (66, 26), (69, 11), (76, 73), (81, 119),
              (91, 133), (93, 137), (152, 160), (169, 43)]
GRIDS = sorted(set(
    [(1, 1), (1, 2), (2, 1), (1, 16), (1, 17), (17, 1), (1, 100), (100, 1), (1, 1000), (999, 1),
     (2, 3), (3, 3), (4, 4), (5, 7), (7, 5), (8, 8), (8, 6), (9, 13), (12, 4), (4, 12), (12, 20),
     (13, 9), (16, 16), (17, 17), (31, 33), (32, 32), (33, 31), (40, 24), (24, 40), (48, 80),
     (63, 65), (64, 64), (100, 37), (37, 100), (127, 129), (127, 258), (128, 128), (129, 127),
     (150, 101), (181, 181), (180, 182), (1, 32767), (32767, 1), (181, 179), (3, 10922),
     (1, 32768), (32768, 1), (128, 256), (256, 128), (200, 200), (181, 182), (256, 256),
     (255, 257)] + HEAP_GRIDS))


def official_codes(h, w):
    """The official z-order codes, computed with torch as the official code does (int64)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")

    def spread(v):
        # the official shift / mask pairs, masks as int32 tensors (the result stays int64)
        for shift, mask in ((8, 0x0000FFFF), (4, 0x00FF00FF), (2, 0x0F0F0F0F), (1, 0x33333333)):
            v = (v | (v << shift)) & torch.tensor(mask, dtype=torch.int32)
        return v

    return spread(cols.flatten()) | (spread(rows.flatten()) << 1)


def torch_order(h, w):
    return torch.argsort(official_codes(h, w)).numpy()


def test_grid_list_covers_what_matters():
    assert len(GRIDS) >= 60
    assert {(128, 128), (181, 181), (1, 32767), (1, 32768), (256, 256)} <= set(GRIDS)
    # odd sizes, single rows and columns, both sides of torch's 32768-element radix threshold
    assert sum(h % 2 and w % 2 for h, w in GRIDS) >= 10
    assert sum(h == 1 for h, _ in GRIDS) >= 5 and sum(w == 1 for _, w in GRIDS) >= 5
    assert sum(h * w >= std_sort.RADIX_MIN for h, w in GRIDS) >= 6


@pytest.mark.parametrize("h, w", GRIDS)
def test_zorder_is_torch_argsort_of_the_official_codes(h, w):
    codes = official_codes(h, w)
    assert codes.dtype == torch.int64
    ours = scans.scan_order("zorder", h, w)
    rows, cols = np.divmod(np.arange(h * w), w)
    assert np.array_equal(scans._official_spread_bits(cols) | (scans._official_spread_bits(rows) << 1),
                          codes.numpy())
    assert np.array_equal(ours, torch.argsort(codes).numpy())


@settings(max_examples=60, deadline=None)
@given(size=st.tuples(st.integers(1, 200), st.integers(1, 200)))
def test_zorder_on_any_grid(size):
    assert np.array_equal(scans.scan_order("zorder", *size), torch_order(*size))


def test_ties_matter_on_most_grids():
    # The tests above could not tell a wrong tie order apart if torch kept ties in row-major order:
    # below 32768 pixels it does not, on most grids with more than 16 pixels.
    small = [(h, w) for h, w in GRIDS if 16 < h * w < std_sort.RADIX_MIN]
    differ = [(h, w) for h, w in small
              if not np.array_equal(torch_order(h, w),
                                    np.argsort(official_codes(h, w).numpy(), kind="stable"))]
    assert len(differ) >= 0.8 * len(small)
    assert (8, 8) in differ and (128, 128) in differ
    # measured counts of pixels whose step differs from a stable sort
    stable = np.argsort(official_codes(128, 128).numpy(), kind="stable")
    assert (torch_order(128, 128) != stable).sum() == 15262
    assert (torch_order(8, 8) != np.argsort(official_codes(8, 8).numpy(), kind="stable")).sum() == 4


@pytest.mark.parametrize("h, w", HEAP_GRIDS)
def test_grids_that_reach_the_heap_sort_fallback(h, w):
    codes = official_codes(h, w).numpy()
    order, heap_sorts = std_sort.std_sort_argsort(codes, return_heap_sorts=True)
    assert heap_sorts >= 1
    assert np.array_equal(order, torch.argsort(torch.from_numpy(codes)).numpy())


def test_reversed_and_mirrored_zorder_heads_follow_the_same_order():
    # Heads 1-3 index a reversed / mirrored sequence with the same ordering: compare the whole
    # K = 4 table with the PyTorch reference on grids where ties reorder.
    ref_scan = pytest.importorskip("eamamba_ref.pytorch.scan")
    for h, w in [(8, 8), (9, 13), (65, 4), (40, 24)]:
        assert np.array_equal(scans.direction_indices("zorder", 4, (h, w)),
                              ref_scan.direction_orders("zorder", 4, h, w))
        assert np.array_equal(ref_scan.zorder_order(h, w), torch_order(h, w))


# ---------------------------------------------- the sort itself, on arrays that are not grids
def _check(keys):
    keys = np.asarray(keys, dtype=np.int64)
    expected = torch.argsort(torch.from_numpy(keys.copy())).numpy()
    assert np.array_equal(std_sort.torch_cpu_argsort(keys), expected)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 15, 16, 17, 18, 31, 33, 100, 1000, 4097, 32767])
@pytest.mark.parametrize("distinct", [1, 2, 3, 10, 1000, 2 ** 62])
def test_random_keys_with_ties(n, distinct):
    rng = np.random.default_rng(n * 7 + distinct % 1000)
    low = -(distinct // 2)                        # negative keys too
    keys = rng.integers(low, low + distinct, size=n, dtype=np.int64)
    _check(keys)


@pytest.mark.parametrize("n", [std_sort.RADIX_MIN, 40000])
def test_from_32768_elements_torch_sorts_stably(n):
    keys = np.random.default_rng(n).integers(0, 50, size=n, dtype=np.int64)
    _check(keys)
    assert np.array_equal(std_sort.torch_cpu_argsort(keys), np.argsort(keys, kind="stable"))


def test_adversarial_organ_pipe_reaches_the_heap_sort():
    # Median-of-three on an organ pipe (rise then fall) splits off few elements per level, so the
    # depth budget runs out; keys // 3 adds ties inside the heap-sorted ranges.
    n = 5000
    keys = np.concatenate([np.arange(n // 2), np.arange(n // 2)[::-1]]) // 3
    _, heap_sorts = std_sort.std_sort_argsort(keys, return_heap_sorts=True)
    assert heap_sorts >= 10
    _check(keys)


@pytest.mark.parametrize("pattern", ["sorted", "reversed", "push_front", "sawtooth", "constant"])
def test_structured_keys(pattern):
    n = 3000
    keys = {"sorted": np.arange(n) // 4, "reversed": (np.arange(n) // 4)[::-1],
            "push_front": np.concatenate([np.arange(1, n), [0]]) // 2,
            "sawtooth": np.arange(n) % 37, "constant": np.zeros(n, dtype=np.int64)}[pattern]
    _check(keys)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=300))
def test_any_short_list_of_small_keys(values):
    _check(values)


def test_bad_keys_are_refused():
    with pytest.raises(ValueError, match="1-D integer"):
        std_sort.torch_cpu_argsort(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D integer"):
        std_sort.torch_cpu_argsort(np.zeros(4))

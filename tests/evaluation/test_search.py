from __future__ import annotations

import numpy as np
import pytest
import torch

from isc.evaluation.search import (
    faiss_gpu_available,
    knn,
    predictions_from_knn,
    predictions_from_range,
    range_search,
)

BACKENDS = ["faiss", "torch"]


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return _unit(rng, 300, 64), _unit(rng, 2000, 64)


def _brute_knn(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, axis=1), idx


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_matches_brute_force(data, backend):
    q, db = data
    sims, idx = knn(q, db, 10, backend=backend, device="cpu")
    ref_sims, ref_idx = _brute_knn(q, db, 10)
    assert sims.shape == (300, 10) and sims.dtype == np.float32
    assert idx.shape == (300, 10) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 0)


def test_backends_agree(data):
    q, db = data
    s_f, i_f = knn(q, db, 10, backend="faiss", device="cpu")
    s_t, i_t = knn(q, db, 10, backend="torch", device="cpu")
    np.testing.assert_array_equal(i_f, i_t)
    np.testing.assert_allclose(s_f, s_t, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_blocked_equals_unblocked(data, backend):
    q, db = data
    s1, i1 = knn(q, db, 7, backend=backend, device="cpu")
    s2, i2 = knn(q, db, 7, backend=backend, device="cpu", block_size=64, database_block_size=300)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_pads_when_k_exceeds_database(backend):
    rng = np.random.default_rng(1)
    q, db = _unit(rng, 5, 8), _unit(rng, 3, 8)
    sims, idx = knn(q, db, 6, backend=backend, device="cpu", database_block_size=2)
    ref_sims, ref_idx = _brute_knn(q, db, 3)
    np.testing.assert_array_equal(idx[:, :3], ref_idx)
    np.testing.assert_allclose(sims[:, :3], ref_sims, atol=1e-5)
    assert np.all(idx[:, 3:] == -1)
    assert np.all(np.isneginf(sims[:, 3:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_accepts_float64_and_tensors(data, backend):
    q, db = data
    s1, i1 = knn(q, db, 5, backend=backend, device="cpu")
    s2, i2 = knn(
        torch.from_numpy(q.astype(np.float64)), torch.from_numpy(db), 5, backend=backend, device="cpu"
    )
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)


def test_knn_ties_broken_by_index():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    db = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    for backend in BACKENDS:
        _, idx = knn(q, db, 4, backend=backend, device="cpu")
        np.testing.assert_array_equal(idx, [[1, 3, 0, 2]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["queries", "database"])
def test_nan_rows_rejected_with_row_index(data, backend, side):
    q, db = (x.copy() for x in data)
    target = q if side == "queries" else db
    target[17, 3] = np.nan
    target[40, 0] = np.inf
    with pytest.raises(ValueError, match=rf"{side} has 2 row\(s\).*first at row 17"):
        knn(q, db, 3, backend=backend, device="cpu")
    with pytest.raises(ValueError, match=rf"{side} has 2 row\(s\).*first at row 17"):
        range_search(q, db, 0.5, backend=backend, device="cpu")


def test_input_validation(data):
    q, db = data
    with pytest.raises(ValueError, match="dimension"):
        knn(q, db[:, :32], 3)
    with pytest.raises(ValueError, match="2-D"):
        knn(q[0], db, 3)
    with pytest.raises(ValueError, match="empty"):
        knn(q[:0], db, 3)
    with pytest.raises(ValueError, match="database is empty"):
        knn(q, db[:0], 3)
    with pytest.raises(TypeError, match="floating"):
        knn(q.astype(np.int32), db, 3)
    with pytest.raises(ValueError, match="k must be"):
        knn(q, db, 0)
    with pytest.raises(ValueError, match="backend"):
        knn(q, db, 3, backend="annoy")


def _brute_range(q: np.ndarray, db: np.ndarray, threshold: float):
    sims = q @ db.T  # float32, like both backends
    qi, di = np.nonzero(sims >= np.float32(threshold))
    s = sims[qi, di]
    order = np.lexsort((di, -s, qi))
    return qi[order], di[order], s[order]


def _threshold_in_gap(sims: np.ndarray, near: float) -> float:
    """A threshold near ``near`` in the widest gap between similarities, so float32 rounding differences
    between matmul implementations cannot move a pair across it."""
    values = np.sort(sims[np.abs(sims - near) < 0.01].astype(np.float64))
    i = int(np.argmax(np.diff(values)))
    assert values[i + 1] - values[i] > 2e-5
    return float(values[i] + values[i + 1]) / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_range_search_matches_brute_force(data, backend):
    q, db = data
    threshold = _threshold_in_gap(q @ db.T, 0.3)
    qi, di, s = range_search(q, db, threshold, backend=backend, device="cpu", block_size=128)
    rqi, rdi, rs = _brute_range(q, db, threshold)
    assert len(qi) > 100
    np.testing.assert_array_equal(qi, rqi)
    np.testing.assert_array_equal(di, rdi)
    np.testing.assert_allclose(s, rs, atol=1e-5)
    assert qi.dtype == np.int64 and di.dtype == np.int64 and s.dtype == np.float32


def test_range_search_backends_agree_and_blocking(data):
    q, db = data
    threshold = _threshold_in_gap(q @ db.T, 0.35)
    ref = range_search(q, db, threshold, backend="faiss", device="cpu")
    for backend in BACKENDS:
        got = range_search(
            q, db, threshold, backend=backend, device="cpu", block_size=37, database_block_size=512
        )
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_allclose(got[2], ref[2], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_range_search_threshold_is_inclusive(backend):
    # Exactly representable similarities: 1.0, 0.5 and 0.0.
    q = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]], dtype=np.float32)
    db = np.eye(4, dtype=np.float32)
    qi, di, s = range_search(q, db, 0.5, backend=backend, device="cpu")
    np.testing.assert_array_equal(qi, [0, 1, 1])
    np.testing.assert_array_equal(di, [0, 0, 1])
    np.testing.assert_array_equal(s, [1.0, 0.5, 0.5])
    qi, _, _ = range_search(q, db, 1.5, backend=backend, device="cpu")
    assert qi.shape == (0,)


def test_predictions_from_knn_drops_padding():
    sims = np.array([[0.9, 0.2, -np.inf], [0.8, -np.inf, -np.inf]], dtype=np.float32)
    idx = np.array([[1, 0, -1], [0, -1, -1]])
    preds = predictions_from_knn(np.array(["Q0", "Q1"]), np.array(["R0", "R1"]), sims, idx)
    assert preds.query_ids.tolist() == ["Q0", "Q0", "Q1"]
    assert preds.reference_ids.tolist() == ["R1", "R0", "R0"]
    np.testing.assert_allclose(preds.scores, [0.9, 0.2, 0.8], rtol=1e-6)


def test_predictions_from_range(data):
    q, db = data
    qids = np.array([f"Q{i:05d}" for i in range(len(q))])
    rids = np.array([f"R{i:06d}" for i in range(len(db))])
    qi, di, s = range_search(q, db, 0.4, device="cpu")
    preds = predictions_from_range(qids, rids, qi, di, s)
    assert len(preds) == len(qi)
    np.testing.assert_array_equal(preds.query_ids, qids[qi])
    np.testing.assert_array_equal(preds.reference_ids, rids[di])
    preds.check_no_duplicates()


def test_num_threads_is_restored(data):
    import faiss

    q, db = data
    before = faiss.omp_get_max_threads()
    s1, i1 = knn(q, db, 5, backend="faiss", device="cpu", num_threads=1)
    assert faiss.omp_get_max_threads() == before
    range_search(q, db, 0.5, backend="faiss", num_threads=1)
    assert faiss.omp_get_max_threads() == before
    s2, i2 = knn(q, db, 5, backend="faiss", device="cpu")
    np.testing.assert_array_equal(i1, i2)


@pytest.mark.skipif(faiss_gpu_available(), reason="this faiss build has GPU support")
def test_faiss_cuda_request_without_gpu_is_a_clear_error(data):
    q, db = data
    with pytest.raises(RuntimeError, match="no GPU support"):
        knn(q, db, 5, backend="faiss", device="cuda")
    # "auto" silently uses the CPU.
    knn(q, db, 5, backend="faiss", device="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_paths_match_cpu(data):
    q, db = data
    ref_s, ref_i = knn(q, db, 10, backend="faiss", device="cpu")
    for backend in BACKENDS:
        if backend == "faiss" and not faiss_gpu_available():
            continue
        s, i = knn(q, db, 10, backend=backend, device="cuda", block_size=100)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(s, ref_s, atol=1e-5)
    # CUDA tensors as input, range search on the GPU.
    s, i = knn(torch.from_numpy(q).cuda(), torch.from_numpy(db).cuda(), 10, backend="torch", device="cuda")
    np.testing.assert_array_equal(i, ref_i)
    threshold = _threshold_in_gap(q @ db.T, 0.3)
    ref = range_search(q, db, threshold, backend="faiss")
    got = range_search(q, db, threshold, backend="torch", device="cuda", block_size=100)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


class _FakeGpuFaiss:
    """faiss-gpu's cloning calls as a faiss-cpu build sees them: each records its arguments and hands
    back the CPU index, so the placement logic runs (and is checked) on a machine with no GPU."""

    def __init__(self, n_gpus: int) -> None:
        self.n_gpus, self.calls = n_gpus, []  # type: ignore[var-annotated]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import faiss

        from isc.evaluation import search

        class Options:
            shard = useFloat16 = False

        monkeypatch.setattr(search, "_GPU_RESOURCES", {})
        for name, value in {
            "StandardGpuResources": lambda: object(),
            "GpuClonerOptions": Options,
            "GpuMultipleClonerOptions": Options,
            "get_num_gpus": lambda: self.n_gpus,
            "index_cpu_to_gpu": self._one,
            "index_cpu_to_gpu_multiple_py": self._many,
        }.items():
            monkeypatch.setattr(faiss, name, value, raising=False)

    def _one(self, resources, gpu, index, co):
        self.calls.append(("one", [gpu], co.useFloat16, None, resources))
        return index

    def _many(self, resources, index, co, gpus):
        self.calls.append(("many", list(gpus), co.useFloat16, co.shard, resources))
        return index


@pytest.mark.parametrize(
    ("device", "shard", "float16", "expected"),
    [
        ("auto", False, False, ("many", [0, 1, 2], False, False)),  # every visible GPU, replicated
        ("cuda", True, False, ("many", [0, 1, 2], False, True)),  # sharded
        ("cuda", False, True, ("many", [0, 1, 2], True, False)),  # float16 storage
        ("cuda:1", True, True, ("one", [1], True, None)),  # one GPU: nothing to shard
        ("cpu", True, True, None),
    ],
)
def test_faiss_places_the_flat_index_on_every_visible_gpu(
    data, monkeypatch, device, shard, float16, expected
):
    q, db = data
    cpu = knn(q, db, 10, backend="faiss", device="cpu")
    fake = _FakeGpuFaiss(3)
    fake.install(monkeypatch)
    got = knn(q, db, 10, backend="faiss", device=device, gpu_shard=shard, gpu_float16=float16)
    np.testing.assert_array_equal(got[1], cpu[1])
    assert [c[:4] for c in fake.calls] == ([expected] if expected else [])
    if expected:  # one resource object per GPU, made once and reused by the next search
        knn(q, db, 10, backend="faiss", device=device, gpu_shard=shard, gpu_float16=float16)
        first, again = ([c[4]] if c[0] == "one" else c[4] for c in fake.calls)
        assert len({id(r) for r in first}) == len(expected[1])
        assert all(a is b for a, b in zip(first, again, strict=True))
    # k past faiss's GPU k-selection falls back to the CPU index
    fake.calls.clear()
    knn(q, np.concatenate([db, db]), 2049, backend="faiss", device=device)
    assert fake.calls == []


def test_settings_carry_the_gpu_placement_to_every_search():
    from isc.evaluation.settings import EvaluationSettings

    s = EvaluationSettings.from_dict({"gpu_index": "shard", "gpu_float16": True, "device": "cuda"})
    assert s.search == {"backend": "faiss", "device": "cuda", "gpu_shard": True, "gpu_float16": True}
    assert EvaluationSettings().search["device"] is None  # auto: every visible GPU when faiss has them
    with pytest.raises(ValueError, match="evaluation.gpu_index must be replicate or shard"):
        EvaluationSettings.from_dict({"gpu_index": "split"})


def test_torch_backend_ignores_reduced_matmul_precision(data):
    q, db = data
    ref = knn(q, db, 5, backend="torch", device="cpu")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        got = knn(q, db, 5, backend="torch", device="cpu")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    np.testing.assert_array_equal(got[1], ref[1])


# --- approximate indexes -----------------------------------------------------------------------------


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, d)).astype(np.float32)
    x = centres[rng.integers(8, size=n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_an_ivf_index_probing_every_list_is_exact_and_fewer_lists_miss_some() -> None:
    from isc.evaluation.search import approximate_knn, recall_at_k

    db, q, train = _clustered(2000, 16, 0), _clustered(200, 16, 1), _clustered(1000, 16, 2)
    sims, exact = knn(q, db, 10)
    all_lists, found = approximate_knn(q, db, 10, index="IVF16,Flat", training=train, parameters="nprobe=16")
    assert recall_at_k(found, exact) == 1.0
    np.testing.assert_allclose(all_lists, sims, atol=1e-5)
    _, one_list = approximate_knn(q, db, 10, index="IVF16,Flat", training=train, parameters="nprobe=1")
    assert 0.2 < recall_at_k(one_list, exact) < 1.0  # the neighbours in the other lists are missed
    recalls = [
        recall_at_k(approximate_knn(q, db, 10, index="HNSW16", parameters=f"efSearch={ef}")[1], exact)
        for ef in (16, 256)
    ]
    assert recalls[0] < recalls[1] and recalls[1] > 0.95  # a wider graph search finds more


def test_recall_at_k_by_hand() -> None:
    from isc.evaluation.search import recall_at_k

    exact = np.array([[0, 1, 2], [3, 4, -1]])
    found = np.array([[2, 9, 0], [4, -1, -1]])
    assert recall_at_k(found, exact) == pytest.approx(3 / 5)  # 2 of 3, then 1 of 2 real neighbours


def test_a_bad_index_string_or_parameter_names_the_key() -> None:
    from isc.evaluation.search import approximate_knn

    x = _clustered(100, 8, 0)
    with pytest.raises(ValueError, match="evaluation.index='IVFX'"):
        approximate_knn(x, x, 5, index="IVFX")
    with pytest.raises(ValueError, match="evaluation.index_parameters='nprobbe=4'"):
        approximate_knn(x, x, 5, index="IVF4,Flat", parameters="nprobbe=4")


# --- the global cap (the official candidate rule) -------------------------------------------------


def test_the_capped_range_search_keeps_the_best_pairs_over_all_queries() -> None:
    """Against the full similarity matrix: the pairs kept are exactly those above the final threshold,
    at most max_results of them and at least 80 % (faiss's rule once the cap is passed)."""
    from isc.evaluation.search import capped_range_search

    q, db = _clustered(300, 16, 3), _clustered(2000, 16, 4)
    full = q @ db.T
    for cap in (50, 5000, 200_000):
        qi, di, sims = capped_range_search(q, db, cap, block_size=64)
        assert len(sims) <= cap
        threshold = sims.min()
        above = np.argwhere(full >= threshold)
        assert len(above) == len(sims) >= min(0.8 * cap, full.size * 0.5)
        assert {tuple(p) for p in above} == set(zip(qi.tolist(), di.tolist(), strict=True))
        np.testing.assert_allclose(sims, full[qi, di], atol=1e-5)
        order = np.lexsort((di, -sims, qi))
        assert (order == np.arange(len(order))).all()  # by query, then decreasing similarity
    with pytest.raises(ValueError, match="max_results must be a positive integer"):
        capped_range_search(q, db, 0)


@pytest.mark.parametrize(("block", "max_results"), [(700, 2000), (1, 300), (3000, 10**7)])
def test_capped_range_over_database_blocks_keeps_every_pair_above_its_threshold(data, block, max_results):
    """The official candidate rule over reference blocks: at most ``max_results`` pairs, and exactly the
    pairs that score above the smallest one kept (checked against every pair, brute force); a cap above
    the number of pairs keeps them all."""
    from isc.evaluation.search import CappedRange

    q, db = data
    q = q[:40]
    capped = CappedRange(q, max_results, backend="faiss", device="cpu")
    for start in range(0, len(db), block):
        capped.add(db[start : start + block], np.arange(start, min(start + block, len(db))))
    qi, di, sim = capped.result()
    full = q.astype(np.float64) @ db.astype(np.float64).T
    assert len(sim) <= max_results
    if max_results >= full.size:
        assert len(sim) == full.size
    else:
        assert len(sim) >= 0.3 * max_results
    np.testing.assert_allclose(sim, full[qi, di], atol=1e-5)
    expected = set(zip(*np.nonzero(full > sim.min() + 1e-5), strict=True))
    assert expected <= set(zip(qi.tolist(), di.tolist(), strict=True))
    assert len(set(zip(qi.tolist(), di.tolist(), strict=True))) == len(sim)  # no pair twice
    assert np.all(np.diff(qi) >= 0)  # by query, then best first

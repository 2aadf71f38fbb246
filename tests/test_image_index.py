"""The image index library (featstore.index): recall against exact search, updates, dedup, choosing a kind."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import featstore.index as fi
from featstore.errors import FeatstoreError
from featstore.index.synthetic import clip_like

ROWS, DIM = 20_000, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's cores are shared: faiss's OpenMP spin-waits make 2 threads slower than one there."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    stream = clip_like(ROWS, DIM, seed=1, batch=4096)
    return stream, np.concatenate([v for _, v in stream])


def exact_recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(found, truth)]))


def fresh_queries(vectors: np.ndarray, n: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Queries not in the index (perturbed rows) and their exact top-10 keys (keys are row numbers here)."""
    rng = np.random.default_rng(7)
    queries = vectors[rng.choice(len(vectors), n, replace=False)] + 0.05 * rng.standard_normal((n, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    return queries, np.argsort(-(queries @ vectors.T), axis=1)[:, :10]


def test_choose_kind_follows_autofaiss_rules_within_the_budget():
    assert fi.choose_kind(5_000, 512, fi.parse_size("1M")) == "Flat"
    assert fi.choose_kind(100_000, 512, fi.parse_size("1G")) == "HNSW32"
    assert fi.choose_kind(500_000, 512, 1_040_000_000) == "IVF2048_HNSW32,Flat"  # HNSW8 would not fit
    budget = 1_000_000 * 512 * 4 // 8
    key = fi.choose_kind(1_000_000, 512, budget)
    assert key.startswith("OPQ") and ",IVF" in key and key.endswith("x8"), key
    assert fi.index_bytes(key, 1_000_000, 512) <= budget
    assert fi.choose_kind(1_000_000, 512, budget, kind="hnsw").startswith("HNSW")  # asked for: built as asked
    assert fi.choose_kind(1_000, 64, kind="IVF16,Flat") == "IVF16,Flat"  # a factory string passes through
    with pytest.raises(FeatstoreError, match="no index of"):
        fi.choose_kind(1_000_000, 512, fi.parse_size("5M"))
    assert fi.parse_size("2G") == 2 << 30 and fi.parse_size("512MiB") == 512 << 20
    with pytest.raises(FeatstoreError, match="not a memory size"):
        fi.parse_size("lots")


def test_the_training_sample_is_uniform_and_its_copies_fit_the_allowance(data, monkeypatch):
    import faiss

    built = importlib.import_module("featstore.index.build")  # the module (featstore.index.build is its function)
    stream, vectors = data
    keys, sample = built._reservoir(stream, 3_000, DIM, seed=1, first=200)
    rng = np.random.default_rng(1)  # the same priorities, a batch at a time: the sample is the 3,000 lowest
    lowest = np.concatenate([k for k, _ in stream])[np.argsort(np.concatenate([rng.random(len(k)) for k, _ in stream]))]
    assert np.array_equal(keys[:200], lowest[:200]) and set(keys) == set(lowest[:3_000])  # held out first, in order
    assert len(np.unique(keys)) == 3_000 and np.allclose(sample, vectors[keys], atol=1e-6)  # each row's own vector
    assert built._reservoir(stream, ROWS + 5, DIM, seed=1)[0].size == ROWS  # fewer rows than the sample: all of them

    trained = []
    monkeypatch.setattr(built, "TRAIN_ALLOWANCE", 1 << 20)
    monkeypatch.setattr(built, "new_index", lambda key, dim, make=built.new_index: spy(make(key, dim), trained))
    rows = 12_000
    small = [(k[k < rows], v[k < rows]) for k, v in stream if k[0] < rows]
    index, info = fi.build(small, rows, DIM, kind="OPQ8_96,IVF16,PQ8", queries=100)
    assert info["bytes"] == faiss.serialize_index(index).size > 0
    copies = built.train_copies("OPQ8_96,IVF16,PQ8", DIM)
    assert copies == 1 + 96 / DIM and trained == [info["trained_on"]]
    assert 0 < trained[0] * 4 * DIM * copies <= 1 << 20 < (trained[0] + 100) * 4 * DIM * copies


def spy(index, trained: list):
    """INDEX whose ``train`` records how many rows it was given."""
    train = index.train

    def counted(x):
        trained.append(len(x))
        return train(x)

    index.train = counted
    return index


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-flat"])
def test_recall_at_10_against_exact_search(data, kind):
    stream, vectors = data
    index, info = fi.build(stream, ROWS, DIM, kind=kind, queries=200)
    assert (info["rows"], fi.live_rows(index)) == (ROWS, ROWS)
    assert info["recall_at_10"] >= 0.95, info
    queries, truth = fresh_queries(vectors)
    _, found = fi.search(index, queries, 10)
    assert exact_recall(found, truth) >= 0.9
    scores, keys = fi.search(index, vectors[123], 1)  # a stored row finds itself first, cosine ~1
    assert keys[0, 0] == 123 and scores[0, 0] == pytest.approx(1.0, abs=1e-4)


def test_pq_index_reaches_the_target_with_exact_rerank(data):
    stream, vectors = data
    rows, dim = 12_000, DIM  # PQ training is the slow part: a smaller set
    small = [(k[k < rows], v[k < rows]) for k, v in stream if k[0] < rows]
    index, info = fi.build(small, rows, dim, kind="IVF64,PQ16x8", queries=200, rerank=lambda keys: vectors[keys])
    assert info["bytes"] <= rows * dim * 4 // 8  # 16-byte codes + 8-byte ids vs 256 bytes of float32
    assert info["recall_at_10"] >= 0.95, info
    truth = fresh_queries(vectors[:rows])
    _, plain = fi.search(index, truth[0], 10)
    _, reranked = fi.search(index, truth[0], 10, rerank=lambda keys: vectors[keys])
    assert exact_recall(reranked, truth[1]) >= 0.9 > exact_recall(plain, truth[1])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-flat"])
def test_update_holds_exactly_the_live_rows(data, kind):
    stream, vectors = data
    rows = 6_000
    index, info = fi.build([(np.arange(rows), vectors[:rows])], rows, DIM, kind=kind, queries=100)
    rng = np.random.default_rng(3)
    removed, changed = np.arange(0, 600), np.arange(600, 900)
    new_keys = np.arange(50_000, 50_500)
    new_vectors = vectors[rows:rows + 800]  # 300 changed rows get other rows' vectors, 500 new rows
    counts = fi.update(index, add=(np.concatenate([changed, new_keys]), new_vectors), remove=removed)
    assert counts == {"added": 800, "removed": 900}
    assert fi.live_rows(index) == rows - 600 + 500
    assert (fi.tombstones(index) > 0) == (kind == "hnsw")
    live = set(range(600, rows)) | set(new_keys.tolist())
    _, found = fi.search(index, vectors[rng.choice(rows + 800, 500, replace=False)], 10)
    assert set(found.ravel().tolist()) <= live  # never a removed row
    scores, found = fi.search(index, new_vectors, 1)  # changed and new rows are found by their new vectors
    hit = found[:, 0] == np.concatenate([changed, new_keys])
    assert hit.mean() >= (0.98 if kind == "hnsw" else 1.0)  # HNSW is approximate even for a stored vector
    assert np.all(scores[hit] > 0.999)
    assert fi.needs_retrain(index, info) is None
    fi.update(index, remove=np.arange(900, 2_000))
    reason = fi.needs_retrain(index, info)
    assert (reason is not None) == (kind == "hnsw"), reason  # HNSW rebuilds past 20 % tombstones


def test_ivf_asks_for_a_retrain_past_twice_its_size_and_when_recall_drifts(data):
    stream, vectors = data
    index, info = fi.build([(np.arange(4_000), vectors[:4_000])], 4_000, DIM, kind="ivf-flat", queries=100)
    fi.update(index, add=(np.arange(4_000, 12_000), vectors[4_000:12_000]))
    assert "over 2x the 4000" in fi.needs_retrain(index, info)
    info["sized_for"] = 12_000
    probe = fi.fresh_probe(np.arange(4_000, 12_000), vectors[4_000:12_000],
                           [(np.arange(12_000), vectors[:12_000])], n=100)
    assert fi.needs_retrain(index, info, probe) is None and info["recall_at_10"] >= 0.95  # re-tuned on the probe
    info["target"] = 1.01
    assert "below the target" in fi.needs_retrain(index, info, probe)


def test_dedup_finds_exact_and_lightly_altered_copies(data):
    _, vectors = data
    rng = np.random.default_rng(5)
    base = vectors[:3_000]
    originals = rng.choice(3_000, 30, replace=False)
    exact, altered = originals[:15], originals[15:]
    noisy = base[altered] + 0.01 * rng.standard_normal((15, DIM)).astype(np.float32)  # cosine ~0.996
    copies = np.concatenate([base[exact], noisy, base[exact[:1]]])  # the first row copied twice: a group of 3
    copy_keys = np.arange(10_000, 10_000 + len(copies))
    keys, all_vectors = np.concatenate([np.arange(3_000), copy_keys]), np.concatenate([base, copies])
    index, _ = fi.build([(keys, all_vectors)], len(keys), DIM, kind="hnsw", queries=100)
    result = fi.dedup(index, all_vectors, keys, threshold=0.98)
    a, b, s = result["pairs"]
    pairs = set(zip(a.tolist(), b.tolist()))
    expected = set(zip(np.concatenate([originals, exact[:1], exact[:1]]).tolist(),
                       np.concatenate([copy_keys[:30], copy_keys[30:], [copy_keys[0]]]).tolist()))
    expected |= {(int(copy_keys[0]), int(copy_keys[30]))}
    assert pairs == expected and np.all(a < b) and np.all(s >= 0.98)
    sizes = sorted(len(g) for g in result["groups"])
    assert sizes == [2] * 29 + [3] and result["rows_in_groups"] == 61
    leak = fi.dedup(index, noisy[:3], np.arange(90_000, 90_003), threshold=0.98, cross=True)  # another split
    found = set(zip(*(ids.tolist() for ids in leak["pairs"][:2])))
    assert found == {(90_000 + i, int(row)) for i in range(3) for row in (altered[i], copy_keys[15 + i])}
    same_keys = fi.dedup(index, noisy[:3], altered[:3], threshold=0.98, cross=True)  # key spaces are per split
    assert set(zip(*(ids.tolist() for ids in same_keys["pairs"][:2]))) >= {(int(k), int(k)) for k in altered[:3]}


def test_save_load_keeps_removals_and_refuses_bad_input(data, tmp_path):
    stream, vectors = data
    index, _ = fi.build([(np.arange(2_000), vectors[:2_000])], 2_000, DIM, kind="hnsw", queries=50)
    fi.update(index, remove=np.arange(100))
    fi.save(index, str(tmp_path / "i.faiss"))
    loaded = fi.load(str(tmp_path / "i.faiss"))
    assert fi.live_rows(loaded) == 1_900
    _, found = fi.search(loaded, vectors[:100], 10)
    assert found.min() >= 100
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(FeatstoreError, match="not a readable faiss index"):
        fi.load(str(tmp_path / "bad.faiss"))
    with pytest.raises(FeatstoreError, match="re-iterable"):
        fi.build(iter(stream), ROWS, DIM)
    with pytest.raises(FeatstoreError, match="zero or not finite"):
        fi.update(index, add=(np.array([5]), np.zeros((1, DIM))))
    with pytest.raises(FeatstoreError, match="shape"):
        fi.update(index, add=(np.array([5, 6]), vectors[:1]))

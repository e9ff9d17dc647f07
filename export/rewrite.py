"""Exact graph rewrites that let INT8 kernels cover more of the decoder.

ONNX Runtime's CPU EP has no INT8 ConvTranspose: a quantised ConvTranspose runs in FP32 and
dequantises its weight on every call (about 10% of WRN50's INT8 time at 256 px). The decoder's
ConvTransposes are all kernel = stride, no padding (``deconv2x2``); such a layer is the same
arithmetic as a 1×1 Conv to ``C_out·k·k`` channels followed by DepthToSpace (CRD order), and both of
those have INT8 / fast kernels. A BatchNormalization right after the ConvTranspose is folded into the
1×1 Conv, since it would otherwise sit behind the DepthToSpace where no Conv can absorb it.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


def _attribute(node, name: str, default):
    from onnx import helper
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _rewritable_block(node, initializers) -> Optional[int]:
    """The block size when ``node`` is a ConvTranspose the rewrite covers, else None."""
    kernel = list(_attribute(node, "kernel_shape", []))
    strides = list(_attribute(node, "strides", []))
    if (len(kernel) != 2 or kernel != strides or kernel[0] != kernel[1]
            or _attribute(node, "group", 1) != 1
            or any(_attribute(node, "pads", [])) or any(_attribute(node, "output_padding", []))
            or any(d != 1 for d in _attribute(node, "dilations", []))
            or list(_attribute(node, "output_shape", []))
            or _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or node.input[1] not in initializers
            or (len(node.input) > 2 and node.input[2] and node.input[2] not in initializers)):
        return None
    return int(kernel[0])


def _foldable_batchnorm(output: str, consumers: Dict[str, List], initializers, graph_outputs) -> Optional[object]:
    users = consumers.get(output, [])
    if (output in graph_outputs or len(users) != 1 or users[0].op_type != "BatchNormalization"
            or not all(name in initializers for name in users[0].input[1:5])):
        return None
    return users[0]


def convtranspose_as_conv_depth_to_space(proto) -> int:
    """Rewrite every kernel = stride ConvTranspose (and a BatchNormalization that alone reads it) in
    ``proto`` in place as 1×1 Conv + DepthToSpace. Returns the number of ConvTransposes rewritten.

    ConvTranspose: ``y[o, k·h+i, k·w+j] = Σ_c x[c, h, w] · W[c, o, i, j] + b[o]``. A 1×1 Conv with
    output channel ``o·k² + i·k + j`` holding ``W[:, o, i, j]`` computes every such term at (h, w);
    DepthToSpace in CRD mode puts channel ``o·k² + i·k + j`` at ``(o, k·h+i, k·w+j)``."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: Dict[str, List] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {out.name for out in graph.output}

    rewritten, removed = 0, set()
    for node in list(graph.node):
        if node.op_type != "ConvTranspose":
            continue
        block = _rewritable_block(node, initializers)
        if block is None:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)   # C_in × C_out × k × k
        c_in, c_out = weight.shape[:2]
        bias = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
                if len(node.input) > 2 and node.input[2] else np.zeros(c_out))
        output = node.output[0]
        batchnorm = _foldable_batchnorm(output, consumers, initializers, graph_outputs)
        if batchnorm is not None:
            gamma, beta, mean, var = (numpy_helper.to_array(initializers[name]).astype(np.float64)
                                      for name in batchnorm.input[1:5])
            scale = gamma / np.sqrt(var + float(_attribute(batchnorm, "epsilon", 1e-5)))
            weight = weight * scale[None, :, None, None]
            bias = (bias - mean) * scale + beta
            output = batchnorm.output[0]
            removed.add(output)
        dtype = numpy_helper.to_array(initializers[node.input[1]]).dtype
        conv_weight = weight.transpose(1, 2, 3, 0).reshape(c_out * block * block, c_in, 1, 1).astype(dtype)
        conv_bias = np.repeat(bias, block * block).astype(dtype)
        prefix = node.name or output
        weight_name, bias_name, mid = f"{prefix}_as_conv.weight", f"{prefix}_as_conv.bias", f"{prefix}_as_conv_output"
        graph.initializer.extend([numpy_helper.from_array(conv_weight, weight_name),
                                  numpy_helper.from_array(conv_bias, bias_name)])
        conv = helper.make_node("Conv", [node.input[0], weight_name, bias_name], [mid],
                                name=f"{prefix}_as_conv", kernel_shape=[1, 1])
        depth_to_space = helper.make_node("DepthToSpace", [mid], [output], name=f"{prefix}_depth_to_space",
                                          blocksize=block, mode="CRD")
        position = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(position, depth_to_space)
        graph.node.insert(position, conv)
        rewritten += 1
    # The DepthToSpace now writes each folded BatchNormalization's output: drop those BNs.
    for node in [n for n in graph.node if n.op_type == "BatchNormalization" and n.output[0] in removed]:
        graph.node.remove(node)
    _drop_unused_initializers(proto)
    return rewritten


def _drop_unused_initializers(proto) -> None:
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    for init in [i for i in proto.graph.initializer if i.name not in used]:
        proto.graph.initializer.remove(init)

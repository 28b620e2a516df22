"""The input gradient of an exported COVID-19Net, as ONNX nodes appended to its graph.

:func:`with_saliency` takes the forward graph :func:`covidct.model.onnx_graph.graph_of` writes
and adds reverse-mode nodes for each of its operators, so that one onnxruntime run gives the
probability, the DL feature and ``d probability / d roi`` (the saliency), without TensorFlow.
The gradient is TensorFlow's: a max-pooling window passes its gradient to every input equal to
its maximum, and a ReLU passes it where its output is positive. Only the operators
``graph_of`` writes are handled; any other is refused by name.
"""

from __future__ import annotations

import numpy as np

from covidct.errors import CovidctError

SALIENCY = "saliency"


class _Backward:
    """Reverse-mode nodes for one forward graph whose tensor shapes are all known."""

    def __init__(self, proto):
        from onnx import numpy_helper

        self.weights = {w.name: numpy_helper.to_array(w) for w in proto.graph.initializer}
        self.shapes = {}
        for info in (*proto.graph.input, *proto.graph.value_info, *proto.graph.output):
            dims = info.type.tensor_type.shape.dim
            self.shapes[info.name] = tuple(int(d.dim_value) for d in dims)
        self.nodes, self.constants = [], []
        self.grads: dict[str, list[str]] = {}
        self.scalars: dict[float, str] = {}
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"grad/{hint}/{self.count}"

    def scalar(self, value: float) -> str:
        """One float32 scalar constant, shared by every node that needs it."""
        if value not in self.scalars:
            self.scalars[value] = self.constant("scalar", np.float32(value))
        return self.scalars[value]

    def constant(self, hint: str, array) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.constants.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        from onnx import helper

        out = self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def add(self, tensor: str, grad: str) -> None:
        self.grads.setdefault(tensor, []).append(grad)

    def grad_of(self, tensor: str) -> str | None:
        """The summed gradient reaching ``tensor`` (None where none does)."""
        parts = self.grads.get(tensor)
        if not parts:
            return None
        if len(parts) > 1:
            self.grads[tensor] = [self.node("Sum", parts, "sum")]
        return self.grads[tensor][0]

    # ------------------------------------------------------------------ one operator each

    def backward(self, node) -> None:
        """Add the gradients of ``node``'s inputs, given its output's."""
        from onnx import helper

        dy = self.grad_of(node.output[0])
        if dy is None:
            return
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rule = getattr(self, f"_{node.op_type.lower()}", None)
        if rule is None:
            raise CovidctError(f"node {node.name} ({node.op_type}) has no gradient for the "
                               "saliency")
        rule(node, dy, attrs)

    def _identity(self, node, dy, attrs):
        self.add(node.input[0], dy)

    def _flatten(self, node, dy, attrs):
        shape = self.constant("shape", np.array(self.shapes[node.input[0]], np.int64))
        self.add(node.input[0], self.node("Reshape", [dy, shape], "unflatten"))

    def _transpose(self, node, dy, attrs):
        inverse = [int(i) for i in np.argsort(attrs["perm"])]
        self.add(node.input[0], self.node("Transpose", [dy], "transpose", perm=inverse))

    def _relu(self, node, dy, attrs):
        zero = self.scalar(0.0)
        positive = self.node("Greater", [node.output[0], zero], "relu_on")
        self.add(node.input[0], self.node("Where", [positive, dy, zero], "relu"))

    def _sigmoid(self, node, dy, attrs):
        one = self.scalar(1.0)
        y = node.output[0]
        slope = self.node("Mul", [y, self.node("Sub", [one, y], "one_minus")], "slope")
        self.add(node.input[0], self.node("Mul", [dy, slope], "sigmoid"))

    def _batchnormalization(self, node, dy, attrs):
        gamma, variance = self.weights[node.input[1]], self.weights[node.input[4]]
        scale = gamma / np.sqrt(variance + attrs.get("epsilon", 1e-5))
        scale = self.constant("bn_scale", scale.reshape(1, -1, 1, 1, 1).astype(np.float32))
        self.add(node.input[0], self.node("Mul", [dy, scale], "bn"))

    def _concat(self, node, dy, attrs):
        from onnx import helper

        if attrs["axis"] != 1:
            raise CovidctError(f"node {node.name}: only concatenation over channels has a "
                               "gradient")
        sizes = np.array([self.shapes[x][1] for x in node.input], np.int64)
        split = self.constant("split", sizes)
        outs = [self.name("split") for _ in node.input]
        self.nodes.append(helper.make_node("Split", [dy, split], outs, name=outs[0], axis=1))
        for x, g in zip(node.input, outs):
            self.add(x, g)

    def _globalaveragepool(self, node, dy, attrs):
        shape = self.shapes[node.input[0]]
        scale = self.constant("gap_scale", np.float32(1.0 / np.prod(shape[2:])))
        full = self.constant("shape", np.array(shape, np.int64))
        spread = self.node("Expand", [self.node("Mul", [dy, scale], "gap"), full], "gap_spread")
        self.add(node.input[0], spread)

    def _gemm(self, node, dy, attrs):
        if attrs.get("transA", 0) or attrs.get("transB", 0):
            raise CovidctError(f"node {node.name}: only an untransposed Gemm has a gradient")
        self.add(node.input[0], self.node("Gemm", [dy, node.input[1]], "dense", transB=1))

    def _conv(self, node, dy, attrs):
        """A stride-1 convolution's input gradient is the convolution of ``dy`` with the kernel
        flipped and its channels swapped (onnxruntime's Conv is several times faster than its
        ConvTranspose); any other is the transposed convolution."""
        if attrs.get("group", 1) != 1:
            raise CovidctError(f"node {node.name}: only an ungrouped Conv has a gradient")
        n, m = self.shapes[node.input[0]][2:], self.shapes[node.output[0]][2:]
        kernel = self.weights[node.input[1]]
        strides, dilations = list(attrs["strides"]), list(attrs["dilations"])
        same = attrs.get("auto_pad") == b"SAME_UPPER"
        begins, ends, extra = [], [], []
        for size, out, k, s, d in zip(n, m, kernel.shape[2:], strides, dilations):
            span = (k - 1) * d + 1
            total = max((out - 1) * s + span - size, 0) if same else 0
            begins.append(total // 2)
            ends.append(total - total // 2)
            extra.append(size - ((out - 1) * s + span - total))
        if set(strides) == {1} and set(dilations) == {1}:
            flipped = np.ascontiguousarray(np.flip(kernel, axis=(2, 3, 4)).transpose(1, 0, 2, 3, 4))
            pads = [k - 1 - b for k, b in zip(kernel.shape[2:], begins)]
            pads += [z - o + k - 1 - p for z, o, k, p in zip(n, m, kernel.shape[2:], pads)]
            grad = self.node("Conv", [dy, self.constant("kernel_flipped", flipped)], "conv",
                             kernel_shape=list(kernel.shape[2:]), pads=pads)
        else:
            grad = self.node("ConvTranspose", [dy, node.input[1]], "conv_t", strides=strides,
                             dilations=dilations, pads=begins + ends, output_padding=extra)
        self.add(node.input[0], grad)

    def _maxpool(self, node, dy, attrs):
        x, y = node.input[0], node.output[0]
        window = list(attrs["kernel_shape"])
        if list(attrs["strides"]) != window:
            raise CovidctError(f"node {node.name}: only a max pooling whose stride is its window "
                               "has a gradient")
        n, m = self.shapes[x], self.shapes[y]
        begin = self._pool_begin(attrs, n, m, window)
        peak = self._spread(y, m, window, begin, n, "pool_peak")
        ties = self.node("Equal", [x, peak], "pool_ties")
        zero = self.scalar(0.0)
        spread = self._spread(dy, m, window, begin, n, "pool_grad")
        self.add(x, self.node("Where", [ties, spread, zero], "pool"))

    def _averagepool(self, node, dy, attrs):
        x, y = node.input[0], node.output[0]
        window = list(attrs["kernel_shape"])
        if list(attrs["strides"]) != window or attrs.get("count_include_pad", 0):
            raise CovidctError(f"node {node.name}: only an average pooling whose stride is its "
                               "window, padding not counted, has a gradient")
        n, m = self.shapes[x], self.shapes[y]
        begin = self._pool_begin(attrs, n, m, window)
        count = np.ones((), np.float64)
        for z, o, w, b in zip(n[2:], m[2:], window, begin):
            starts = np.arange(o) * w - b
            inside = np.minimum(starts + w, z) - np.maximum(starts, 0)
            count = np.multiply.outer(count, inside)
        share = self.constant("pool_share", (1.0 / count)[None, None].astype(np.float32))
        spread = self._spread(self.node("Mul", [dy, share], "pool_mean"), m, window, begin, n,
                              "pool_grad")
        self.add(x, spread)

    @staticmethod
    def _pool_begin(attrs, n, m, window) -> list[int]:
        """The padding before each spatial axis (TensorFlow's 'same' puts the odd one after)."""
        same = attrs.get("auto_pad") == b"SAME_UPPER"
        return [(o * w - z) // 2 if same else 0 for z, o, w in zip(n[2:], m[2:], window)]

    def _spread(self, t: str, m, window, begin, n, hint: str) -> str:
        """Each value of ``t`` (shape ``m``) repeated over its pooling window, cut to ``n``."""
        interleaved = [m[0], m[1]]
        for o in m[2:]:
            interleaved += [o, 1]
        tiled = [m[0], m[1]]
        for o, w in zip(m[2:], window):
            tiled += [o, w]
        grown = [m[0], m[1], *[o * w for o, w in zip(m[2:], window)]]
        t = self.node("Reshape", [t, self.constant("shape", np.array(interleaved, np.int64))],
                      hint)
        t = self.node("Expand", [t, self.constant("shape", np.array(tiled, np.int64))], hint)
        t = self.node("Reshape", [t, self.constant("shape", np.array(grown, np.int64))], hint)
        ends = [min(b + z, g) for b, z, g in zip(begin, n[2:], grown[2:])]
        if list(begin) != [0] * len(begin) or ends != list(grown[2:]):
            t = self.node("Slice", [t, self.constant("starts", np.array(begin, np.int64)),
                                    self.constant("ends", np.array(ends, np.int64)),
                                    self.constant("axes", np.arange(2, len(n), dtype=np.int64))],
                          hint)
        short = [b + z - e for b, z, e in zip(begin, n[2:], ends)]
        if any(short):                 # 'valid' pooling leaves the last inputs out: zeros there
            pads = np.array([0] * len(n) + [0, 0, *short], np.int64)
            t = self.node("Pad", [t, self.constant("pads", pads)], hint)
        return t


def with_saliency(proto, output: str = "probability", unit: int = 0):
    """A copy of the forward ``proto`` for a batch of one, with a third output ``saliency``
    (1, D, H, W, 1): the gradient of ``output``'s ``unit`` w.r.t. the input."""
    import onnx
    from onnx import TensorProto, helper, shape_inference

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    (graph_input,) = proto.graph.input
    graph_input.type.tensor_type.shape.dim[0].dim_value = 1
    for out in proto.graph.output:
        out.type.tensor_type.shape.dim[0].dim_value = 1
    proto = shape_inference.infer_shapes(proto, strict_mode=True)
    back = _Backward(proto)
    units = back.shapes[output][1]
    seed = np.zeros((1, units), np.float32)
    seed[0, unit] = 1.0
    back.add(output, back.constant("seed", seed))
    for node in reversed(proto.graph.node):
        back.backward(node)
    grad = back.grad_of(graph_input.name)
    if grad is None:
        raise CovidctError(f"the graph's {output} does not depend on its input")
    proto.graph.node.extend([*back.nodes, helper.make_node("Identity", [grad], [SALIENCY],
                                                           name=SALIENCY)])
    proto.graph.initializer.extend(back.constants)
    shape = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    proto.graph.output.append(helper.make_tensor_value_info(SALIENCY, TensorProto.FLOAT, shape))
    onnx.checker.check_model(proto)
    return proto

"""COVID-19Net as an ONNX graph, for ``covidct predict`` without the Keras backend.

:func:`export_onnx` writes ``model.onnx`` beside a trained ``model.keras``: the same network in
float32 with both outputs, the probability and the DL feature, and the Keras file's SHA-256 in
its metadata; and ``model.saliency.onnx``, the same graph with a third output, its input
gradient (:mod:`covidct.model.onnx_gradient`), for the saliency picture. :class:`OnnxFeatureModel`
runs either with onnxruntime, which starts in a fraction of a second where TensorFlow takes
several. Only the layers COVID-19Net is built from (both arrangements) are translated; any other
layer is refused by name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from covidct.errors import CovidctError
from covidct.io.atomic import atomic_path, file_sha256
from covidct.model.saved import FEATURE_LAYER

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8                       # the ONNX IR of opset 17
INPUT = "roi"
OUTPUTS = ("probability", FEATURE_LAYER)
DIGEST_KEY = "covidct.keras_sha256"


def onnx_path(model_path: str | Path) -> Path:
    """Where a Keras model's ONNX export lies: beside it, ``model.onnx`` for ``model.keras``."""
    return Path(model_path).with_suffix(".onnx")


def saliency_onnx_path(model_path: str | Path) -> Path:
    """Where the export with the input gradient lies: ``model.saliency.onnx`` beside
    ``model.keras`` (or beside its ``model.onnx``)."""
    return Path(model_path).with_suffix(".saliency.onnx")


# --------------------------------------------------------------------------- the graph

class _Graph:
    """ONNX nodes and weights, built layer by layer in channels-first (NCDHW) layout."""

    def __init__(self):
        self.nodes, self.weights = [], []

    def weight(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.weights.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, public: bool = False,
             **attrs) -> str:
        """Add ``op``; its output is ``keras/<output>`` (a layer's name), or ``output`` itself
        where ``public`` (the graph's outputs)."""
        from onnx import helper

        output = output if public else f"keras/{output}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _padding(layer) -> str:
    if layer.padding not in ("same", "valid"):
        raise CovidctError(f"layer {layer.name}: padding {layer.padding!r} has no ONNX export")
    return "SAME_UPPER" if layer.padding == "same" else "VALID"   # TF pads the end more


def _activation(graph: _Graph, layer, x: str, name: str) -> str:
    """The layer's activation (linear, relu or sigmoid) applied to ``x``."""
    act = getattr(layer.activation, "__name__", str(layer.activation))
    if act == "linear":
        return graph.node("Identity", [x], name)
    if act in ("relu", "sigmoid"):
        return graph.node(act.capitalize(), [x], name)
    raise CovidctError(f"layer {layer.name}: activation {act!r} has no ONNX export")


def _conv3d(graph: _Graph, layer, x: str) -> str:
    if layer.groups != 1 or layer.data_format != "channels_last":
        raise CovidctError(f"layer {layer.name}: only channels-last, ungrouped Conv3D exports")
    weights = layer.get_weights()
    kernel = weights[0].transpose(4, 3, 0, 1, 2)                   # DHWIO -> OIDHW
    inputs = [x, graph.weight(f"{layer.name}/kernel", kernel)]
    if layer.use_bias:
        inputs.append(graph.weight(f"{layer.name}/bias", weights[1]))
    y = graph.node("Conv", inputs, f"{layer.name}/conv", kernel_shape=list(layer.kernel_size),
                   strides=list(layer.strides), dilations=list(layer.dilation_rate),
                   auto_pad=_padding(layer))
    return _activation(graph, layer, y, layer.name)


def _batch_norm(graph: _Graph, layer, x: str) -> str:
    if layer.axis not in (-1, 4):
        raise CovidctError(f"layer {layer.name}: only BatchNormalization over channels exports")
    channels = int(layer.moving_mean.shape[0])
    ones, zeros = np.ones(channels), np.zeros(channels)
    gamma = layer.gamma.numpy() if layer.scale else ones
    beta = layer.beta.numpy() if layer.center else zeros
    names = [graph.weight(f"{layer.name}/{k}", v) for k, v in
             (("gamma", gamma), ("beta", beta), ("mean", layer.moving_mean.numpy()),
              ("variance", layer.moving_variance.numpy()))]
    return graph.node("BatchNormalization", [x, *names], layer.name, epsilon=float(layer.epsilon))


def _relu(graph: _Graph, layer, x: str) -> str:
    if layer.max_value is not None or float(layer.negative_slope) or float(layer.threshold):
        raise CovidctError(f"layer {layer.name}: only the plain ReLU exports")
    return graph.node("Relu", [x], layer.name)


def _pool(graph: _Graph, layer, x: str) -> str:
    op = {"MaxPooling3D": "MaxPool", "AveragePooling3D": "AveragePool"}[type(layer).__name__]
    return graph.node(op, [x], layer.name, kernel_shape=list(layer.pool_size),
                      strides=list(layer.strides), auto_pad=_padding(layer))


def _concatenate(graph: _Graph, layer, xs: list[str]) -> str:
    if layer.axis not in (-1, 4):
        raise CovidctError(f"layer {layer.name}: only concatenation over channels exports")
    return graph.node("Concat", xs, layer.name, axis=1)


def _global_average(graph: _Graph, layer, x: str) -> str:
    if layer.keepdims:
        raise CovidctError(f"layer {layer.name}: only GlobalAveragePooling3D without keepdims "
                           "exports")
    y = graph.node("GlobalAveragePool", [x], f"{layer.name}/pool")
    return graph.node("Flatten", [y], layer.name, axis=1)


def _dense(graph: _Graph, layer, x: str) -> str:
    weights = layer.get_weights()
    inputs = [x, graph.weight(f"{layer.name}/kernel", weights[0])]
    if layer.use_bias:
        inputs.append(graph.weight(f"{layer.name}/bias", weights[1]))
    y = graph.node("Gemm", inputs, f"{layer.name}/gemm")
    return _activation(graph, layer, y, layer.name)


def _identity(graph: _Graph, layer, x: str) -> str:
    return graph.node("Identity", [x], layer.name)


SINGLE_INPUT = {"Conv3D": _conv3d, "BatchNormalization": _batch_norm, "ReLU": _relu,
                "MaxPooling3D": _pool, "AveragePooling3D": _pool,
                "GlobalAveragePooling3D": _global_average, "Dense": _dense,
                "Identity": _identity, "Dropout": _identity, "SpatialDropout3D": _identity}


def _inputs_of(layer) -> list[str]:
    """The names of the tensors a layer is called on: their layers' names (one output each)."""
    node = layer._inbound_nodes[0]
    return [t._keras_history.operation.name for t in node.input_tensors]


def graph_of(model):
    """The ONNX ModelProto of a built COVID-19Net: input ``roi`` (N, D, H, W, 1), outputs
    ``probability`` (N, 1) and ``dl_feature`` (N, 64)."""
    from onnx import TensorProto, checker, helper

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise CovidctError(f"model {model.name}: one input and one output expected")
    graph = _Graph()
    names: dict[str, str] = {}
    input_layer = model.inputs[0]._keras_history.operation.name
    names[input_layer] = graph.node("Transpose", [INPUT], "roi/ncdhw", perm=[0, 4, 1, 2, 3])
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        xs = [names[n] for n in _inputs_of(layer)]
        if kind == "Concatenate":
            names[layer.name] = _concatenate(graph, layer, xs)
        elif kind == "Activation":
            names[layer.name] = _activation(graph, layer, xs[0], layer.name)
        elif kind in SINGLE_INPUT and len(xs) == 1:
            names[layer.name] = SINGLE_INPUT[kind](graph, layer, xs[0])
        else:
            raise CovidctError(f"layer {layer.name} ({kind}) has no ONNX export")
    output_layer = model.outputs[0]._keras_history.operation.name
    graph.node("Identity", [names[output_layer]], OUTPUTS[0], public=True)
    graph.node("Identity", [names[FEATURE_LAYER]], OUTPUTS[1], public=True)
    shape = ["N", *[int(s) for s in model.inputs[0].shape[1:]]]
    feature_dim = int(model.get_layer(FEATURE_LAYER).output.shape[-1])
    proto = helper.make_model(
        helper.make_graph(
            graph.nodes, model.name,
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT, ["N", 1]),
             helper.make_tensor_value_info(OUTPUTS[1], TensorProto.FLOAT, ["N", feature_dim])],
            initializer=graph.weights),
        opset_imports=[helper.make_opsetid("", OPSET)], producer_name="covidct")
    proto.ir_version = IR_VERSION
    checker.check_model(proto)
    return proto


def export_onnx(model_path: str | Path, out: str | Path | None = None) -> Path:
    """``model.onnx`` beside ``model_path`` (or at ``out``): the Keras model's ONNX export, with
    the Keras file's SHA-256 in its metadata; and :func:`saliency_onnx_path` of it, the export
    with its input gradient. Returns the export's path."""
    import onnx

    from covidct.model.onnx_gradient import with_saliency
    from covidct.model.saved import load_feature_model

    model_path = Path(model_path)
    out = onnx_path(model_path) if out is None else Path(out)
    _, model = load_feature_model(model_path)
    proto = graph_of(model)
    onnx.helper.set_model_props(proto, {DIGEST_KEY: file_sha256(model_path)})
    with_gradient = with_saliency(proto)
    with atomic_path(saliency_onnx_path(out)) as tmp:
        onnx.save(with_gradient, str(tmp))
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    log.info("ONNX export of %s -> %s (%d nodes; with the input gradient %d, %s)",
             model_path.name, out, len(proto.graph.node), len(with_gradient.graph.node),
             saliency_onnx_path(out).name)
    return out


# --------------------------------------------------------------------------- running it

class OnnxFeatureModel:
    """An exported COVID-19Net in onnxruntime: ``model(roi)`` -> (probability, dl_feature); for
    a graph with the input gradient (``model.saliency.onnx``, or one built in memory), also
    :meth:`with_saliency`. ``graph`` (serialised) is run instead of the file at ``path``, which
    then only names it."""

    def __init__(self, path: str | Path, threads: int = 0, graph: bytes | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)        # 0: onnxruntime's own choice
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path) if graph is None else graph, options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:       # onnxruntime raises its own kinds for a bad file
            raise CovidctError(f"cannot load the ONNX model: {err}", path=path) from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map

    @classmethod
    def of_keras(cls, model, threads: int = 0, saliency: bool = False,
                 name: str | Path = "model.keras") -> OnnxFeatureModel:
        """A built COVID-19Net translated in memory (:func:`graph_of`), with its input gradient
        where ``saliency``; refused by name like the export for a layer without translation."""
        from covidct.model.onnx_gradient import with_saliency

        proto = graph_of(model)
        if saliency:
            proto = with_saliency(proto)
        return cls(name, threads, graph=proto.SerializeToString())

    @property
    def saliency(self) -> bool:
        """Whether the graph gives the input gradient (:meth:`with_saliency`)."""
        from covidct.model.onnx_gradient import SALIENCY

        return any(o.name == SALIENCY for o in self.session.get_outputs())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(D, H, W) of the graph's input (N, D, H, W, 1)."""
        return tuple(int(s) for s in self.session.get_inputs()[0].shape[1:4])

    def exports(self, model_path: str | Path) -> bool:
        """Whether this is the export of exactly that Keras file (by content hash)."""
        return self.metadata.get(DIGEST_KEY) == file_sha256(model_path)

    def __call__(self, roi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probability (N, 1), dl_feature (N, 64)) of a batch of ROIs (N, D, H, W, 1)."""
        prob, feature = self.session.run(list(OUTPUTS),
                                         {INPUT: np.ascontiguousarray(roi, np.float32)})
        return prob, feature

    def with_saliency(self, roi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probability (1, 1), dl_feature (1, 64), saliency (D, H, W)) of one ROI (D, H, W):
        the saliency is ``d probability / d roi`` (see :mod:`covidct.model.onnx_gradient`)."""
        from covidct.model.onnx_gradient import SALIENCY

        if not self.saliency:
            raise ValueError(f"{self.path.name} has no input gradient (its saliency graph)")
        roi = np.asarray(roi, np.float32)
        prob, feature, grad = self.session.run(
            [*OUTPUTS, SALIENCY], {INPUT: np.ascontiguousarray(roi[None, ..., None])})
        return prob, feature, grad.reshape(roi.shape)


def _saliency_graph(path: Path) -> bytes:
    """The export at ``path`` with its input gradient added, serialised for onnxruntime (the
    ``onnx`` package this needs takes about a second to import)."""
    import onnx

    from covidct.model.onnx_gradient import with_saliency

    try:
        proto = onnx.load(str(path))
    except Exception as err:       # onnx raises its own kinds for a bad file
        raise CovidctError(f"cannot load the ONNX model: {err}", path=path) from None
    return with_saliency(proto).SerializeToString()


def onnx_beside(model_path: str | Path, threads: int = 0,
                saliency: bool = False) -> OnnxFeatureModel | None:
    """The ONNX export of ``model_path`` when one lies beside it, is its export and onnxruntime
    is installed; None otherwise (with the reason logged). With ``saliency``, the export with
    its input gradient: ``model.saliency.onnx``, else the gradient added to ``model.onnx`` in
    memory (an export older than the saliency graph)."""
    path = onnx_path(model_path)
    if not path.is_file():
        log.info("no %s beside the model: running it in Keras", path.name)
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.info("onnxruntime is not installed: running the model in Keras")
        return None
    if saliency:
        exported = saliency_onnx_path(model_path)
        if exported.is_file():
            model = OnnxFeatureModel(exported, threads)
            if model.exports(model_path) and model.saliency:
                return model
            log.warning("%s is not the export of %s with its input gradient: adding the "
                        "gradient to %s", exported, Path(model_path).name, path.name)
        else:
            log.info("no %s beside the model: adding the input gradient to %s", exported.name,
                     path.name)
    model = OnnxFeatureModel(path, threads, graph=_saliency_graph(path) if saliency else None)
    if not model.exports(model_path):
        log.warning("%s is not the export of %s (content hash differs): running the Keras model",
                    path, Path(model_path).name)
        return None
    return model

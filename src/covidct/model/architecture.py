"""COVID-19Net (Wang et al. 2020, supplementary Table S1): a DenseNet-like 3-D classifier.

Input: one lung ROI (D, H, W, 1), 48 x 240 x 360 at paper scale. A stem, four dense blocks with
transitions and pooling, a 1x1x1 convolution to 64 channels whose global average is the DL
feature ``dl_feature``, and a sigmoid output. Only ``keras.layers`` are used, so the model runs
on TensorFlow and JAX alike. Two arrangements of the same stages (``architecture``):

- ``authors``: as the authors' myDense.py builds it: pre-activation (BatchNorm, ReLU, then the
  convolution) in the dense pairs and transitions, no BatchNorm/ReLU after the stem's second
  convolution, BatchNorm+ReLU after the third block's pooling, the transition to 64 channels
  after the fourth block's pooling; their layer names (``block0_conv1``, ``block_11_0_1_conv``,
  ..., ``EGFR_global_pred``), so their Keras 2 weights load (:mod:`covidct.model.authors`).
- ``covidct``: post-activation Conv-BN-ReLU throughout; layers ``stem``, ``block{1..4}_out``,
  ``block{1..4}_pool``, ``head_conv``, ``probability``.

The README lists the stage shapes and the parameter counts of both.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from covidct.params import TrainParams

PAPER_INPUT_SHAPE = (48, 240, 360)
BN_EPSILON = 1.001e-5
BN_MOMENTUM = TrainParams.bn_momentum

# (growth rate, number of conv pairs, 1x1 transition channels or None, pool size)
BLOCKS = (
    (16, 2, 16, (2, 2, 2)),
    (24, 3, 24, (2, 2, 2)),
    (32, 4, None, (2, 2, 2)),
    (32, 2, None, (1, 2, 2)),
)
FEATURE_DIM = 64


def conv_bn_relu(x, filters: int, kernel_size: int, name: str, strides=(1, 1, 1),
                 bn_momentum: float = BN_MOMENTUM):
    """Conv3D (no bias, 'same' padding) -> BatchNorm -> ReLU; the layers share ``name``."""
    x = layers.Conv3D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=bn_momentum,
                                  name=f"{name}_bn")(x)
    return layers.ReLU(name=name)(x)


def dense_block(x, growth: int, pairs: int, name: str, bn_momentum: float = BN_MOMENTUM):
    """``pairs`` pairs of 3x3x3 convs; each pair's output is concatenated to the running input."""
    for p in range(1, pairs + 1):
        y = conv_bn_relu(x, growth, 3, name=f"{name}_pair{p}_a", bn_momentum=bn_momentum)
        y = conv_bn_relu(y, growth, 3, name=f"{name}_pair{p}_b", bn_momentum=bn_momentum)
        x = layers.Concatenate(axis=-1, name=f"{name}_pair{p}_concat")([x, y])
    return x


def roi_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """(D, H, W) from ``input_shape`` (a trailing channel 1 is allowed); ValueError otherwise."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[-1] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (D, H, W), got {tuple(input_shape)}")
    return shape


def covid19net(input_shape: Sequence[int] = PAPER_INPUT_SHAPE, name: str = "covid19net",
               bn_momentum: float = BN_MOMENTUM,
               architecture: str = TrainParams.architecture) -> keras.Model:
    """Build COVID-19Net for ROIs of ``input_shape`` = (D, H, W) (a trailing channel 1 is allowed).

    ``architecture`` is ``authors`` (their myDense.py) or ``covidct`` (post-activation), see the
    module docstring. ``bn_momentum`` is the BatchNorm moving-average momentum (not a parameter
    of the paper; Keras's 0.99 is the authors'). The output layer is float32 even under a
    mixed-precision policy, so probabilities and the loss stay accurate in bf16/fp16 training.
    """
    builders = {"covidct": _covidct_layers, "authors": _authors_layers}
    if architecture not in builders:
        raise ValueError(f"unknown architecture {architecture!r} (one of {', '.join(builders)})")
    inputs = keras.Input(shape=roi_shape(input_shape) + (1,), name="roi")
    outputs = builders[architecture](inputs, float(bn_momentum))
    return keras.Model(inputs, outputs, name=name)


def _covidct_layers(inputs, bn_momentum: float):
    """The post-activation arrangement: the probability tensor of ``inputs``."""
    bn = {"bn_momentum": bn_momentum}
    x = conv_bn_relu(inputs, 16, 3, strides=(1, 2, 2), name="stem_1", **bn)
    x = conv_bn_relu(x, 16, 3, name="stem", **bn)
    for b, (growth, pairs, transition, pool) in enumerate(BLOCKS, start=1):
        x = dense_block(x, growth, pairs, name=f"block{b}", **bn)
        if transition:
            x = conv_bn_relu(x, transition, 1, name=f"block{b}_out", **bn)
        else:
            x = layers.Identity(name=f"block{b}_out")(x)
        x = layers.MaxPooling3D(pool_size=pool, strides=pool, padding="same",
                                name=f"block{b}_pool")(x)
    x = layers.Conv3D(FEATURE_DIM, 1, padding="same", use_bias=False, activation=None,
                      kernel_initializer="glorot_uniform", name="head_conv")(x)
    feature = layers.GlobalAveragePooling3D(name="dl_feature")(x)
    return layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(feature)


# --------------------------------------------------------------------------- the authors'

def bn_relu(x, bn_name: str, relu_name: str, bn_momentum: float):
    """BatchNorm -> ReLU (the authors' pre-activation), with their two layer names."""
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=bn_momentum, name=bn_name)(x)
    return layers.Activation("relu", name=relu_name)(x)


def plain_conv(x, filters: int, kernel_size: int, name: str, strides=(1, 1, 1)):
    """Conv3D with no bias and 'same' padding, Keras's default initialiser (the authors')."""
    return layers.Conv3D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                         name=name)(x)


def preactivation_pair(x, filters: int, name: str, bn_momentum: float):
    """BN, ReLU, Conv k3, BN, ReLU, Conv k3, concatenated to the input (their _conv_block)."""
    y = bn_relu(x, f"{name}_0_bn", f"{name}_0_relu", bn_momentum)
    y = plain_conv(y, filters, 3, f"{name}_1_conv")
    y = bn_relu(y, f"{name}_1_bn", f"{name}_1_relu", bn_momentum)
    y = plain_conv(y, filters, 3, f"{name}_2_conv")
    return layers.Concatenate(axis=-1, name=f"{name}_concat")([x, y])


def preactivation_block(x, filters: int, pairs: int, name: str, bn_momentum: float):
    """``pairs`` pre-activation pairs named ``{name}_0``, ``{name}_1``, ... (their _denseBlock)."""
    for i in range(pairs):
        x = preactivation_pair(x, filters, f"{name}_{i}", bn_momentum)
    return x


def preactivation_transition(x, filters: int, name: str, bn_momentum: float):
    """BN, ReLU, Conv k1 (their _transit_block)."""
    x = bn_relu(x, f"{name}_trans_bn", f"{name}_trans_relu", bn_momentum)
    return plain_conv(x, filters, 1, f"{name}_trans_conv")


def max_pool(x, pool, index: int):
    """MaxPooling3D named as Keras 2 named the authors' unnamed pooling layers."""
    return layers.MaxPooling3D(pool, strides=pool, padding="same",
                               name="max_pooling3d" + (f"_{index}" if index else ""))(x)


def _authors_layers(inputs, bn_momentum: float):
    """The authors' arrangement (myDense.py, myDenseNetv2): the probability tensor."""
    x = plain_conv(inputs, 16, 3, "block0_conv1", strides=(1, 2, 2))
    x = bn_relu(x, "block0_bn1", "block0_relu1", bn_momentum)
    x = plain_conv(x, 16, 3, "block0_conv2")
    x = preactivation_block(x, 16, 2, "block_11", bn_momentum)
    x = preactivation_transition(x, 16, "block13", bn_momentum)
    x = max_pool(x, (2, 2, 2), 0)
    x = preactivation_block(x, 24, 3, "block_21", bn_momentum)
    x = preactivation_transition(x, 24, "block23", bn_momentum)
    x = max_pool(x, (2, 2, 2), 1)
    x = preactivation_block(x, 32, 4, "block_31", bn_momentum)
    x = max_pool(x, (2, 2, 2), 2)
    x = bn_relu(x, "block_final_bn", "block_final_relu", bn_momentum)
    x = preactivation_block(x, 32, 2, "EGFR_block_11", bn_momentum)
    x = max_pool(x, (1, 2, 2), 3)
    x = preactivation_transition(x, FEATURE_DIM, "EGFR_block_12", bn_momentum)
    # their global_average_pooling3d (weightless): named as covidct looks the DL feature up
    feature = layers.GlobalAveragePooling3D(name="dl_feature")(x)
    return layers.Dense(1, activation="sigmoid", dtype="float32", name="EGFR_global_pred")(feature)


def architecture_of(model: keras.Model) -> str:
    """``authors`` or ``covidct``: which arrangement a built or loaded COVID-19Net has."""
    names = {layer.name for layer in model.layers}
    if "block0_conv1" in names:
        return "authors"
    if "stem_conv" in names:
        return "covidct"
    raise ValueError(f"model {model.name!r} is neither arrangement of COVID-19Net")


def feature_model(model: keras.Model) -> keras.Model:
    """A model over the same weights returning (probability (B, 1), dl_feature (B, 64))."""
    feature = model.get_layer("dl_feature").output
    return keras.Model(model.inputs, [model.outputs[0], feature], name=f"{model.name}_features")

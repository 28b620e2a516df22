"""COVID-19Net (Wang et al. 2020, supplementary Table S1): a DenseNet-like 3-D classifier.

Input: one lung ROI (D, H, W, 1), 48 x 240 x 360 at paper scale. A stem, four dense blocks with
transitions and pooling, a 1x1x1 convolution to 64 channels whose global average is the DL
feature ``dl_feature``, and a sigmoid ``probability``. Only ``keras.layers`` are used, so the
model runs on TensorFlow and JAX alike. The README lists the stage shapes and the parameter
count; layers looked up by name: ``stem``, ``block{1..4}_out``, ``block{1..4}_pool``,
``head_conv``, ``dl_feature``, ``probability``.
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


def covid19net(input_shape: Sequence[int] = PAPER_INPUT_SHAPE, name: str = "covid19net",
               bn_momentum: float = BN_MOMENTUM) -> keras.Model:
    """Build COVID-19Net for ROIs of ``input_shape`` = (D, H, W) (a trailing channel 1 is allowed).

    ``bn_momentum`` is the BatchNorm moving-average momentum (not a parameter of the paper).
    The output layer is float32 even under a mixed-precision policy, so probabilities and the
    loss stay accurate in bf16/fp16 training.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[-1] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (D, H, W), got {tuple(input_shape)}")
    inputs = keras.Input(shape=shape + (1,), name="roi")
    bn = {"bn_momentum": float(bn_momentum)}
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
    prob = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(feature)
    return keras.Model(inputs, prob, name=name)


def feature_model(model: keras.Model) -> keras.Model:
    """A model over the same weights returning (probability (B, 1), dl_feature (B, 64))."""
    feature = model.get_layer("dl_feature").output
    return keras.Model(model.inputs, [model.outputs[0], feature], name=f"{model.name}_features")

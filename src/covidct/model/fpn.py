"""The DenseNet121-FPN lung segmenter network (Keras 3, ``keras.layers`` only).

``keras.applications.DenseNet121(include_top=False)`` gives the pyramid at strides 4, 8, 16 and 32;
the decoder (lateral 1x1 convolutions, top-down nearest upsampling and addition, two 3x3
conv-BN-ReLU per level merged at stride 4) ends in a float32 sigmoid ``lung_probability``.
"""

from __future__ import annotations

from pathlib import Path

from covidct.errors import CovidctError

STEP = "train-segmenter"
PAPER_SIZE = 256
ENCODER_NAME = "densenet121"
# DenseNet121 layers giving the pyramid: strides 4, 8, 16, 32.
ENCODER_LEVELS = ("conv2_block6_concat", "conv3_block12_concat", "conv4_block24_concat", "relu")
OUTPUT_NAME = "lung_probability"


def build_fpn(size: int = PAPER_SIZE, *, encoder_weights: str | Path | None = None,
              pyramid_filters: int = 256, segmentation_filters: int = 128,
              bn_momentum: float = 0.9, name: str = "lung_fpn"):
    """DenseNet121-FPN: input (size, size, 3), output (size, size, 1) sigmoid probability.

    ``encoder_weights``: None (random init) or a local Keras weights file of
    ``DenseNet121(include_top=False)`` (e.g. the ImageNet "notop" .h5); never downloaded.
    ``bn_momentum``: of every BatchNormalization (Keras' 0.99 needs hundreds of steps before
    the moving statistics used at inference match the batches; short CPU runs need less).
    """
    import keras
    from keras import layers

    size = int(size)
    if size < 32 or size % 32:
        raise CovidctError(f"the FPN input size must be a multiple of 32 (got {size})", step=STEP)
    weights = None
    if encoder_weights:
        weights = str(encoder_weights)
        if not Path(weights).is_file():
            raise CovidctError("DenseNet121 weights file not found (weights are never "
                               "downloaded)", step=STEP, path=weights)
    try:
        base = keras.applications.DenseNet121(include_top=False, weights=weights,
                                              input_shape=(size, size, 3))
    except (ValueError, OSError) as err:
        raise CovidctError(f"cannot load DenseNet121 weights ({err})", step=STEP,
                           path=weights) from err
    encoder = keras.Model(base.input, [base.get_layer(n).output for n in ENCODER_LEVELS],
                          name=ENCODER_NAME)

    inputs = keras.Input((size, size, 3), name="slices")
    c2, c3, c4, c5 = encoder(inputs)

    def conv_bn_relu(x, filters, name):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.Activation("relu", name=f"{name}_relu")(x)

    # top-down pathway with lateral connections
    p5 = layers.Conv2D(pyramid_filters, 1, name="fpn_lateral5")(c5)
    pyramid = {5: p5}
    for level, c in ((4, c4), (3, c3), (2, c2)):
        up = layers.UpSampling2D(2, interpolation="nearest", name=f"fpn_up{level + 1}")(
            pyramid[level + 1])
        lateral = layers.Conv2D(pyramid_filters, 1, name=f"fpn_lateral{level}")(c)
        pyramid[level] = layers.Add(name=f"fpn_add{level}")([up, lateral])
    # per-level segmentation blocks, all brought to stride 4 and merged
    heads = []
    for level in (5, 4, 3, 2):
        x = conv_bn_relu(pyramid[level], segmentation_filters, f"seg{level}a")
        x = conv_bn_relu(x, segmentation_filters, f"seg{level}b")
        factor = 2 ** (level - 2)
        if factor > 1:
            x = layers.UpSampling2D(factor, interpolation="bilinear", name=f"seg{level}_up")(x)
        heads.append(x)
    x = layers.Concatenate(name="fpn_merge")(heads)
    x = conv_bn_relu(x, segmentation_filters, "head")
    x = layers.Conv2D(1, 3, padding="same", name="head_logits")(x)
    x = layers.UpSampling2D(4, interpolation="bilinear", name="head_up")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs, name=name)
    for layer in _all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(bn_momentum)
    return model


def _all_layers(model) -> list:
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(_all_layers(layer))
    return found


def dice_bce_loss(y_true, y_pred, smooth: float = 1.0):
    """Binary cross-entropy + (1 - soft Dice over the batch); keras.ops only."""
    from keras import ops

    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    eps = 1e-6
    p = ops.clip(y_pred, eps, 1.0 - eps)
    bce = -ops.mean(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
    inter = ops.sum(y_true * y_pred)
    dice = (2.0 * inter + smooth) / (ops.sum(y_true) + ops.sum(y_pred) + smooth)
    return bce + (1.0 - dice)

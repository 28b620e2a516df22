"""Filter patterns: activation maximisation from white noise (supplementary S7, Figure 5a-d)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covidct.explain.saliency import compiled_input_gradient, input_dtype


def conv_layers(model) -> list[str]:
    """Names of the model's 3-D convolution layers, input to output."""
    return [layer.name for layer in model.layers
            if layer.__class__.__name__ in ("Conv3D", "Conv3DTranspose")]


def default_layers(model, n: int = 4) -> list[str]:
    """``n`` convolution layers spread evenly from the first to the last."""
    convs = conv_layers(model)
    if not convs:
        return []
    picks = np.unique(np.round(np.linspace(0, len(convs) - 1, min(n, len(convs)))).astype(int))
    return [convs[i] for i in picks]


def filter_patterns(model, layer_name: str, filters: Sequence[int], *, steps: int = 40,
                    step_size: float = 0.1, seed: int = 0, noise_sd: float = 0.1,
                    input_shape: Sequence[int] | None = None, clip: float = 4.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activation maximisation from white noise for ``filters`` of one layer.

    Gradient ascent on the mean activation of each filter (one batch member per filter),
    with steps normalised to an RMS of ``step_size`` and values clipped to +-``clip`` (the range
    of a z-scored ROI); a step that does not raise a filter's activation is rejected and that
    filter's step halved, so the activation never decreases. Returns ``(patterns (F, D, H, W),
    initial activation (F,),
    final activation (F,))``; the activations are the filter's mean response to the noise and
    to the final pattern.
    """
    import keras

    layer = model.get_layer(layer_name)
    sub = keras.Model(model.inputs[0], layer.output)
    shape = tuple(model.inputs[0].shape)[1:4]
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
    if any(s is None for s in shape):
        raise ValueError(f"the model input {shape} has free dimensions: give input_shape")
    dtype = input_dtype(model)
    if tuple(model.inputs[0].shape)[1:4] != shape:
        # a fully convolutional path up to the layer runs on any size: rebuild it on a new input
        # and copy the weights (a Keras functional model checks its input shape)
        clone = keras.models.clone_model(
            sub, input_tensors=keras.Input(shape=shape + (1,), dtype=dtype))
        clone.set_weights(sub.get_weights())
        sub = clone
    channels = int(layer.output.shape[-1])
    filters = [int(f) for f in filters]
    if any(not 0 <= f < channels for f in filters):
        raise ValueError(f"layer {layer_name} has {channels} filters; asked for {filters}")
    rng = np.random.default_rng(seed)
    x = (rng.normal(0.0, noise_sd, (len(filters),) + shape + (1,))).astype(dtype)
    onehot = np.zeros((len(filters), channels), dtype=dtype)
    onehot[np.arange(len(filters)), filters] = 1.0

    def per_filter(t):
        act = sub(t, training=False)
        act = keras.ops.reshape(act, (keras.ops.shape(act)[0], -1, channels))
        return keras.ops.sum(keras.ops.mean(act, axis=1) * onehot, axis=1)  # (F,)

    def objective(t):
        return keras.ops.sum(per_filter(t))

    def activations(v) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(per_filter(v)), float)

    gradient = compiled_input_gradient(objective)     # 40 steps on one shape: compile once
    start = activations(x)
    current = start.copy()
    lr = np.full(len(filters), float(step_size))
    expand = (-1,) + (1,) * (x.ndim - 1)
    for _ in range(int(steps)):
        g = gradient(x)
        rms = np.sqrt(np.mean(g.reshape(len(filters), -1) ** 2, axis=1)) + 1e-12
        trial = np.clip(x + (lr / rms).reshape(expand) * g, -clip, clip).astype(dtype)
        new = activations(trial)
        # keep a step only where it raised that filter's activation; otherwise halve its step
        # (ReLU/BatchNorm kinks make long steps overshoot), so the ascent never goes down
        up = new > current
        x[up] = trial[up]
        current[up] = new[up]
        lr = np.where(up, np.minimum(lr * 1.2, step_size), lr * 0.5)
    return x[..., 0], start, current

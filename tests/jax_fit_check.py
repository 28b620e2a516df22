"""Run by tests/test_jax_loop.py in a fresh process with KERAS_BACKEND=jax: COVID-19Net trained
on the ROI stores listed in ROIS_JSON by ``model.fit`` and by the compiled JAX loop, from the
same seed, with class weights and a learning-rate schedule; prints both runs' weights'
largest difference, their epoch logs and learning rates as one JSON line."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np

from covidct.model.architecture import covid19net
from covidct.model.dataset import RoiDataset
from covidct.model.jax_loop import JaxLoop

SHAPE = (16, 32, 48)


def model(steps: int):
    keras.utils.set_random_seed(3)
    m = covid19net(SHAPE, bn_momentum=0.8)
    m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.001, momentum=0.9),
              loss=keras.losses.BinaryCrossentropy(), metrics=[keras.metrics.AUC(name="auc")],
              steps_per_execution=steps)
    return m


def callbacks(record: list):
    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            record.append({**{k: float(v) for k, v in logs.items()}, "lr": lr})

    # min_delta larger than any gain: the rate falls after every epoch but the first
    schedule = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0,
                                                 min_delta=100.0)
    return [schedule, Record()]


def main(rois_json: str, epochs: int, steps: int) -> None:
    rois = json.loads(open(rois_json, encoding="utf-8").read())
    labels = np.arange(len(rois)) % 2

    def data():
        return RoiDataset(rois, labels, batch_size=4, shuffle=True, seed=3, workers=2,
                          class_weight={0: 5.0, 1: 1.0})

    runs = {}
    for loop in ("fit", "jax"):
        m, record = model(steps), []
        if loop == "fit":
            m.fit(data(), epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks(record))
        else:
            JaxLoop(m, steps).fit(data(), epochs=epochs, callbacks=callbacks(record))
        runs[loop] = (m.get_weights(), record)
    (wa, ra), (wb, rb) = runs["fit"], runs["jax"]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(wa, wb))
    scale = max(float(np.max(np.abs(a))) for a in wa)
    print(json.dumps({"max_weight_difference": diff, "max_weight": scale, "fit": ra,
                      "jax": rb}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

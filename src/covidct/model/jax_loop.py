"""A compiled JAX training loop for a compiled Keras model (the JAX backend only).

Keras's ``fit`` on JAX compiles one training step and calls it once per batch from Python, even
with ``steps_per_execution``. This loop compiles ``steps`` training steps into one call (a block
of batches of one shape), donates the model's state to that call, reads the next block in a
thread and sends it to the device while the device computes, and brings the state back to the
host only at the end of an epoch, when the variables go back into the model and the callbacks
run (validation, the learning-rate schedule, checkpoints). The step is the model's own
stateless ``train_step``, so the arithmetic, the class weights and the metrics are ``fit``'s;
the batches come in ``fit``'s order.

Over several devices (``keras.distribution.DataParallel``) every batch is split along its first
axis; a batch the devices cannot split evenly (the last, short one) runs whole on each device.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

State = tuple[list, list, list, list]


def model_state(model) -> State:
    """The model's trainable, non-trainable, optimizer and metrics variables, as arrays
    committed to their devices (as the compiled call returns them: one compilation serves
    every epoch)."""
    import jax

    return tuple([jax.device_put(v.value, v.value.sharding) for v in group]
                 for group in variable_groups(model))


def variable_groups(model) -> tuple:
    return (model.trainable_variables, model.non_trainable_variables,
            model.optimizer.variables, model.metrics_variables)


def put_back(model, state: State) -> None:
    """Assign ``state`` to the model's variables."""
    for group, values in zip(variable_groups(model), state):
        for variable, value in zip(group, values):
            variable.assign(value)


def compiled_steps(model, state: State):
    """``run(state, batches) -> state``: one compiled call that trains on every batch of the
    tuple ``batches`` in turn, the state donated. The steps are unrolled: on XLA's CPU a
    ``lax.scan`` over them ran at half the speed of single steps."""
    import jax

    def run(state, batches):
        for batch in batches:
            _, state = model.train_step(state, batch)
        return state

    shardings = jax.tree.map(lambda a: a.sharding, state)
    return jax.jit(run, donate_argnums=0, out_shardings=shardings)


def batch_sharding(distribution, batch: int):
    """Where a batch goes: split along its first axis over the devices of ``distribution``,
    whole on every device where it does not split evenly, or None (no distribution: the
    default device)."""
    if distribution is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = distribution.device_mesh.backend_mesh
    name = distribution.batch_dim_name
    split = batch % mesh.shape[name] == 0
    return NamedSharding(mesh, PartitionSpec(name) if split else PartitionSpec())


def read_ahead(data, ahead: int) -> Iterator[tuple]:
    """The batches of ``data`` in order, read in a background thread up to ``ahead`` batches in
    advance (the dataset reads the volumes of a batch in its own threads)."""
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = collections.deque()
        indices = iter(range(len(data)))
        for index in indices:
            pending.append(pool.submit(data.__getitem__, index))
            if len(pending) >= ahead:
                break
        while pending:
            batch = pending.popleft().result()
            index = next(indices, None)
            if index is not None:
                pending.append(pool.submit(data.__getitem__, index))
            yield batch


def blocks(batches: Iterator[tuple], steps: int) -> Iterator[list[tuple]]:
    """Consecutive batches grouped by shape into blocks of ``steps`` (fewer at the end of a
    run of one shape)."""
    block: list[tuple] = []
    for batch in batches:
        if block and (len(block) == steps or shape_of(batch) != shape_of(block[0])):
            yield block
            block = []
        block.append(batch)
    if block:
        yield block


def shape_of(batch: Sequence) -> tuple:
    return tuple(part.shape for part in batch)


def to_device(batch: Sequence, distribution) -> tuple:
    """The batch's arrays sent to the device(s) (asynchronously)."""
    import jax

    sharding = batch_sharding(distribution, len(batch[0]))
    return tuple(jax.device_put(part, sharding) for part in batch)


class JaxLoop:
    """Trains a compiled Keras model on a ``keras.utils.PyDataset``, ``steps`` batches per
    compiled call; :meth:`fit` takes ``model.fit``'s epochs, initial epoch and callbacks."""

    def __init__(self, model, steps: int = 4):
        import keras

        if keras.backend.backend() != "jax":
            raise RuntimeError("the JAX training loop needs KERAS_BACKEND=jax")
        self.model = model
        self.steps = max(1, int(steps))
        self.distribution = keras.distribution.distribution()
        self._compiled: dict = {}

    def _run(self, state: State, block: list[tuple]) -> State:
        key = (len(block), shape_of(block[0]))
        if key not in self._compiled:
            self._compiled[key] = compiled_steps(self.model, state)
            log.debug("compiling %d steps on batches of %s", *key)
        return self._compiled[key](state, tuple(block))

    def epoch(self, data) -> dict[str, float]:
        """One pass over ``data``; returns the epoch's training metrics (``fit``'s logs)."""
        import keras

        model = self.model
        model.reset_metrics()
        state = model_state(model)
        data.on_epoch_begin()
        batches = read_ahead(data, ahead=self.steps + 1)
        for block in blocks((to_device(b, self.distribution) for b in batches), self.steps):
            state = self._run(state, block)
        data.on_epoch_end()
        put_back(model, state)
        return {k: float(keras.ops.convert_to_numpy(v))
                for k, v in model.get_metrics_result().items()}

    def fit(self, data, *, epochs: int, initial_epoch: int = 0, callbacks: Sequence = ()):
        """Train from ``initial_epoch`` to ``epochs`` with Keras callbacks, as ``model.fit``."""
        import keras

        model = self.model
        first = data[0]
        model._symbolic_build(data_batch=first)     # optimizer and metric variables, as fit
        data.on_epoch_end()                          # fit's reset: its first epoch's order
        hooks = keras.callbacks.CallbackList(list(callbacks), model=model, epochs=epochs,
                                             steps=len(data))
        model.stop_training = False
        hooks.on_train_begin()
        logs: dict[str, float] = {}
        for epoch in range(initial_epoch, epochs):
            hooks.on_epoch_begin(epoch)
            logs = self.epoch(data)
            hooks.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
        model.optimizer.finalize_variable_values(model.trainable_weights)
        hooks.on_train_end(logs)

"""Larq reference: training throughput of larq-zoo's Bi-Real-18 on the digits data set.

What it measures
----------------
Trains ``larq_zoo.literature.BiRealNet(input_shape=(32, 32, 3), weights=None,
num_classes=10)`` -- larq-zoo's own Bi-Real Net 18 with its ImageNet stem
(7x7/2 conv, BN, 3x3/2 max-pool), approx_sign activations, magnitude-aware-sign
weights and weight_clip, ending in Dense + softmax -- on scikit-learn's bundled
digits data (1347 train / 450 test images, 8x8 upsampled to 32x32, gray
replicated to 3 channels, normalised with the train split's per-channel
mean/std). Batch 64 (the last batch of each epoch has 3 images), Adam lr 1e-3,
sparse categorical cross-entropy with ``from_logits=False`` (the model outputs
softmax probabilities), ``model.fit`` with the TensorFlow thread pools set to
``--threads``.

It reports, as one JSON object on stdout:

* ``images_per_s_epochs``: training images per second for every epoch
  (1347 / wall time of the epoch's training steps, taken by a Keras callback
  from ``on_epoch_begin`` to ``on_epoch_end``; no validation inside ``fit``);
* ``images_per_s_median``: the median over epochs 2..N -- epoch 1 is left out
  because it includes tracing and compiling the ``tf.function`` train step;
* ``first_epoch_s``: the wall time of epoch 1 (tracing included);
* ``test_accuracy``: accuracy on the 450 test images after the last epoch;
* ``loadavg_1min_before_after``: the 1-minute load average around training.
  This run itself adds about ``--threads``; a value well above that means other
  processes shared the cores and the timings are low: rerun on an idle machine.

The data come from ``toolkit.data.load_dataset`` of this repository when that
module exists (numpy only, no torch), otherwise from the same recipe inlined
here; the JSON's ``data_source`` says which.

Setting up the venv (outside the repository; Python 3.11, CPU only)
-------------------------------------------------------------------
TensorFlow 2.15 is the last release that ships Keras 2 as ``tf.keras``, which
larq / larq-zoo need; larq-zoo also pins ``protobuf<3.21``, which newer TF
releases do not accept::

    python3 -m venv path/to/venv
    path/to/venv/bin/pip install "tensorflow-cpu==2.15.1" "larq==0.14.0" \\
        "larq-zoo==2.4.0" scikit-learn

(resolved there with keras 2.15.0, numpy 1.26.4, protobuf 3.20.3,
scikit-learn 1.9.1, zookeeper 1.4.0).

Running it
----------
::

    path/to/venv/bin/python benchmarks/larq_bireal.py --epochs 8 --threads 2

TensorFlow's log lines go to stderr; stdout carries only the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
LR = 1e-3
SEED = 0


def _digits_inline():
    """The project's digits recipe, for when toolkit/data.py is not there."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    y = d.target.astype(np.int64)
    x = np.repeat(np.repeat(x, 4, axis=-2), 4, axis=-1)  # (N, 32, 32)
    x = np.repeat(x[:, None, :, :], 3, axis=1)  # (N, 3, 32, 32)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    idx_tr, idx_te = np.sort(idx_tr), np.sort(idx_te)  # as toolkit.data orders them
    x_tr, y_tr, x_te, y_te = x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]
    mean = x_tr.astype(np.float64).mean(axis=(0, 2, 3), keepdims=True)
    std = x_tr.astype(np.float64).std(axis=(0, 2, 3), keepdims=True)
    x_tr = ((x_tr - mean) / std).astype(np.float32)
    x_te = ((x_te - mean) / std).astype(np.float32)
    return (x_tr, y_tr), (x_te, y_te)


def load_digits_nhwc():
    """Returns ((x_train, y_train), (x_test, y_test), source), x in NHWC float32."""
    source = "inline"
    data = None
    if (REPO_ROOT / "toolkit" / "data.py").exists():
        sys.path.insert(0, str(REPO_ROOT))
        try:
            from toolkit.data import load_dataset  # numpy only

            tr = load_dataset("digits", "train", channels=3)
            te = load_dataset("digits", "test", channels=3)
            data = (
                (np.asarray(tr.x, np.float32), np.asarray(tr.y, np.int64)),
                (np.asarray(te.x, np.float32), np.asarray(te.y, np.int64)),
            )
            source = "toolkit.data.load_dataset"
        except Exception as exc:  # fall back to the inlined recipe
            print(f"toolkit.data unusable ({exc!r}); using inline recipe", file=sys.stderr)
    if data is None:
        data = _digits_inline()
    (x_tr, y_tr), (x_te, y_te) = data
    x_tr = np.ascontiguousarray(x_tr.transpose(0, 2, 3, 1))
    x_te = np.ascontiguousarray(x_te.transpose(0, 2, 3, 1))
    return (x_tr, y_tr), (x_te, y_te), source


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be at least 2 (epoch 1 is excluded from the median)")

    import tensorflow as tf

    # Must happen before TensorFlow creates its thread pools.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    from importlib.metadata import version as dist_version

    import larq_zoo as lqz
    import sklearn

    tf.keras.utils.set_random_seed(SEED)

    (x_tr, y_tr), (x_te, y_te), source = load_digits_nhwc()
    n_train = len(y_tr)

    model = lqz.literature.BiRealNet(input_shape=(32, 32, 3), weights=None, num_classes=10)
    # larq-zoo ends the model in a softmax Activation: outputs are probabilities.
    from_logits = model.layers[-1].get_config().get("activation") != "softmax"
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate=LR),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )

    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_tr, y_tr))
        .shuffle(n_train, seed=SEED, reshuffle_each_iteration=True)
        .batch(BATCH)
        .prefetch(tf.data.AUTOTUNE)
    )
    test_ds = tf.data.Dataset.from_tensor_slices((x_te, y_te)).batch(BATCH)

    class EpochTimer(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []
            self.losses = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._t0)
            self.losses.append(float((logs or {}).get("loss", float("nan"))))
            print(
                f"epoch {epoch + 1}: {self.times[-1]:.2f} s, loss {self.losses[-1]:.4f}",
                file=sys.stderr,
                flush=True,
            )

    timer = EpochTimer()
    load_before = os.getloadavg()
    model.fit(train_ds, epochs=args.epochs, callbacks=[timer], verbose=0)
    load_after = os.getloadavg()
    _, test_acc = model.evaluate(test_ds, verbose=0)

    ips = [n_train / t for t in timer.times]
    result = {
        "framework": "larq-zoo",
        "model": "larq_zoo.literature.BiRealNet (birealnet18, ImageNet stem)",
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": dist_version("keras"),
            "larq": dist_version("larq"),
            "larq-zoo": dist_version("larq-zoo"),
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "threads": args.threads,
        "batch": BATCH,
        "epochs": args.epochs,
        "train_images": n_train,
        "test_images": int(len(y_te)),
        "data_source": source,
        "from_logits": from_logits,
        "params": int(model.count_params()),
        "images_per_s_median": statistics.median(ips[1:]),
        "images_per_s_epochs": [round(v, 2) for v in ips],
        "first_epoch_s": timer.times[0],
        "epoch_s": [round(t, 3) for t in timer.times],
        "train_loss_epochs": [round(v, 4) for v in timer.losses],
        "test_accuracy": float(test_acc),
        # 1-minute load average before/after training: other processes on the
        # machine share its cores and slow the epochs down.
        "loadavg_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

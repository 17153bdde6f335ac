"""AutoAttack (Croce & Hein, ICML 2020), version "standard", L-infinity, natively in TensorFlow.

The four attacks of the standard version, each usable on its own:

- `apgd`: Auto-PGD. 100 iterations, step size 2*eps halved at the checkpoints p_j when the loss oscillates or the
  best loss did not improve since the previous checkpoint, momentum 0.75, restart from the best point on halving.
  `loss="ce"` gives APGD-CE; `loss="dlr_targeted"` gives APGD-T (targeted DLR loss, one run per target class, the
  targets being the 2nd..10th highest logits of the clean image); `loss="dlr"` the untargeted DLR loss.
- `fab_targeted`: FAB-T, the targeted Fast Adaptive Boundary attack (linearise z_t - z_y, project onto the
  hyperplane intersected with the [0,1] box with the minimal L-inf step, extrapolate with eta, bias towards the
  original image with alpha, step back by beta once adversarial); the minimal-norm adversarial found is kept and
  counts only when its L-inf norm is <= eps.
- `square`: Square Attack, gradient-free random search on the margin loss, 5000 queries, p_init = 0.8, vertical
  stripe initialisation, square-shaped +-2*eps updates whose size follows the reference's p schedule.
- `autoattack_standard`: APGD-CE, APGD-T, FAB-T and Square in sequence, each run only on the images that are still
  classified correctly; an image is robust only if it survives all four (worst case per image).

Algorithmic details follow the authors' reference implementation (fra31/auto-attack: autopgd_base.py,
fab_base.py + fab_projections.py, square.py, autoattack.py with version='standard'); the code is our own.
Differences from the reference (see also the notes on each function):
- Randomness is TensorFlow's stateless RNG seeded from `seed` (repeatable, but not PyTorch's random streams).
- With fewer than 10 classes the number of target classes is clipped to C - 1 (the reference requires C >= 10);
  APGD-T needs C >= 4 (the targeted DLR loss uses the 4th highest logit) and is skipped with a warning otherwise.
- In FAB's L-inf projection, a division by a zero slope (reference: inf/nan) gives a zero step instead.
- Square clips the square side to the image's smaller side (the reference assumes square images).

Every function runs the model with `training=False`, works in [0,1] and in the L-inf eps-ball around `x`, projects its
output onto both once more as a final guarantee, and returns a constant tensor. Heavy loops are `tf.while_loop`s inside
`tf.function`s, built once per (model, settings, image shape) and cached. `jit_compile=True` compiles APGD and FAB with
XLA (one device only; the shrinking batches are padded to a few sizes to bound recompilation). It is off by default: on
a CPU, XLA made the attack loops of conv nets slower than the default (oneDNN) path
(`python -m mtard_tf.tools.benchmark`; the figures are in docs/performance.md). Square never uses XLA: like the
reference, it shrinks its batch to the images not yet broken at every query. Models must return logits.
"""

import math
import weakref

import numpy as np
import tensorflow as tf
from absl import logging

from mtard_tf.attacks import white_box as attacks_lib
from mtard_tf.methods import losses as losses_lib

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
_DLR_EPS = 1e-12
_INF = float("inf")

# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------

_CACHE = weakref.WeakKeyDictionary()


def cached_function(model, key, build):
    """`build(model)`, a compiled function, built once per (model, key) while the model lives and reused after.

    Every attack here and in mtard_tf.evaluation.robustness gets its tf.function this way, so that attacking batch after
    batch traces it once. `key` holds everything the function is built from besides the model (attack, settings, image
    shape). The function gets a weak proxy of the model, so that the cache does not keep the model (and its graphs)
    alive.
    """
    try:
        per_model = _CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable: build every time
        return build(model)
    if key not in per_model:
        per_model[key] = build(weakref.proxy(model))
    return per_model[key]


def logits_of(model, x):
    """The model's float32 logits in inference mode."""
    return tf.cast(model(x, training=False), tf.float32)


def _image_axes(x):
    return list(range(1, len(x.shape)))


def _per_example(v, x):
    """Reshape a [B] vector so that it broadcasts against images like x."""
    return tf.reshape(v, [-1] + [1] * (len(x.shape) - 1))


def _seed_pair(seed, salt):
    return tf.constant([int(seed), int(salt)], dtype=tf.int64)


def _prepare(x, y):
    return tf.convert_to_tensor(x, tf.float32), tf.cast(tf.convert_to_tensor(y), tf.int32)


def _gradient(model, x, loss_fn):
    """logits, per-example loss and d sum(loss) / dx (zeros where the loss does not depend on x).

    The backward pass runs on the loss times attacks_lib.GRADIENT_SCALE (divided out after, exactly in float32), so a
    float16 model's small gradients do not underflow.
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = logits_of(model, x)
        loss = loss_fn(logits)
        total = tf.reduce_sum(loss) * attacks_lib.GRADIENT_SCALE
    grad = tape.gradient(total, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return logits, loss, grad / attacks_lib.GRADIENT_SCALE


def _predict_fn(model, image_shape):
    def build(model):
        @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)], reduce_retracing=True)
        def predict(x):
            logits = logits_of(model, x)
            return logits, tf.argmax(logits, axis=-1, output_type=tf.int32)
        return predict
    return cached_function(model, ("predict", tuple(image_shape)), build)


def predict(model, x):
    """(logits, predicted labels) of a batch, in inference mode."""
    x = tf.convert_to_tensor(x, tf.float32)
    return _predict_fn(model, tuple(x.shape[1:]))(x)


def _subset(idx, total, jit_compile):
    """Indices to run on: `idx`, padded (with repeats of idx[0]) to a few fixed sizes when XLA compiles per shape."""
    n = idx.size
    if not jit_compile or n == 0:
        return idx
    size = min(max(8, 1 << (n - 1).bit_length()), max(total, n))
    return np.concatenate([idx, np.full(size - n, idx[0], dtype=idx.dtype)])


def _target_labels(logits, rank):
    """The class with the `rank`-th highest logit (rank 1 = the top class)."""
    return tf.math.top_k(logits, k=rank).indices[:, rank - 1]


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


def dlr_loss(labels, logits):
    """Difference-of-logits-ratio loss (to maximise): -(z_y - max_{j!=y} z_j) / (z_(1) - z_(3))."""
    logits = tf.cast(logits, tf.float32)
    z_sorted = tf.sort(logits, axis=-1, direction="DESCENDING")
    z_y = tf.gather(logits, labels, batch_dims=1)
    top_is_y = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
    best_other = tf.where(top_is_y, z_sorted[:, 1], z_sorted[:, 0])
    return -(z_y - best_other) / (z_sorted[:, 0] - z_sorted[:, 2] + _DLR_EPS)


def dlr_loss_targeted(labels, target_labels, logits):
    """Targeted DLR loss (to maximise): -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2). Needs >= 4 classes."""
    logits = tf.cast(logits, tf.float32)
    z_sorted = tf.sort(logits, axis=-1, direction="DESCENDING")
    z_y = tf.gather(logits, labels, batch_dims=1)
    z_t = tf.gather(logits, target_labels, batch_dims=1)
    return -(z_y - z_t) / (z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + _DLR_EPS)


def margin(labels, logits):
    """z_y - max_{j != y} z_j (> 0 iff classified correctly): the quantity Square minimises."""
    logits = tf.cast(logits, tf.float32)
    one_hot = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    z_y = tf.reduce_sum(tf.where(one_hot, logits, 0.0), axis=-1)
    best_other = tf.reduce_max(tf.where(one_hot, -_INF, logits), axis=-1)
    return z_y - best_other


# ----------------------------------------------------------------------------------------------------------------
# APGD
# ----------------------------------------------------------------------------------------------------------------


def apgd_checkpoints(steps):
    """The iterations (0-based) after which APGD checks its step size: p_j of the paper, as the reference counts."""
    k, n_iter_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    checkpoints, counter = [], 0
    for i in range(steps):
        counter += 1
        if counter == k:
            checkpoints.append(i)
            counter, k = 0, max(k - size_decr, n_iter_min)
    return checkpoints


def _build_apgd(model, image_shape, *, epsilon, steps, loss, momentum, rho, jit_compile):
    # check_windows[i] = p_j - p_{j-1} (p_{-1} = -1) if iteration i is the checkpoint p_j, else 0: the number of
    # iterations over which the check at i counts the loss increases.
    check_windows, last_checkpoint = np.zeros(steps, np.int32), -1
    for checkpoint in apgd_checkpoints(steps):
        check_windows[checkpoint], last_checkpoint = checkpoint - last_checkpoint, checkpoint
    epsilon = float(epsilon)

    def loss_fn(y, y_target):
        if loss == "ce":
            return lambda logits: losses_lib.cross_entropy(y, logits)
        if loss == "dlr":
            return lambda logits: dlr_loss(y, logits)
        return lambda logits: dlr_loss_targeted(y, y_target, logits)

    spec = tf.TensorSpec([None, *image_shape], tf.float32)
    label_spec = tf.TensorSpec([None], tf.int32)

    @tf.function(input_signature=[spec, label_spec, label_spec, tf.TensorSpec([2], tf.int64)],
                 jit_compile=jit_compile, reduce_retracing=True)
    def run(x, y, y_target, seed):
        objective = loss_fn(y, y_target)
        axes = _image_axes(x)
        batch = tf.shape(x)[0]

        # Random start: x + eps * t / ||t||_inf, t ~ U(-1, 1), in [0, 1].
        t = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
        t_max = tf.reduce_max(tf.abs(t), axis=axes, keepdims=True)
        x_adv = tf.clip_by_value(x + epsilon * t / (t_max + 1e-12), 0.0, 1.0)
        logits, loss_indiv, grad = _gradient(model, x_adv, objective)
        acc = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)

        state = dict(
            i=tf.constant(0),
            x_adv=x_adv,
            x_adv_old=x_adv,
            grad=grad,
            x_best=x_adv,
            grad_best=grad,
            loss_best=loss_indiv,
            x_best_adv=x_adv,
            acc=acc,
            step_size=tf.fill([batch], 2.0 * epsilon),
            loss_steps=tf.zeros([steps, batch]),
            loss_best_last_check=loss_indiv,
            reduced_last_check=tf.ones([batch], tf.bool),
        )

        def body(s):
            s = dict(s)
            i, x_adv = s["i"], s["x_adv"]
            # Gradient step with momentum: z = P(x + eta sign(g)); x' = P(x + a (z - x) + (1 - a)(x - x_old)).
            grad2 = x_adv - s["x_adv_old"]
            a = tf.where(i > 0, momentum, 1.0)
            step = _per_example(s["step_size"], x)
            z = attacks_lib.project(x_adv + step * tf.sign(s["grad"]), x, epsilon)
            x_new = attacks_lib.project(x_adv + (z - x_adv) * a + grad2 * (1.0 - a), x, epsilon)

            logits, loss_indiv, grad = _gradient(model, x_new, objective)
            pred = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
            acc = tf.logical_and(s["acc"], pred)
            x_best_adv = tf.where(_per_example(tf.logical_not(pred), x), x_new, s["x_best_adv"])

            loss_steps = tf.tensor_scatter_nd_update(s["loss_steps"], [[i]], loss_indiv[tf.newaxis])
            improved = loss_indiv > s["loss_best"]
            improved_b = _per_example(improved, x)
            x_best = tf.where(improved_b, x_new, s["x_best"])
            grad_best = tf.where(improved_b, grad, s["grad_best"])
            loss_best = tf.where(improved, loss_indiv, s["loss_best"])

            # Step-size check at the checkpoints p_j, over the k = p_j - p_{j-1} iterations since the previous one.
            k = tf.gather(check_windows, i)
            at_check = k > 0
            # Oscillation: fewer than rho * k increases of the loss over the last k iterations. Indices wrap
            # around like Python's negative indexing in the reference (loss_steps[-1] is still 0 at the first check).
            back = tf.range(steps)
            current = tf.gather(loss_steps, tf.math.floormod(i - back, steps))
            previous = tf.gather(loss_steps, tf.math.floormod(i - back - 1, steps))
            increases = tf.reduce_sum(
                tf.cast(current > previous, tf.float32) * tf.cast(back < k, tf.float32)[:, tf.newaxis], axis=0)
            oscillation = increases <= tf.cast(k, tf.float32) * rho
            no_improvement = tf.logical_and(tf.logical_not(s["reduced_last_check"]),
                                            s["loss_best_last_check"] >= loss_best)
            reduce = tf.logical_and(at_check, tf.logical_or(oscillation, no_improvement))
            reduced_last_check = tf.where(at_check, tf.logical_or(oscillation, no_improvement),
                                          s["reduced_last_check"])
            loss_best_last_check = tf.where(at_check, loss_best, s["loss_best_last_check"])
            step_size = tf.where(reduce, s["step_size"] / 2.0, s["step_size"])
            reduce_b = _per_example(reduce, x)
            x_next = tf.where(reduce_b, x_best, x_new)
            grad = tf.where(reduce_b, grad_best, grad)

            return (dict(
                i=i + 1, x_adv=x_next, x_adv_old=x_adv, grad=grad, x_best=x_best, grad_best=grad_best,
                loss_best=loss_best, x_best_adv=x_best_adv, acc=acc, step_size=step_size, loss_steps=loss_steps,
                loss_best_last_check=loss_best_last_check, reduced_last_check=reduced_last_check),)

        final = tf.while_loop(lambda s: s["i"] < steps, body, (state,), maximum_iterations=steps)[0]
        x_best_adv = attacks_lib.project(final["x_best_adv"], x, epsilon)
        return x_best_adv, tf.logical_not(final["acc"])

    return run


def apgd(model, x, y, *, epsilon, steps=100, loss="ce", target_class_rank=None, n_target_classes=9, restarts=1,
         seed=0, momentum=0.75, rho=0.75, jit_compile=False):
    """Auto-PGD (L-inf) on the images of (x, y) that the model classifies correctly; returns the adversarial images.

    loss: "ce" (APGD-CE), "dlr" (untargeted DLR) or "dlr_targeted" (APGD-T). For "dlr_targeted" the targets are the
    classes of clean-logit rank `target_class_rank` (an int or a list; rank 2 = the highest logit after the top
    one), by default ranks 2 .. n_target_classes + 1, each run only on the images not yet broken, `restarts` runs per
    target. Images the model misclassifies, and those no run breaks, come back unchanged. Like the reference, an
    image is replaced by the last misclassified iterate of the run that broke it.
    """
    if loss not in ("ce", "dlr", "dlr_targeted"):
        raise ValueError(f"unknown APGD loss {loss!r}")
    x, y = _prepare(x, y)
    image_shape = tuple(x.shape[1:])
    key = ("apgd", image_shape, float(epsilon), int(steps), loss, float(momentum), float(rho), bool(jit_compile))
    run = cached_function(model, key, lambda m: _build_apgd(
        m, image_shape, epsilon=epsilon, steps=int(steps), loss=loss, momentum=float(momentum), rho=float(rho),
        jit_compile=jit_compile))
    clean_logits, pred = predict(model, x)
    num_classes = int(clean_logits.shape[-1])
    if loss == "dlr_targeted":
        if num_classes < 4:
            raise ValueError("the targeted DLR loss needs at least 4 classes")
        if target_class_rank is None:
            ranks = list(range(2, min(n_target_classes, num_classes - 1) + 2))
        else:
            ranks = [int(r) for r in np.atleast_1d(target_class_rank)]
            if min(ranks) < 2 or max(ranks) > num_classes:
                raise ValueError(f"target ranks must lie in [2, {num_classes}]")
    else:
        ranks = [None]

    x_np, y_np = x.numpy(), y.numpy()
    x_adv = x_np.copy()
    robust = pred.numpy() == y_np
    for rank in ranks:
        for restart in range(restarts):
            idx = np.flatnonzero(robust)
            if idx.size == 0:
                break
            run_idx = _subset(idx, len(x_np), jit_compile)
            sub_x, sub_y = tf.gather(x, run_idx), tf.gather(y, run_idx)
            y_target = (_target_labels(tf.gather(clean_logits, run_idx), rank) if rank is not None
                        else tf.zeros_like(sub_y))
            salt = (rank or 0) * 1000 + restart
            adv, fooled = run(sub_x, sub_y, y_target, _seed_pair(seed, salt))
            fooled = fooled.numpy()[:idx.size]
            adv = adv.numpy()[:idx.size]
            x_adv[idx[fooled]] = adv[fooled]
            robust[idx[fooled]] = False
    return tf.stop_gradient(attacks_lib.project(tf.constant(x_adv), x, float(epsilon)))


# ----------------------------------------------------------------------------------------------------------------
# FAB-T
# ----------------------------------------------------------------------------------------------------------------


def projection_linf(points, w, b):
    """Minimal L-inf step d (per row) such that <w, t + d> = b and 0 <= t + d <= 1 (FAB's projection).

    points, w: [N, D]; b: [N]. Rows where the hyperplane cannot be reached inside the box get the step to the box
    corner that moves furthest towards it. A batched transcription of the reference's `projection_linf`.
    """
    t = points
    sign = tf.where(tf.reduce_sum(w * t, axis=1) - b >= 0.0, 1.0, -1.0)
    w = w * sign[:, tf.newaxis]
    b = b * sign
    a = tf.cast(w < 0.0, tf.float32)
    nonzero = tf.cast(tf.not_equal(w, 0.0), tf.float32)
    d = (a - t) * nonzero
    p = a - t * (2.0 * a - 1.0)  # how far each coordinate can move towards the hyperplane inside the box
    order = tf.argsort(p, axis=1)  # ascending
    b = b - tf.reduce_sum(w * t, axis=1)
    b0 = tf.reduce_sum(w * d, axis=1)

    order_desc = tf.reverse(order, axis=[1])
    ws = tf.gather(w, order_desc, batch_dims=1)
    bs2 = -ws * tf.gather(d, order_desc, batch_dims=1)
    s = tf.cumsum(tf.abs(ws), axis=1)
    sb = tf.cumsum(bs2, axis=1) + b0[:, tf.newaxis]

    p_min = tf.gather(p, order[:, 0], batch_dims=1)
    b2 = sb[:, -1] - s[:, -1] * p_min
    c_l = b - b2 > 0.0
    c_2 = tf.logical_and(b - b0 > 0.0, tf.logical_not(c_l))

    dim = int(w.shape[1]) if w.shape[1] is not None else None
    n_rows = tf.shape(w)[0]
    lb = tf.zeros([n_rows])
    ub = tf.fill([n_rows], tf.cast(tf.shape(w)[1] - 1, tf.float32))
    for _ in range(int(math.ceil(math.log2(max(dim, 2))))):
        middle = tf.floor((lb + ub) / 2.0)
        middle_i = tf.cast(middle, tf.int32)
        current = tf.gather(order_desc, middle_i, batch_dims=1)
        b2_mid = (tf.gather(sb, middle_i, batch_dims=1)
                  - tf.gather(s, middle_i, batch_dims=1) * tf.gather(p, current, batch_dims=1))
        go_right = b - b2_mid > 0.0
        lb = tf.where(go_right, middle, lb)
        ub = tf.where(go_right, ub, middle)
    lb_i = tf.cast(lb, tf.int32)

    lambda_l = tf.maximum(tf.math.divide_no_nan(b - sb[:, -1], -s[:, -1]), 0.0)[:, tf.newaxis]
    d_l = (2.0 * a - 1.0) * lambda_l
    lambda_2 = tf.maximum(tf.math.divide_no_nan(b - tf.gather(sb, lb_i, batch_dims=1),
                                                -tf.gather(s, lb_i, batch_dims=1)), 0.0)[:, tf.newaxis]
    d_2 = tf.minimum(lambda_2, d) * a + tf.maximum(-lambda_2, d) * (1.0 - a)
    d = tf.where(c_l[:, tf.newaxis], d_l, tf.where(c_2[:, tf.newaxis], d_2, d))
    return d * nonzero


def _build_fab(model, image_shape, *, epsilon, steps, alpha_max, eta, beta, random_start, jit_compile):
    epsilon = float(epsilon)
    spec = tf.TensorSpec([None, *image_shape], tf.float32)
    label_spec = tf.TensorSpec([None], tf.int32)

    @tf.function(input_signature=[spec, label_spec, label_spec, tf.TensorSpec([2], tf.int64)],
                 jit_compile=jit_compile, reduce_retracing=True)
    def run(x, y, y_target, seed):
        batch = tf.shape(x)[0]
        axes = _image_axes(x)
        flat_dim = int(np.prod(image_shape))
        x0 = tf.reshape(x, [batch, flat_dim])

        def objective(logits):  # z_t - z_y: the reference's targeted df
            return tf.gather(logits, y_target, batch_dims=1) - tf.gather(logits, y, batch_dims=1)

        if random_start:  # the reference's restart > 0 start: x + min(res, eps) * t / ||t||_inf / 2, res = 1e10
            t = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
            t_max = tf.reduce_max(tf.abs(t), axis=axes, keepdims=True)
            x1 = tf.clip_by_value(x + epsilon * t / t_max * 0.5, 0.0, 1.0)
        else:
            x1 = x

        def body(i, x1, adv, res):
            _, df, dg = _gradient(model, x1, objective)
            w = tf.reshape(dg, [batch, flat_dim])
            b = -df + tf.reduce_sum(w * tf.reshape(x1, [batch, flat_dim]), axis=1)
            d3 = projection_linf(tf.concat([tf.reshape(x1, [batch, flat_dim]), x0], 0),
                                 tf.concat([w, w], 0), tf.concat([b, b], 0))
            d1 = tf.reshape(d3[:batch], tf.shape(x))
            d2 = tf.reshape(d3[batch:], tf.shape(x))
            a0 = tf.maximum(tf.reduce_max(tf.abs(d3), axis=1), 1e-8)
            a1, a2 = a0[:batch], a0[batch:]
            alpha = _per_example(tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max), x)
            x1 = tf.clip_by_value((x1 + eta * d1) * (1.0 - alpha) + (x + d2 * eta) * alpha, 0.0, 1.0)

            is_adv = tf.not_equal(tf.argmax(logits_of(model, x1), axis=-1, output_type=tf.int32), y)
            norm = tf.reduce_max(tf.abs(x1 - x), axis=axes)
            better = tf.logical_and(is_adv, norm < res)
            adv = tf.where(_per_example(better, x), x1, adv)
            res = tf.where(better, norm, res)
            x1 = tf.where(_per_example(is_adv, x), x + (x1 - x) * beta, x1)
            return i + 1, x1, adv, res

        _, _, adv, res = tf.while_loop(
            lambda i, *_: i < steps, body, (tf.constant(0), x1, x, tf.fill([batch], 1e10)),
            maximum_iterations=steps)
        success = res <= epsilon
        adv = tf.where(_per_example(success, x), adv, x)
        return attacks_lib.project(adv, x, epsilon), success

    return run


def fab_targeted(model, x, y, *, epsilon, steps=100, n_target_classes=9, target_class_rank=None, restarts=1,
                 seed=0, alpha_max=0.1, eta=1.05, beta=0.9, jit_compile=False):
    """FAB-T (L-inf): for each target class (clean-logit ranks 2 .. n_target_classes + 1 unless
    `target_class_rank` says otherwise), on the correctly classified images not yet broken, search the minimal
    L-inf adversarial towards that class; an image is replaced only by an adversarial image within eps.

    As in the reference's standard version, the first run starts at x itself (restart r > 0 starts at a random point
    at L-inf distance eps/2), with alpha_max = 0.1, eta = 1.05, beta = 0.9, 100 iterations.
    """
    x, y = _prepare(x, y)
    image_shape = tuple(x.shape[1:])
    clean_logits, pred = predict(model, x)
    num_classes = int(clean_logits.shape[-1])
    if target_class_rank is None:
        ranks = list(range(2, min(n_target_classes, num_classes - 1) + 2))
    else:
        ranks = [int(r) for r in np.atleast_1d(target_class_rank)]

    x_np, y_np = x.numpy(), y.numpy()
    x_adv = x_np.copy()
    robust = pred.numpy() == y_np
    for rank in ranks:
        for restart in range(restarts):
            idx = np.flatnonzero(robust)
            if idx.size == 0:
                break
            key = ("fab-t", image_shape, float(epsilon), int(steps), float(alpha_max), float(eta), float(beta),
                   restart > 0, bool(jit_compile))
            run = cached_function(model, key, lambda m: _build_fab(
                m, image_shape, epsilon=epsilon, steps=int(steps), alpha_max=float(alpha_max), eta=float(eta),
                beta=float(beta), random_start=restart > 0, jit_compile=jit_compile))
            run_idx = _subset(idx, len(x_np), jit_compile)
            sub_x, sub_y = tf.gather(x, run_idx), tf.gather(y, run_idx)
            y_target = _target_labels(tf.gather(clean_logits, run_idx), rank)
            adv, success = run(sub_x, sub_y, y_target, _seed_pair(seed, 50_000 + rank * 1000 + restart))
            success = success.numpy()[:idx.size]
            adv = adv.numpy()[:idx.size]
            x_adv[idx[success]] = adv[success]
            robust[idx[success]] = False
    return tf.stop_gradient(attacks_lib.project(tf.constant(x_adv), x, float(epsilon)))


# ----------------------------------------------------------------------------------------------------------------
# Square
# ----------------------------------------------------------------------------------------------------------------


def square_p_schedule(iteration, p_init=0.8, queries=5000, rescale_schedule=False):
    """The reference's p_selection: p_init halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
    (of 10000 when the schedule is rescaled to `queries`; AutoAttack does not rescale). Works on ints and tensors."""
    it = iteration
    if rescale_schedule:
        it = tf.cast(tf.cast(it, tf.float64) / queries * 10000.0, tf.int64)
    thresholds = tf.constant([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000], tf.int64)
    halvings = tf.reduce_sum(tf.cast(tf.cast(it, tf.int64) > thresholds, tf.float64))
    return p_init / tf.pow(tf.constant(2.0, tf.float64), halvings)


def _build_square(model, image_shape, *, epsilon, queries, p_init, rescale_schedule):
    epsilon = float(epsilon)
    height, width, channels = (int(v) for v in image_shape)
    spec = tf.TensorSpec([None, *image_shape], tf.float32)

    @tf.function(input_signature=[spec, tf.TensorSpec([None], tf.int32), tf.TensorSpec([2], tf.int64)],
                 reduce_retracing=True)
    def run(x, y, seed):
        batch = tf.shape(x)[0]
        # Vertical stripes: one sign per (image, column, channel), constant along the height.
        stripes = tf.sign(tf.random.stateless_uniform([batch, 1, width, channels], seed, -1.0, 1.0))
        x_best = tf.clip_by_value(x + epsilon * stripes, 0.0, 1.0)
        margin_min = margin(y, logits_of(model, x_best))
        loss_min = margin_min  # loss = margin for the margin loss

        rows = tf.range(height)[:, tf.newaxis, tf.newaxis]
        cols = tf.range(width)[tf.newaxis, :, tf.newaxis]

        def body(i, x_best, margin_min, loss_min):
            p = square_p_schedule(i, p_init, queries, rescale_schedule)
            side = tf.cast(tf.round(tf.sqrt(p * float(height * width))), tf.int32)
            side = tf.clip_by_value(side, 1, min(height, width))
            u = tf.random.stateless_uniform([2 + channels], tf.random.experimental.stateless_fold_in(seed, i))
            # One square position and one sign per channel per query, shared by the batch (as in the reference).
            top = tf.cast(tf.floor(u[0] * tf.cast(height - side, tf.float32)), tf.int32)
            left = tf.cast(tf.floor(u[1] * tf.cast(width - side, tf.float32)), tf.int32)
            signs = tf.sign(2.0 * u[2:] - 1.0)
            inside = tf.logical_and(tf.logical_and(rows >= top, rows < top + side),
                                    tf.logical_and(cols >= left, cols < left + side))
            new_deltas = tf.where(inside, 2.0 * epsilon * signs, 0.0)[tf.newaxis]

            # Query only the images not broken yet.
            to_fool = tf.where(margin_min > 0.0)
            x_curr = tf.gather_nd(x, to_fool)
            x_best_curr = tf.gather_nd(x_best, to_fool)
            y_curr = tf.gather_nd(y, to_fool)
            margin_min_curr = tf.gather_nd(margin_min, to_fool)
            loss_min_curr = tf.gather_nd(loss_min, to_fool)

            x_new = attacks_lib.project(x_best_curr + new_deltas, x_curr, epsilon)
            margin_new = margin(y_curr, logits_of(model, x_new))
            loss_new = margin_new
            improved = loss_new < loss_min_curr
            loss_min_curr = tf.where(improved, loss_new, loss_min_curr)
            improved = tf.logical_or(improved, margin_new <= 0.0)
            margin_min_curr = tf.where(improved, margin_new, margin_min_curr)
            x_best_curr = tf.where(_per_example(improved, x), x_new, x_best_curr)

            return (i + 1,
                    tf.tensor_scatter_nd_update(x_best, to_fool, x_best_curr),
                    tf.tensor_scatter_nd_update(margin_min, to_fool, margin_min_curr),
                    tf.tensor_scatter_nd_update(loss_min, to_fool, loss_min_curr))

        _, x_best, margin_min, _ = tf.while_loop(
            lambda i, x_best, margin_min, loss_min: tf.logical_and(i < queries, tf.reduce_any(margin_min > 0.0)),
            body, (tf.constant(0), x_best, margin_min, loss_min), maximum_iterations=queries)
        return attacks_lib.project(x_best, x, epsilon), margin_min <= 0.0

    return run


def square(model, x, y, *, epsilon, queries=5000, p_init=0.8, seed=0, rescale_schedule=False):
    """Square Attack (L-inf, margin loss) on the correctly classified images; returns the adversarial images.

    A gradient-free random search: start from vertical +-eps stripes, then at query i overwrite one square of side
    round(sqrt(p_i * H * W)) (same position for the batch, one random sign per channel) with +-eps and keep it if the
    margin z_y - max_{j!=y} z_j decreases; an image stops being queried once misclassified.
    """
    x, y = _prepare(x, y)
    image_shape = tuple(x.shape[1:])
    if len(image_shape) != 3:
        raise ValueError("square expects images [B, H, W, C]")
    key = ("square", image_shape, float(epsilon), int(queries), float(p_init), bool(rescale_schedule))
    run = cached_function(model, key, lambda m: _build_square(
        m, image_shape, epsilon=epsilon, queries=int(queries), p_init=float(p_init), rescale_schedule=rescale_schedule))
    _, pred = predict(model, x)
    robust = pred.numpy() == y.numpy()
    x_adv = x.numpy().copy()
    idx = np.flatnonzero(robust)
    if idx.size:
        adv, fooled = run(tf.gather(x, idx), tf.gather(y, idx), _seed_pair(seed, 90_000))
        fooled = fooled.numpy()
        x_adv[idx[fooled]] = adv.numpy()[fooled]
    return tf.stop_gradient(attacks_lib.project(tf.constant(x_adv), x, float(epsilon)))


# ----------------------------------------------------------------------------------------------------------------
# AutoAttack standard
# ----------------------------------------------------------------------------------------------------------------


def autoattack_standard(model, x, y, *, epsilon, seed=0, progress=None, attacks=STANDARD_ATTACKS, apgd_steps=100,
                        fab_steps=100, square_queries=5000, n_target_classes=9, jit_compile=False):
    """AutoAttack, version "standard" (L-inf): APGD-CE, APGD-T, FAB-T, Square, each on the images still robust.

    Returns (x_adv, robust_mask): x_adv holds, per image, the adversarial image of the first attack that broke it
    (x itself when none did or when the clean image is misclassified); robust_mask[i] is True iff the clean image and
    every attack's image are classified correctly. `progress`, if given, is called as
    progress(attack_name, num_robust, num_images) after each attack. The iteration counts default to the standard
    version's (100, 9 targets, 100, 5000 queries); smaller ones are for tests only.

    Args:
      model: a Keras model (or callable) mapping images in [0, 1] to logits, run in inference mode.
      x: images float32 [B, H, W, C] in [0, 1]. y: integer labels [B].
      epsilon: the L-inf radius. seed: seed of the attacks' randomness.

    Returns:
      (x_adv, robust_mask) as above.

    Example:

    >>> x_adv, robust = mtard_tf.autoattack(model, images, labels, epsilon=8 / 255)
    >>> robust_accuracy = float(np.mean(robust))
    """
    x, y = _prepare(x, y)
    epsilon = float(epsilon)
    clean_logits, pred = predict(model, x)
    num_classes = int(clean_logits.shape[-1])
    n_targets = min(int(n_target_classes), num_classes - 1)
    robust = pred.numpy() == y.numpy()
    x_adv = x.numpy().copy()
    if progress is not None:
        progress("clean", int(robust.sum()), len(robust))
    for name in attacks:
        idx = np.flatnonzero(robust)
        if idx.size == 0:
            break
        sub_x, sub_y = tf.gather(x, idx), tf.gather(y, idx)
        if name == "apgd-ce":
            adv = apgd(model, sub_x, sub_y, epsilon=epsilon, steps=apgd_steps, loss="ce", seed=seed,
                       jit_compile=jit_compile)
        elif name == "apgd-t":
            if num_classes < 4:
                logging.warning("AutoAttack: APGD-T needs >= 4 classes; skipped for %d classes.", num_classes)
                continue
            adv = apgd(model, sub_x, sub_y, epsilon=epsilon, steps=apgd_steps, loss="dlr_targeted",
                       n_target_classes=n_targets, seed=seed, jit_compile=jit_compile)
        elif name == "fab-t":
            adv = fab_targeted(model, sub_x, sub_y, epsilon=epsilon, steps=fab_steps, n_target_classes=n_targets,
                               seed=seed, jit_compile=jit_compile)
        elif name == "square":
            adv = square(model, sub_x, sub_y, epsilon=epsilon, queries=square_queries, p_init=0.8, seed=seed)
        else:
            raise ValueError(f"unknown AutoAttack attack {name!r}")
        adv = attacks_lib.project(adv, sub_x, epsilon)
        _, adv_pred = predict(model, adv)
        fooled = adv_pred.numpy() != sub_y.numpy()
        x_adv[idx[fooled]] = adv.numpy()[fooled]
        robust[idx[fooled]] = False
        if progress is not None:
            progress(name, int(robust.sum()), len(robust))
    x_adv = tf.stop_gradient(attacks_lib.project(tf.constant(x_adv), x, epsilon))
    return x_adv, tf.constant(robust)

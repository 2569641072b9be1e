"""Data-parallel training with SyncBatchNorm: an MLP on scikit-learn's digits, split across MPI ranks.

    mpiexec -n 2 python examples/ddp_digits.py            # pip install ".[mpi,examples]"

Each step takes the whole training set as one global batch and splits it across the ranks
(unevenly when it does not divide).  Every rank runs Linear -> SyncBatchNorm1d -> ReLU -> Linear
on its slice, the loss is the mean cross-entropy over the *global* batch, and the linear layers'
gradients are summed across ranks with one Allreduce.  SyncBatchNorm's own ``grad_weight`` and
``grad_bias`` are already the global batch's (its backward reduced what they need), so they are
left out of that Allreduce.  Rank 0 also trains the same model in one process on the full batch
with a plain BatchNorm1d, prints both loss curves side by side and checks they are equal within
``--tol`` (relative): data parallelism with SyncBatchNorm changes nothing but rounding.
"""
import argparse
import sys

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import SyncBatchNorm


def load(n_train):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float64)
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def init_params(hidden, seed):
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.standard_normal((64, hidden)) / 8.0,
        "b1": np.zeros(hidden),
        "W2": rng.standard_normal((hidden, 10)) / np.sqrt(hidden),
        "b2": np.zeros(10),
    }


def step(params, bn, X, y, n_global):
    """Forward and backward on (X, y), a slice of a global batch of n_global samples.  Returns the
    slice's summed cross-entropy and the linear layers' gradients of the global mean loss."""
    h = X @ params["W1"] + params["b1"]
    a = bn(h)
    r = np.maximum(a, 0.0)
    logits = r @ params["W2"] + params["b2"]
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss_sum = -np.log(p[np.arange(len(y)), y]).sum()
    d = p.copy()
    d[np.arange(len(y)), y] -= 1.0
    d /= n_global  # the global mean loss
    grads = {"W2": r.T @ d, "b2": d.sum(axis=0)}
    dr = d @ params["W2"].T
    dh = bn.backward(dr * (a > 0))
    grads["W1"] = X.T @ dh
    grads["b1"] = dh.sum(axis=0)
    return loss_sum, grads


def accuracy(params, bn, X, y):
    bn.eval()
    r = np.maximum(bn(X @ params["W1"] + params["b1"]), 0.0)
    bn.train()
    return float(((r @ params["W2"] + params["b2"]).argmax(axis=1) == y).mean())


def train(X, y, args, comm=None):
    """Full-batch gradient descent: with comm, this rank's slice and SyncBatchNorm; without, the
    whole batch and BatchNorm1d.  Returns the loss curve, the parameters and the layer."""
    params = init_params(args.hidden, args.seed)
    if comm is None:
        bn = fastbn.BatchNorm1d(args.hidden, dtype=np.float64)
        Xs, ys = X, y
    else:
        bn = SyncBatchNorm(args.hidden, comm=comm, dtype=np.float64)
        lo, hi = np.linspace(0, len(X), comm.Get_size() + 1).astype(int)[comm.Get_rank():comm.Get_rank() + 2]
        Xs, ys = X[lo:hi], y[lo:hi]
    names = ["W1", "b1", "W2", "b2"]
    curve = []
    for _ in range(args.steps):
        loss_sum, grads = step(params, bn, Xs, ys, len(X))
        if comm is not None:
            flat = np.concatenate([grads[k].ravel() for k in names] + [[loss_sum]])
            comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            loss_sum = flat[-1]
            offset = 0
            for k in names:
                grads[k] = flat[offset:offset + grads[k].size].reshape(grads[k].shape)
                offset += grads[k].size
        curve.append(loss_sum / len(X))
        for k in names:
            params[k] -= args.lr * grads[k]
        bn.weight -= args.lr * bn.grad_weight  # already the global batch's gradient on every rank
        bn.bias -= args.lr * bn.grad_bias
    return curve, params, bn


def main(argv=None):
    ap = argparse.ArgumentParser(description="data-parallel MLP on digits with SyncBatchNorm")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--train", type=int, default=1500, help="training samples (the global batch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-9, help="relative tolerance between the two curves")
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    fastbn.set_num_threads(1)
    X, y, Xt, yt = load(args.train)
    curve, params, bn = train(X, y, args, comm)
    if comm.Get_rank() != 0:
        return 0
    single, params1, bn1 = train(X, y, args)
    print(f"{comm.Get_size()} ranks, global batch {len(X)}, {args.steps} steps of full-batch gradient descent")
    print(f"{'step':>4} {'data-parallel loss':>20} {'single-process loss':>20} {'rel diff':>9}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(curve, single)):
        rel = abs(a - b) / abs(b)
        worst = max(worst, rel)
        if i < 5 or i % 10 == 9 or i == len(curve) - 1:
            print(f"{i + 1:>4} {a:20.12f} {b:20.12f} {rel:9.1e}")
    print(f"test accuracy: data-parallel {accuracy(params, bn, Xt, yt):.3f}, single {accuracy(params1, bn1, Xt, yt):.3f}")
    ok = worst <= args.tol
    print(f"largest relative difference {worst:.2e}: curves {'match' if ok else 'DIFFER'} (tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

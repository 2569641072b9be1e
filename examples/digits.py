"""Batch normalization's claims, reproduced on scikit-learn's bundled digits in plain NumPy + fastbn.

    pip install fastbn[examples]          # scikit-learn and matplotlib
    python examples/digits.py [--out digits_out] [--epochs 15] [--quick]

Models: an MLP (Linear without bias -> BatchNorm1d -> ReLU or sigmoid, twice, then a Linear
classifier) and a small conv net (3x3 convolution by im2col -> BatchNorm2d / GroupNorm /
LayerNorm -> ReLU -> 2x2 average pool -> Linear).  Every layer follows fastbn's protocol:
``forward`` then ``backward(grad)``, and an SGD step is ``for p, g in layer.params_and_grads():
p -= lr * g``.  Evaluation passes run inside ``fastbn.no_grad()``.

Experiments (each writes a PNG; summary.md collects the numbers):
  1. lr_sweep.png        test accuracy against the learning rate, with and without batch norm
  2. bad_init.png        weights scaled x0.1 and x10 at initialization, with and without batch norm
  3. saturation.png      fraction of sigmoid inputs with |z| > 4 (gradient < 0.018) per epoch
  4. forgotten_eval.png  test accuracy in train vs eval mode with batches of 2, 8, 32 and of one class
  5. batch_size.png      MLP and conv net trained with batches of 2 vs 32 under BatchNorm, GroupNorm,
                         LayerNorm
"""
import argparse
import os
import time

import numpy as np

import fastbn

DT = np.float32


# ---------------------------------------------------------------- data
def load_data(seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.data / 16.0).astype(DT)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order], y[order]
    n_train = 1400
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


# ---------------------------------------------------------------- layers (fastbn's protocol)
class Linear:
    def __init__(self, n_in, n_out, rng, bias=False, scale=1.0):
        self.weight = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in) * scale).astype(DT)
        self.bias = np.zeros(n_out, DT) if bias else None
        self.training = True

    def __call__(self, x):
        if fastbn.is_grad_enabled():
            self._x = x
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y

    def backward(self, g):
        self._gw = self._x.T @ g
        self._gb = g.sum(axis=0) if self.bias is not None else None
        return g @ self.weight.T

    def params_and_grads(self):
        pairs = [(self.weight, self._gw)]
        return pairs + [(self.bias, self._gb)] if self.bias is not None else pairs


class Conv3x3:
    """3x3 convolution, padding 1, by im2col: (N, C, H, W) -> (N, F, H, W).  The first layer: its
    backward returns no input gradient."""

    def __init__(self, c_in, f, rng, scale=1.0):
        self.weight = (rng.standard_normal((c_in * 9, f)) * np.sqrt(2.0 / (c_in * 9)) * scale).astype(DT)
        self.training = True

    def __call__(self, x):
        N, C, H, W = x.shape
        p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        cols = np.stack([p[:, :, i:i + H, j:j + W] for i in range(3) for j in range(3)], axis=2)  # N,C,9,H,W
        cols = cols.transpose(0, 3, 4, 1, 2).reshape(N * H * W, C * 9)
        if fastbn.is_grad_enabled():
            self._cols, self._shape = cols, (N, H, W)
        y = cols @ self.weight
        return np.ascontiguousarray(y.reshape(N, H, W, -1).transpose(0, 3, 1, 2))

    def backward(self, g):
        N, H, W = self._shape
        self._gw = self._cols.T @ g.transpose(0, 2, 3, 1).reshape(N * H * W, -1)
        return None

    def params_and_grads(self):
        return [(self.weight, self._gw)]


class Act:
    """ReLU or sigmoid; keeps the fraction of saturated sigmoid inputs (|z| > 4) of its last call."""

    def __init__(self, kind):
        self.kind, self.training, self.saturated = kind, True, 0.0

    def __call__(self, z):
        if self.kind == "relu":
            y = np.maximum(z, 0)
        else:
            self.saturated = float(np.mean(np.abs(z) > 4))
            y = 1.0 / (1.0 + np.exp(-z))
        if fastbn.is_grad_enabled():
            self._y = y
        return y

    def backward(self, g):
        return g * (self._y > 0) if self.kind == "relu" else g * self._y * (1 - self._y)

    def params_and_grads(self):
        return []


class Pool2Flatten:
    """2x2 average pool, then flatten."""
    training = True

    def __call__(self, x):
        N, C, H, W = x.shape
        self._shape = x.shape
        return x.reshape(N, C, H // 2, 2, W // 2, 2).mean(axis=(3, 5)).reshape(N, -1)

    def backward(self, g):
        N, C, H, W = self._shape
        g = g.reshape(N, C, H // 2, 1, W // 2, 1) / 4
        return np.ascontiguousarray(np.broadcast_to(g, (N, C, H // 2, 2, W // 2, 2)).reshape(N, C, H, W))

    def params_and_grads(self):
        return []


class Model:
    def __init__(self, layers):
        self.layers = layers

    def train(self, mode=True):
        for layer in self.layers:
            if hasattr(layer, "train"):
                layer.train(mode)
            layer.training = mode
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, g):
        for layer in reversed(self.layers):
            g = layer.backward(g)

    def step(self, lr):
        for layer in self.layers:
            for p, g in layer.params_and_grads():
                p -= lr * g

    def saturation(self):
        return [a.saturated for a in self.layers if isinstance(a, Act) and a.kind == "sigmoid"]


def mlp(rng, norm=True, act="relu", hidden=64, scale=1.0):
    """norm: False (a bias instead), True or "batch" (BatchNorm1d), "group" (GroupNorm(8)), "layer"."""
    norm = "batch" if norm is True else norm
    make = {"batch": lambda: fastbn.BatchNorm1d(hidden), "group": lambda: fastbn.GroupNorm(8, hidden),
            "layer": lambda: fastbn.LayerNorm(hidden)}
    layers, n_in = [], 64
    for _ in range(2):
        layers.append(Linear(n_in, hidden, rng, bias=not norm, scale=scale))
        if norm:
            layers.append(make[norm]())
        layers.append(Act(act))
        n_in = hidden
    layers.append(Linear(n_in, 10, rng, bias=True, scale=scale))
    return Model(layers)


def convnet(rng, norm="batch", filters=16):
    f = filters
    make = {"batch": lambda: fastbn.BatchNorm2d(f), "group": lambda: fastbn.GroupNorm(4, f),
            "layer": lambda: fastbn.LayerNorm((f, 8, 8))}[norm]
    return Model([Conv3x3(1, f, rng), make(), Act("relu"), Pool2Flatten(), Linear(f * 16, 10, rng, bias=True)])


# ---------------------------------------------------------------- training
def softmax_xent(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y] + 1e-12))
    g = p
    g[np.arange(len(y)), y] -= 1
    return float(loss), (g / len(y)).astype(DT)


def shaped(model, X):
    return X.reshape(-1, 1, 8, 8) if isinstance(model.layers[0], Conv3x3) else X


def train(model, X, y, lr, epochs, batch, rng, on_epoch=None):
    model.train()
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(y))
        total, count = 0.0, 0
        for i in range(0, len(y) - batch + 1, batch):  # whole batches only (batch norm needs 2+)
            idx = order[i:i + batch]
            loss, g = softmax_xent(model(shaped(model, X[idx])), y[idx])
            if not np.isfinite(loss):
                losses.append(float("nan"))
                return losses
            model.backward(g)
            model.step(lr)
            total, count = total + loss, count + 1
        losses.append(total / max(count, 1))
        if on_epoch:
            on_epoch(model)
    return losses


def accuracy(model, X, y, batch=256, mode="eval"):
    """Test accuracy in eval mode, or in train mode (batch statistics, running ones untouched)."""
    model.train(mode == "train")
    correct = 0
    with fastbn.no_grad():
        for i in range(0, len(y) - (batch - 1 if mode == "train" else 0), batch):
            xb = shaped(model, X[i:i + batch])
            for layer in model.layers:
                xb = layer(xb, update_running_stats=False) if isinstance(layer, fastbn.layers.Layer) else layer(xb)
            correct += int(np.sum(np.argmax(xb, axis=1) == y[i:i + batch]))
            n_seen = i + batch
    model.eval()
    return correct / (n_seen if mode == "train" else len(y))


# ---------------------------------------------------------------- experiments
def exp_lr_sweep(data, cfg):
    Xtr, ytr, Xte, yte = data
    lrs = cfg["lrs"]
    res = {}
    for norm in (False, True):
        res[norm] = [accuracy(_trained(mlp(np.random.default_rng(1), norm=norm), data, lr, cfg), Xte, yte) for lr in lrs]
    return lrs, res


def _trained(model, data, lr, cfg, batch=32):
    train(model, data[0], data[1], lr, cfg["epochs"], batch, np.random.default_rng(2))
    return model


def exp_bad_init(data, cfg):
    res = {}
    for norm in (False, True):
        for scale in (0.1, 1.0, 10.0):
            model = mlp(np.random.default_rng(1), norm=norm, act="relu", scale=scale)
            losses = train(model, data[0], data[1], 0.1, cfg["epochs"], 32, np.random.default_rng(2))
            res[(norm, scale)] = (losses, accuracy(model, data[2], data[3]) if np.isfinite(losses[-1]) else float("nan"))
    return res


def exp_saturation(data, cfg):
    res = {}
    for norm in (False, True):
        model = mlp(np.random.default_rng(1), norm=norm, act="sigmoid", scale=3.0)
        sat = []

        def probe(m):
            with fastbn.no_grad():
                m.eval()
                m(data[2])
                m.train()
            sat.append(float(np.mean(m.saturation())))

        train(model, data[0], data[1], 0.5, cfg["epochs"], 32, np.random.default_rng(2), on_epoch=probe)
        res[norm] = (sat, accuracy(model, data[2], data[3]))
    return res


def exp_forgotten_eval(data, cfg):
    Xtr, ytr, Xte, yte = data
    model = _trained(mlp(np.random.default_rng(1), norm=True), data, 0.1, cfg)
    res = {}
    for b in (2, 8, 32):
        res[f"batch {b}"] = (accuracy(model, Xte, yte, b, "train"), accuracy(model, Xte, yte, b, "eval"))
    order = np.argsort(yte, kind="stable")  # batches of one class each (the test set sorted by label)
    Xs, ys = Xte[order], yte[order]
    tr = ev = n = 0
    for c in range(10):
        Xc, yc = Xs[ys == c], ys[ys == c]
        k = len(yc) - len(yc) % 8
        if k:
            tr += accuracy(model, Xc[:k], yc[:k], 8, "train") * k
            ev += accuracy(model, Xc[:k], yc[:k], 8, "eval") * k
            n += k
    res["one class a batch (8)"] = (tr / n, ev / n)
    return res


def exp_batch_size(data, cfg):
    """Batches of 2 vs 32, the same epochs (so 16x the steps at 2, with a 4x smaller rate)."""
    res = {}
    for net in ("mlp", "conv"):
        for norm in ("batch", "group", "layer"):
            for b in (2, 32):
                rng = np.random.default_rng(1)
                model = mlp(rng, norm) if net == "mlp" else convnet(rng, norm)
                lr = (0.1 if net == "mlp" else 0.05) * (1 if b == 32 else 0.25)
                epochs = cfg["epochs"] if net == "mlp" else cfg["conv_epochs"]
                train(model, data[0], data[1], lr, epochs, b, np.random.default_rng(2))
                res[(net, norm, b)] = accuracy(model, data[2], data[3])
    return res


# ---------------------------------------------------------------- report
def _plots(out, r):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, sweep = r["lr_sweep"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for norm, label in ((False, "no batch norm"), (True, "BatchNorm1d")):
        ax.semilogx(lrs, sweep[norm], "o-", label=label)
    ax.set(xlabel="learning rate", ylabel="test accuracy", title="MLP on digits: learning-rate sweep", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr_sweep.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, norm in zip(axes, (False, True)):
        for scale in (0.1, 1.0, 10.0):
            ax.semilogy(r["bad_init"][(norm, scale)][0], label=f"weights x{scale:g}")
        ax.set(title="BatchNorm1d" if norm else "no batch norm", xlabel="epoch")
    axes[0].set_ylabel("training loss")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bad_init.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for norm, label in ((False, "no batch norm"), (True, "BatchNorm1d")):
        ax.plot(np.arange(1, len(r["saturation"][norm][0]) + 1), r["saturation"][norm][0], "o-", label=label)
    ax.set(xlabel="epoch", ylabel="fraction |z| > 4", title="saturated sigmoid inputs (weights x3)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "saturation.png"), dpi=110)
    plt.close(fig)

    fe = r["forgotten_eval"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = np.arange(len(fe))
    ax.bar(xs - 0.2, [v[0] for v in fe.values()], 0.4, label="train mode (forgot eval())")
    ax.bar(xs + 0.2, [v[1] for v in fe.values()], 0.4, label="eval mode")
    ax.set_xticks(xs, list(fe), fontsize=8)
    ax.set(ylabel="test accuracy", ylim=(0, 1), title="a forgotten eval()")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "forgotten_eval.png"), dpi=110)
    plt.close(fig)

    bs = r["batch_size"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    names = ("batch", "group", "layer")
    xs = np.arange(3)
    for ax, net, labels in zip(axes, ("mlp", "conv"), (["BatchNorm1d", "GroupNorm(8)", "LayerNorm"],
                                                        ["BatchNorm2d", "GroupNorm(4)", "LayerNorm"])):
        for k, b in enumerate((2, 32)):
            ax.bar(xs + (k - 0.5) * 0.4, [bs[(net, n, b)] for n in names], 0.4, label=f"batch size {b}")
        ax.set_xticks(xs, labels)
        ax.set(ylim=(0, 1), title=f"{net}: small batches (eval mode)")
    axes[0].set_ylabel("test accuracy")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "batch_size.png"), dpi=110)
    plt.close(fig)


def _summary(r):
    lrs, sweep = r["lr_sweep"]
    lines = ["# digits: batch normalization's claims, reproduced", "",
             "| learning rate | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for norm, label in ((False, "no batch norm"), (True, "BatchNorm1d")):
        lines.append(f"| {label} | " + " | ".join(f"{a:.3f}" for a in sweep[norm]) + " |")
    lines += ["", "| initialization | no batch norm | BatchNorm1d |", "|---|---|---|"]
    for scale in (0.1, 1.0, 10.0):
        lines.append(f"| weights x{scale:g} | " + " | ".join(
            f"{r['bad_init'][(n, scale)][1]:.3f}" for n in (False, True)) + " |")
    lines += ["", "| sigmoid MLP (weights x3) | saturated after epoch 1 | last epoch | test accuracy |", "|---|---|---|---|"]
    for norm, label in ((False, "no batch norm"), (True, "BatchNorm1d")):
        sat, acc = r["saturation"][norm]
        lines.append(f"| {label} | {sat[0]:.3f} | {sat[-1]:.3f} | {acc:.3f} |")
    lines += ["", "| test batches | train mode (forgot eval()) | eval mode |", "|---|---|---|"]
    for k, (tr, ev) in r["forgotten_eval"].items():
        lines.append(f"| {k} | {tr:.3f} | {ev:.3f} |")
    lines += ["", "| test accuracy (eval mode) | batch 2 | batch 32 |", "|---|---|---|"]
    for net, norms in (("mlp", ("BatchNorm1d", "GroupNorm(8)", "LayerNorm")),
                       ("conv", ("BatchNorm2d", "GroupNorm(4)", "LayerNorm"))):
        for n, label in zip(("batch", "group", "layer"), norms):
            bs = r["batch_size"]
            lines.append(f"| {net} {label} | {bs[(net, n, 2)]:.3f} | {bs[(net, n, 32)]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="digits_out", help="folder for the PNGs and summary.md")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--conv-epochs", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="a tiny budget (for the test): 1 epoch, 2 learning rates")
    args = ap.parse_args(argv)
    cfg = {"epochs": args.epochs, "conv_epochs": args.conv_epochs, "lrs": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]}
    if args.quick:
        cfg.update(epochs=1, conv_epochs=1, lrs=[0.1, 1.0])
    os.makedirs(args.out, exist_ok=True)
    data = load_data()
    if args.quick:
        data = (data[0][:256], data[1][:256], data[2][:128], data[3][:128])
    t0 = time.time()
    np.seterr(over="ignore", invalid="ignore", divide="ignore")  # diverging runs are part of the sweep
    r = {"lr_sweep": exp_lr_sweep(data, cfg), "bad_init": exp_bad_init(data, cfg),
         "saturation": exp_saturation(data, cfg), "forgotten_eval": exp_forgotten_eval(data, cfg),
         "batch_size": exp_batch_size(data, cfg)}
    _plots(args.out, r)
    text = _summary(r)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}/*.png and summary.md in {time.time() - t0:.0f} s")
    return r


if __name__ == "__main__":
    main()

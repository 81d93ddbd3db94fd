"""Paddle's own ResNet-50 (paddle.vision.models.resnet50), trained and inferred as Paddle users do.

Compare with the spec ``resnet50``:

    python benchmarks/compare.py --backend paddle --impl paddle_resnet50 --model resnet50 \\
        --mode train --batch 16 --rounds 3 --target 1.05 --python /tmp/venvs/paddle/bin/python

Which spec: paddle.vision's resnet50 is torchvision's v1.5 (BottleneckBlock puts the stride on
the 3x3 conv, bias-free convs, an fc with bias), so ``resnet50``. The parameter count is
checked against the spec: 25,557,032 trainable + 53,120 BN statistics = 25,610,152.

Matched to the paddle backend's default execution mode ``dynamic`` (dygraph, no
paddle.jit.to_static). Data: samenet.data.synthetic_batch, NCHW as the backend feeds it,
int64 labels, both on the place before timing.

Train step: ``model(x)``, ``F.cross_entropy`` (mean softmax cross-entropy), ``backward()``,
``opt.step()``, ``opt.clear_grad()`` with paddle.optimizer.Momentum(lr, momentum,
weight_decay=L2Decay(wd)) over model.parameters(): the backend's update rule (g + wd * w fused
into v = m * v + g; w -= lr * v, on every trainable parameter). Inference: ``model.eval()``
and ``model(x)`` under ``paddle.no_grad()``. sync: nothing on the CPU (Paddle's dygraph CPU
kernels are synchronous), paddle.device.synchronize() on a GPU, as the backend.

How this differs from the harness backend (what a Paddle user writes):
    * Loss: F.cross_entropy. The backend writes logsumexp(s) - s_y with s = z - max(z),
      because Paddle's softmax clips z - max(z) at -64 (a numerical, not a speed matter:
      both are a handful of (N, 1000) ops).
    * clear_grad(): Paddle's default set_to_zero=True (zero-fills the gradients); the
      backend calls clear_grad(set_to_zero=False) (drops them).
    * Weights: Paddle's initializers (no effect on speed).
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

from samenet import zoo
from samenet.data import synthetic_batch


def _place(cell) -> str:
    return "cpu" if cell.device == "cpu" else f"gpu:{cell.device.partition(':')[2] or 0}"


def setup(cell):
    if cell.cpu_settings == "tuned":  # as the backend's configure()
        paddle.base.core.set_num_threads(cell.threads)
    mode = cell.exec_mode or "dynamic"
    if mode != "dynamic":
        raise ValueError(f"paddle_resnet50: exec mode {mode} not written (dynamic only)")
    place = _place(cell)
    paddle.set_device(place)
    paddle.seed(cell.seed)

    model = paddle.vision.models.resnet50(num_classes=1000)
    count = sum(int(np.prod(p.shape)) for p in model.parameters())
    spec_ir = zoo.load("resnet50", cell.input)
    spec_params = spec_ir.trainable_params + spec_ir.non_trainable_params
    print(f"paddle resnet50: {count:,} parameters; spec resnet50: {spec_params:,}", flush=True)
    assert count == spec_params, (count, spec_params)

    ir = zoo.load(cell.model, cell.input)
    x, y = synthetic_batch(ir, cell.batch, cell.seed)
    x = paddle.to_tensor(x, place=place)
    y = paddle.to_tensor(y, place=place)
    opt = paddle.optimizer.Momentum(learning_rate=cell.lr, momentum=cell.momentum, parameters=model.parameters(),
                                    weight_decay=paddle.regularizer.L2Decay(cell.weight_decay))

    def train():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.clear_grad()

    def infer():
        with paddle.no_grad():
            model(x)

    def sync():
        if place != "cpu":
            paddle.device.synchronize(place)

    if cell.mode == "train":
        model.train()
        return train, sync
    model.eval()
    return infer, sync


def outputs(cell, x):
    """Eval-mode, then train-mode logits on ``x`` with the spec's canonical weights, as numpy.

    For ``handwritten.py --check``. paddle.vision names its layers as torchvision does; BN
    statistics are ``_mean``/``_variance`` and the fc weight is stored (in, out)."""
    from samenet.cell import weights_for

    paddle.set_device(_place(cell))
    model = paddle.vision.models.resnet50(num_classes=1000)
    weights = weights_for(zoo.load("resnet50", cell.input), cell.seed)
    state = {}
    for name, param in model.state_dict().items():
        value = weights[name.replace("._mean", ".running_mean").replace("._variance", ".running_var")]
        value = value.T if name == "fc.weight" else value
        assert tuple(param.shape) == value.shape, (name, param.shape, value.shape)
        state[name] = np.ascontiguousarray(value, dtype=np.float32)
    model.set_state_dict(state)
    with paddle.no_grad():
        model.eval()
        evaluated = model(paddle.to_tensor(x)).numpy()
        model.train()
        return [evaluated, model(paddle.to_tensor(x)).numpy()]

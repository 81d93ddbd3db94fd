"""MXNet Gluon's own ResNet-50 (model_zoo.vision.resnet50_v1), trained and inferred as Gluon users do.

Compare with the spec ``resnet50_keras``:

    python benchmarks/compare.py --backend mxnet --impl mxnet_resnet50 --model resnet50_keras \\
        --mode train --batch 16 --rounds 3 --target 1.05 --python /tmp/venvs/mxnet/bin/python

Which spec: Gluon's resnet50_v1 is ResNet v1 (BottleneckV1 puts the stride on the first 1x1
conv), the architecture of ``resnet50_keras`` (3.86 GMACs at 224x224), not torchvision's v1.5
``resnet50`` (stride on the 3x3, 4.09 GMACs). Its parameter count matches neither spec:
Gluon gives a bias to the two 1x1 convs of each bottleneck (32 convs) but not to the stem,
the 3x3 and the downsample convs, where Keras (and the spec) have biases on all 53 convs:
25,575,912 trainable + 53,120 BN statistics = 25,629,032, i.e. the spec's 25,636,712 less
7,680 conv biases (64 stem + 3,776 on the 3x3s + 3,840 downsample). That is checked below.
The missing bias additions are ~0.03% of the work. Gluon's BN eps is 1e-5 (spec 1.001e-5).

Matched to the mxnet backend's default execution mode ``imperative`` (the first of its
exec_modes): the network is not hybridized. With ``--exec-mode hybridized`` it is
hybridized as the backend does (static_alloc=True, static_shape=True). Data:
samenet.data.synthetic_batch, NCHW as the backend feeds it (MXNet is NCHW), float32 labels,
on the context before timing.

Train step: ``autograd.record()``, gluon.loss.SoftmaxCrossEntropyLoss on the logits (one
loss per sample), ``loss.backward()``, ``trainer.step(batch_size)`` with a gluon.Trainer
"sgd" (learning_rate, momentum, wd): the gradient of the batch-mean cross-entropy, and
MXNet's SGD with wd on every parameter, as the backend. (The backend puts the mean loss in
its graph and steps with 1, and passes kvstore=None, which is what Trainer picks itself for
one device.) Inference: ``net(x)`` outside autograd (predict mode). sync: ``mx.nd.waitall()``,
as the backend.
"""

from __future__ import annotations

import ctypes

import mxnet as mx
from mxnet import autograd, gluon
from mxnet.gluon.model_zoo import vision

from samenet import zoo
from samenet.data import synthetic_batch

SPEC_PARAMS_LESS_BIASES = 7_680  # stem, 3x3 and downsample conv biases Gluon's v1 does not have


def setup(cell):
    if cell.cpu_settings == "tuned":  # as the backend's configure()
        mx.base._LIB.MXSetNumOMPThreads(ctypes.c_int(cell.threads))
    mode = cell.exec_mode or "imperative"
    if mode not in ("imperative", "hybridized"):
        raise ValueError(f"mxnet_resnet50: exec mode {mode} not written")
    ctx = mx.cpu() if cell.device == "cpu" else mx.gpu(int(cell.device.partition(":")[2] or 0))
    mx.random.seed(cell.seed)

    ir = zoo.load(cell.model, cell.input)
    x, y = synthetic_batch(ir, cell.batch, cell.seed)
    x = mx.nd.array(x, ctx=ctx, dtype="float32")
    y = mx.nd.array(y, ctx=ctx, dtype="float32")

    net = vision.resnet50_v1(classes=1000)
    net.initialize(mx.init.Xavier(), ctx=ctx)
    if mode == "hybridized":
        net.hybridize(static_alloc=True, static_shape=True)
    net(x)  # finishes Gluon's deferred initialisation (parameter shapes), before timing
    mx.nd.waitall()

    params = net.collect_params()
    count = sum(p.data(ctx).size for p in params.values())
    spec_ir = zoo.load("resnet50_keras", cell.input)
    spec_params = spec_ir.trainable_params + spec_ir.non_trainable_params
    print(f"gluon resnet50_v1: {count:,} parameters; spec resnet50_keras: {spec_params:,} "
          f"(differs by {spec_params - count:,}: conv biases)", flush=True)
    assert count == spec_params - SPEC_PARAMS_LESS_BIASES, (count, spec_params)

    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(params, "sgd", {"learning_rate": cell.lr, "momentum": cell.momentum,
                                            "wd": cell.weight_decay})
    batch = x.shape[0]

    def train():
        with autograd.record():
            loss = loss_fn(net(x), y)
        loss.backward()
        trainer.step(batch)

    def infer():
        net(x)

    return (train if cell.mode == "train" else infer), mx.nd.waitall

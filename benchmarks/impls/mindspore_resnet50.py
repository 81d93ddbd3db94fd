"""A hand-written MindSpore ResNet-50 (v1.5), written the way MindSpore's model repo writes it.

MindSpore ships no vision model zoo with the framework; its users take ResNet-50 from the
models repository (official/cv/ResNet, src/resnet.py), which this follows: Cells with
``construct``, a ResidualBlock (1x1, 3x3 carrying the stride, i.e. v1.5, 1x1 expand; a
conv + BN downsample), convs with no bias, BatchNorm2d(momentum=0.9), a 7x7/2 stem and a
3x3/2 max pool, ReduceMean over H and W, Flatten, Dense. Written here from scratch, no
harness code in the model.

Two variants, chosen by ``SAMENET_IMPL_NET``:
    * ``spec`` (the default): the spec's network, as a MindSpore user writes torchvision's
      ResNet-50: explicit pads as MindSpore's API writes them (Conv2d pad_mode="pad",
      padding=k // 2; MaxPool2d pad_mode="pad", padding=1) and BN eps 1e-5. The same
      function as the spec-built net (``handwritten.py --check``: identical eval- and
      train-mode logits on the canonical weights), so the ratio measures how the harness
      builds and runs a network, as every other row of benchmarks/README.md does
      (torchvision, paddle.vision and keras.applications compute their spec's function too).
    * ``model-repo``: the model repo's own choices, pad_mode="same" and eps 1e-4. "same" pads
      follow TF's rule (at 224x224 the 3x3/2 convs and the stem max pool pad 0 before / 1
      after, the 7x7/2 stem 2 / 3; the spec pads symmetrically, 1 and 3): the same output
      sizes and arithmetic, a different function. Its SAME max pool is cheaper in PyNative
      training than any exact form of the spec's pads that MindSpore 2.10 offers
      (benchmarks/README.md: "the rest of the gap").

Compare with the spec ``resnet50`` (torchvision's v1.5; parameter count checked: 25,557,032
trainable + 53,120 BN statistics = 25,610,152):

    python benchmarks/compare.py --backend mindspore --impl mindspore_resnet50 --model resnet50 \\
        --mode train --batch 16 --rounds 3 --target 1.05 --python /tmp/venvs/mindspore/bin/python

Matched to the mindspore backend's execution modes: ``pynative`` (default; the cells are
called directly) and ``graph`` (``--exec-mode graph``: the train Cell and the net each
wrapped in ms.jit, as the backend wraps its Cells; the first call compiles). The child
environment from samenet.runner sets the backend's env vars, TUNED_ENV's
ONEDNN_MAX_CPU_ISA=AVX2 included (without it oneDNN picks a reference NCHW conv kernel on
AVX-512 CPUs, ~70x slower); the tuned thread count is set as the backend's configure()
sets it. Data: samenet.data.synthetic_batch, NCHW as the backend feeds it, int32 labels (what
the sparse cross-entropy takes), made before timing.

Train step: nn.TrainOneStepCell(nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits(
sparse=True, reduction="mean")), nn.Momentum) called with (x, y). Inference:
``net.set_train(False)``, ``net(x)``. sync: the PyNative executor's sync() on the CPU,
ms.runtime.synchronize() on a device, as the backend.

How this differs from the harness backend and from the spec:
    * Max pools: nn.MaxPool2d(pad_mode="pad") here; the backend concatenates -inf borders
      and pools VALID in PyNative (nn.MaxPool2d's pad mode waits on view copies there: see
      the backend's _MaxPool), and in graph-mode training takes nn.MaxPool2d(pad_mode="pad") too.
    * Weight decay: one parameter group with the weight decay, so every trainable parameter
      is decayed, as the backend does (and as the harness contract says). The model repo's
      train.py often leaves BN gamma/beta and biases out of the decay (a few hundred
      thousand fewer element-wise updates: negligible).
    * Weights: the spec's canonical weights (samenet.cell.weights_for, the harness side's), set
      into this net by structure, so both sides compute on the same numbers. The values can
      move MindSpore's CPU step time (2026-11-24, one process, this net interleaved with
      itself: canonical weights 4651 ms against 4424 ms with MindSpore's default
      initialisers, pair median 1.039; 0.98-1.02 with flush-to-zero and denormals-are-zero
      set), and a comparison of two ways to build one network must hold the data fixed. In
      fresh processes the effect was below the VM's noise. ``SAMENET_IMPL_WEIGHTS=native``
      keeps the default initialisers.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("GLOG_v", "3")

import mindspore as ms  # noqa: E402
from mindspore import nn, ops  # noqa: E402

from samenet import zoo  # noqa: E402
from samenet.cell import weights_for  # noqa: E402
from samenet.data import synthetic_batch  # noqa: E402


# "spec": the spec's function (torchvision's pads and BN eps); "model-repo": the model repo's.
VARIANT = os.environ.get("SAMENET_IMPL_NET", "spec")
if VARIANT not in ("spec", "model-repo"):
    raise SystemExit(f"mindspore_resnet50: SAMENET_IMPL_NET={VARIANT!r}: expected 'spec' or 'model-repo'")
BN_EPS = 1e-5 if VARIANT == "spec" else 1e-4


def _pads(k):
    """nn.Conv2d / nn.MaxPool2d padding arguments for a k x k window."""
    return {"pad_mode": "pad", "padding": k // 2} if VARIANT == "spec" else {"pad_mode": "same"}


def _conv(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, has_bias=False, **_pads(k))


def _bn(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.9)


class ResidualBlock(nn.Cell):
    expansion = 4

    def __init__(self, in_channel, out_channel, stride=1):
        super().__init__()
        channel = out_channel // self.expansion
        self.conv1 = _conv(in_channel, channel, 1)
        self.bn1 = _bn(channel)
        self.conv2 = _conv(channel, channel, 3, stride)
        self.bn2 = _bn(channel)
        self.conv3 = _conv(channel, out_channel, 1)
        self.bn3 = _bn(out_channel)
        self.relu = nn.ReLU()
        self.down_sample = stride != 1 or in_channel != out_channel
        self.down_sample_layer = None
        if self.down_sample:
            self.down_sample_layer = nn.SequentialCell([_conv(in_channel, out_channel, 1, stride), _bn(out_channel)])

    def construct(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.down_sample:
            identity = self.down_sample_layer(identity)
        return self.relu(out + identity)


class ResNet(nn.Cell):
    def __init__(self, layer_nums, in_channels, out_channels, strides, num_classes):
        super().__init__()
        self.conv1 = _conv(3, 64, 7, 2)
        self.bn1 = _bn(64)
        self.relu = ops.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, **_pads(3))
        self.layer1 = self._make_layer(layer_nums[0], in_channels[0], out_channels[0], strides[0])
        self.layer2 = self._make_layer(layer_nums[1], in_channels[1], out_channels[1], strides[1])
        self.layer3 = self._make_layer(layer_nums[2], in_channels[2], out_channels[2], strides[2])
        self.layer4 = self._make_layer(layer_nums[3], in_channels[3], out_channels[3], strides[3])
        self.mean = ops.ReduceMean(keep_dims=True)
        self.flatten = nn.Flatten()
        self.end_point = nn.Dense(out_channels[3], num_classes, has_bias=True)

    @staticmethod
    def _make_layer(layer_num, in_channel, out_channel, stride):
        layers = [ResidualBlock(in_channel, out_channel, stride)]
        layers += [ResidualBlock(out_channel, out_channel, 1) for _ in range(1, layer_num)]
        return nn.SequentialCell(layers)

    def construct(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.mean(x, (2, 3))
        return self.end_point(self.flatten(x))


def resnet50(class_num=1000):
    return ResNet([3, 4, 6, 3], [64, 256, 512, 1024], [256, 512, 1024, 2048], [1, 2, 2, 2], class_num)


_BN_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def load_canonical(net, ir, weights) -> None:
    """Sets the spec's canonical weights into ``net``: layers matched in order (conv, BN and
    dense prefixes line up one to one with torchvision's), BN names mapped, shapes asserted."""
    own = list(net.parameters_and_names())
    own_layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name, _ in own))
    spec_layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in ir.params))
    assert len(own_layers) == len(spec_layers), (len(own_layers), len(spec_layers))
    layer = dict(zip(own_layers, spec_layers))
    for name, param in own:
        prefix, leaf = name.rsplit(".", 1)
        w = weights[f"{layer[prefix]}.{_BN_NAMES.get(leaf, leaf)}"]
        assert tuple(param.shape) == w.shape, (name, param.shape, w.shape)
        param.set_data(ms.Tensor(np.ascontiguousarray(w, dtype=np.float32)))


def _device_and_net(cell, canonical: bool):
    """Selects the cell's device and CPU settings, then builds the net (with the canonical weights)."""
    kind, _, index = cell.device.partition(":")
    target = {"cpu": "CPU", "cuda": "GPU", "ascend": "Ascend"}[kind]
    ms.set_device(target, int(index or 0))
    if cell.cpu_settings == "tuned":  # as the backend's configure()
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
        ms.device_context.cpu.op_tuning.threads_num(cell.threads)
    ms.set_seed(cell.seed)

    net = resnet50(1000)
    count = sum(int(np.prod(p.shape)) for p in net.get_parameters())
    spec_ir = zoo.load("resnet50", cell.input)
    spec_params = spec_ir.trainable_params + spec_ir.non_trainable_params
    print(f"mindspore resnet50 ({VARIANT}): {count:,} parameters; spec resnet50: {spec_params:,}", flush=True)
    assert count == spec_params, (count, spec_params)

    if canonical:
        load_canonical(net, spec_ir, weights_for(spec_ir, cell.seed))
    return target, net


def outputs(cell, x):
    """The net's logits on ``x`` in eval mode, then in train mode (batch statistics), as numpy.

    For ``handwritten.py --check``, which compares them with the spec-built net's."""
    _, net = _device_and_net(cell, canonical=True)  # whatever SAMENET_IMPL_WEIGHTS says
    net.set_train(False)
    evaluated = net(ms.Tensor(x)).asnumpy()
    net.set_train(True)
    return [evaluated, net(ms.Tensor(x)).asnumpy()]


def setup(cell):
    mode = cell.exec_mode or "pynative"
    if mode not in ("pynative", "graph"):
        raise ValueError(f"mindspore_resnet50: exec mode {mode} not written (pynative, graph)")
    # graph: ms.jit around the Cell, as the backend compiles it (first call compiles)
    wrap = ms.jit if mode == "graph" else (lambda c: c)
    target, net = _device_and_net(cell, os.environ.get("SAMENET_IMPL_WEIGHTS", "canonical") == "canonical")
    ir = zoo.load(cell.model, cell.input)
    x, y = synthetic_batch(ir, cell.batch, cell.seed)
    x, y = ms.Tensor(x), ms.Tensor(y.astype(np.int32))

    loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    opt = nn.Momentum([{"params": net.trainable_params(), "weight_decay": float(cell.weight_decay)}],
                      learning_rate=float(cell.lr), momentum=float(cell.momentum))
    train_net = nn.TrainOneStepCell(nn.WithLossCell(net, loss), opt)

    def sync():
        if target == "CPU":
            from mindspore.common.api import _pynative_executor

            _pynative_executor.sync()
        else:
            ms.runtime.synchronize()

    if cell.mode == "train":
        train_net.set_train(True)
        step = wrap(train_net)
        return (lambda: step(x, y)), sync
    net.set_train(False)
    infer = wrap(net)
    return (lambda: infer(x)), sync

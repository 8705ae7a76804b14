"""CIFAR classifiers with the exact layouts of the well-known public codebases.

Every model takes images in ``[0, 1]`` pixel space, shape ``(B, 3, 32, 32)``, and
applies its input normalization itself (``model.normalize``, a :class:`Normalize`
run first in ``forward``). Attacks and probes therefore work in pixel space, where
an epsilon ball means what the papers say it means.

The normalization buffers are *non-persistent*, so ``model.state_dict()`` has
exactly the keys of the public codebase each architecture comes from:

==========================  =========================================================
name                        layout
==========================  =========================================================
``resnet18``                kuangliu/pytorch-cifar ``ResNet18``
``resnet50``                kuangliu/pytorch-cifar ``ResNet50`` (Bottleneck; Engstrom et al. 2019)
``preact_resnet18``         Rice et al. 2020 (``overfitting`` repo) ``PreActResNet18``
``preact_resnet18_nobn``    fast-AT ``PreActResNet18`` (Wong et al. 2020 as RobustBench loads
                            it, Andriushchenko & Flammarion 2020): no final ``bn``, raw-input shortcut
``wrn-D-W``                 TRADES / MART ``WideResNet(depth=D, widen_factor=W)``, D = 6n+4
``dm-wrn-D-W``              DeepMind / RobustBench ``DMWideResNet(depth=D, width=W)``, Swish
``dm-preact-resnet18/34``   DeepMind / RobustBench ``DMPreActResNet``, Swish
``vgg16``                   kuangliu/pytorch-cifar ``VGG('VGG16')`` (with BatchNorm)
``dense121``                kuangliu/pytorch-cifar ``DenseNet121`` (growth rate 32)
``cnn-small``               atprobe's own small CPU-friendly CNN (4 conv + BN, FC 256)
``mlp``                     atprobe's own 3072-512-256-C ReLU MLP (no BN)
==========================  =========================================================

so a foreign checkpoint's ``state_dict`` loads with ``strict=True`` (after the usual
``module.`` prefix stripping, and for TRADES/MART WideResNets after dropping their
unused ``sub_block1.*`` keys; both are the checkpoint loader's job).

No layer uses ``inplace=True`` and no residual sum uses ``+=``: in-place ops on
activations break the ``torch.func`` transforms (``vmap``/``grad`` for per-sample
gradients, ``functional_call``) that the probes rely on.

Layout: one module per family (``resnet``, ``preact_resnet``, ``wide_resnet``,
``dm_wide_resnet``, ``dm_preact_resnet``, ``vgg``, ``densenet``, ``small`` for cnn-small
and mlp); ``layers`` holds what they share (input geometry, :class:`BatchNorm2d`,
:class:`Normalize` and the ``Classifier`` base that sets it up, optional dropout, the
residual stage builder, the ``SAME`` 3x3 convolution of the DeepMind models); ``registry`` maps names
to builders (:func:`build_model`, :func:`canonical_arch`, :func:`list_architectures`,
:func:`weight_layers`). Import from ``atprobe.models``: every public name is re-exported here.
"""

from atprobe.models.densenet import Bottleneck, DenseNet, Transition
from atprobe.models.dm_preact_resnet import DMPreActBlock, DMPreActResNet
from atprobe.models.dm_wide_resnet import (
    DM_CIFAR10_MEAN,
    DM_CIFAR10_STD,
    DM_CIFAR100_MEAN,
    DM_CIFAR100_STD,
    DMBlockGroup,
    DMWideBlock,
    DMWideResNet,
)
from atprobe.models.layers import IMAGE_SIZE, IN_CHANNELS, BatchNorm2d, Normalize
from atprobe.models.preact_resnet import InputShortcutPreActBlock, PreActBlock, PreActResNet
from atprobe.models.registry import (
    DM_WRN_PATTERN,
    WRN_PATTERN,
    build_model,
    canonical_arch,
    list_architectures,
    weight_layers,
)
from atprobe.models.resnet import BasicBlock, ResNet, ResNetBottleneck
from atprobe.models.small import MLP, SmallCNN
from atprobe.models.vgg import VGG
from atprobe.models.wide_resnet import NetworkBlock, WideBasicBlock, WideResNet

__all__ = [
    "DM_CIFAR10_MEAN",
    "DM_CIFAR10_STD",
    "DM_CIFAR100_MEAN",
    "DM_CIFAR100_STD",
    "DM_WRN_PATTERN",
    "IMAGE_SIZE",
    "IN_CHANNELS",
    "MLP",
    "VGG",
    "BasicBlock",
    "BatchNorm2d",
    "Bottleneck",
    "DMBlockGroup",
    "DMPreActBlock",
    "DMPreActResNet",
    "DMWideBlock",
    "DMWideResNet",
    "DenseNet",
    "InputShortcutPreActBlock",
    "NetworkBlock",
    "Normalize",
    "PreActBlock",
    "PreActResNet",
    "ResNet",
    "ResNetBottleneck",
    "SmallCNN",
    "Transition",
    "WideBasicBlock",
    "WideResNet",
    "WRN_PATTERN",
    "build_model",
    "canonical_arch",
    "list_architectures",
    "weight_layers",
]

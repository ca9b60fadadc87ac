"""ResNet v1.5 with virtual batch norm, plus small CIFAR-style and 1-D variants for CPU studies.

Every submodule has an explicit name (``conv_init``, ``bn_init``, ``stage1_block1/conv1``,
``.../proj_bn``, ``head``...), so parameter paths are stable and optimizer parameter groups never
depend on Flax's automatic names.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Section 2.1.2 (batch norm, gamma_0,
  virtual batch size 64) and Appendix C (ResNet v1.5 versus v1.0 ablation).
  He et al. 2016, "Deep Residual Learning for Image Recognition" (ResNet, CIFAR ResNet-20).
  Goyal et al. 2017, "Accurate, Large Minibatch SGD" (zero-initialised last BN scale per block).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from batchlab.models.normalization import VirtualBatchNorm

ModuleDef = Any
Dtype = Any

# He initialisation on fan_out with an untruncated normal, as in the MLPerf ResNet references.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The MLPerf JAX ResNet head: normal(0.01) kernel, zero bias.
dense_kernel_init = nn.initializers.normal(stddev=0.01)


def _spatial(value: int, rank: int) -> tuple[int, ...]:
    return (value,) * rank


def _symmetric_padding(kernel: int, rank: int) -> list[tuple[int, int]]:
    # Symmetric padding (TF official ResNet "fixed padding") rather than 'SAME': with stride 2 on an
    # even input 'SAME' pads only on the right, which shifts features by half a pixel per stage.
    return [((kernel - 1) // 2, kernel // 2)] * rank


def _conv(filters: int, kernel: int, strides: int, rank: int, dtype: Dtype, name: str) -> nn.Conv:
    return nn.Conv(
        filters,
        _spatial(kernel, rank),
        strides=_spatial(strides, rank),
        padding=_symmetric_padding(kernel, rank),
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34, ResNet-20, ResNet1D).

    The spatial rank (1-D or 2-D) is read from the input, so the same block serves images and
    sequences.

    Attributes:
      filters: output channels.
      strides: stride of the first convolution (and of the projection shortcut).
      norm: a VirtualBatchNorm partial with the training mode and hyperparameters already bound.
      gamma_0: initial scale of ``bn2``, the last batch norm of the block.
      kernel_size: size of both convolutions along each spatial axis.
      dtype: compute dtype.
    """

    filters: int
    strides: int
    norm: ModuleDef
    gamma_0: float = 1.0
    kernel_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        rank = x.ndim - 2
        residual = x
        y = _conv(self.filters, self.kernel_size, self.strides, rank, self.dtype, "conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = _conv(self.filters, self.kernel_size, 1, rank, self.dtype, "conv2")(y)
        y = self.norm(scale_init=nn.initializers.constant(self.gamma_0), name="bn2")(y)
        if residual.shape != y.shape:
            residual = _conv(self.filters, 1, self.strides, rank, self.dtype, "proj_conv")(residual)
            residual = self.norm(name="proj_bn")(residual)
        return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
    """ResNet v1.5 bottleneck: 1x1, 3x3 (carrying the stride), 1x1 with 4x expansion.

    Attributes:
      filters: channels of the inner convolutions; the block outputs ``4 * filters``.
      strides: stride of the 3x3 convolution (v1.5; v1.0 puts it on the first 1x1).
      norm: a VirtualBatchNorm partial with the training mode and hyperparameters already bound.
      gamma_0: initial scale of ``bn3``, the last batch norm of the block.
      dtype: compute dtype.
    """

    filters: int
    strides: int
    norm: ModuleDef
    gamma_0: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        rank = x.ndim - 2
        residual = x
        y = _conv(self.filters, 1, 1, rank, self.dtype, "conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = _conv(self.filters, 3, self.strides, rank, self.dtype, "conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = _conv(4 * self.filters, 1, 1, rank, self.dtype, "conv3")(y)
        y = self.norm(scale_init=nn.initializers.constant(self.gamma_0), name="bn3")(y)
        if residual.shape != y.shape:
            residual = _conv(4 * self.filters, 1, self.strides, rank, self.dtype, "proj_conv")(
                residual
            )
            residual = self.norm(name="proj_bn")(residual)
        return nn.relu(residual + y)


def _norm_partial(module: Any, train: bool) -> ModuleDef:
    return functools.partial(
        VirtualBatchNorm,
        virtual_batch_size=module.virtual_batch_size,
        momentum=module.bn_momentum,
        epsilon=module.bn_epsilon,
        use_running_average=not train,
        dtype=module.dtype,
        axis_name=module.bn_axis_name,
    )


class ResNet(nn.Module):
    """ResNet v1.5 image classifier with virtual batch norm.

    Layout: stem (``conv_init``, ``bn_init``, ReLU, and for the ImageNet stem a 3x3/2 max pool),
    stages ``stage{i}_block{j}`` whose first block strides by 2 from the second stage on, global
    average pool, and a ``head`` Dense with bias. Convolutions have no bias. Logits are returned in
    float32 whatever the compute dtype, so the loss is always computed in float32.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block_cls: BottleneckBlock or BasicBlock.
      num_classes: outputs of the head.
      num_filters: channels of the stem and first stage; doubled at every stage.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
      virtual_batch_size: batch norm sub-batch size (64 in the paper); None uses the whole batch.
      bn_momentum: running-statistics decay rho (0.9 in the LARS pipeline).
      bn_epsilon: batch norm epsilon (1e-5 in the LARS pipeline).
      gamma_0: initial scale of the last batch norm of every residual block (0.0 in the LARS
        pipeline, 0.4138 in the paper's Nesterov configurations A/B, 1.0 elsewhere).
      stem: 'imagenet' (7x7/2 convolution then 3x3/2 max pool) or 'cifar' (3x3/1, no pool).
      bn_axis_name: mapped axis over which batch norm shares statistics (pmap/shard_map).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ResNet20(virtual_batch_size=None)
      >>> x = jnp.zeros((2, 8, 8, 3))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
      >>> logits.shape
      (2, 10)

    References:
      Nado et al. 2021, Section 2.1.2; He et al. 2016.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int = 1000
    num_filters: int = 64
    dtype: Dtype = jnp.float32
    virtual_batch_size: int | None = 64
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    gamma_0: float = 1.0
    stem: str = "imagenet"
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Classifies a batch of images.

        Args:
          x: images of shape (batch, height, width, channels).
          train: normalise with (virtual) batch statistics and update ``batch_stats``; apply
            with ``mutable=['batch_stats']``. False uses the running statistics.

        Returns:
          float32 logits of shape (batch, num_classes).
        """
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNet.stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        norm = _norm_partial(self, train)
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = _conv(self.num_filters, 7, 2, 2, self.dtype, "conv_init")(x)
        else:
            x = _conv(self.num_filters, 3, 1, 2, self.dtype, "conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(
                    filters=self.num_filters * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    norm=norm,
                    gamma_0=self.gamma_0,
                    dtype=self.dtype,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(
            self.num_classes,
            kernel_init=dense_kernel_init,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="head",
        )(x)
        return x.astype(jnp.float32)


class ResNet1D(nn.Module):
    """A small 1-D residual network for sequence inputs such as mnist1d.

    Layout: ``conv_init`` (kernel ``stem_kernel_size``), ``bn_init``, ReLU, then stages of
    BasicBlocks ``stage{i}_block{j}`` that keep ``num_filters`` channels and halve the length at
    the first block of every stage after the first, global average pool over length, ``head``.
    The width stays constant because these models exist to make many-trial studies affordable on a
    CPU (16 channels run about 16-26k examples/s here).

    Attributes:
      stage_sizes: BasicBlocks per stage.
      num_classes: outputs of the head.
      num_filters: channels everywhere.
      kernel_size: convolution size inside the blocks.
      stem_kernel_size: size of the stem convolution.
      dtype: compute dtype; parameters stay float32.
      virtual_batch_size: batch norm sub-batch size; None uses the whole batch.
      bn_momentum: running-statistics decay rho.
      bn_epsilon: batch norm epsilon.
      gamma_0: initial scale of ``bn2``, the last batch norm of every block.
      bn_axis_name: mapped axis over which batch norm shares statistics.

    References:
      Nado et al. 2021, Section 2.1.2 (virtual batch norm, gamma_0); Greydanus 2020, "Scaling
      down deep learning" (mnist1d).
    """

    stage_sizes: Sequence[int] = (1, 1, 1)
    num_classes: int = 10
    num_filters: int = 16
    kernel_size: int = 3
    stem_kernel_size: int = 5
    dtype: Dtype = jnp.float32
    virtual_batch_size: int | None = 64
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    gamma_0: float = 1.0
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Classifies a batch of sequences.

        Args:
          x: shape (batch, length) or (batch, length, channels).
          train: use (virtual) batch statistics and update ``batch_stats``.

        Returns:
          float32 logits of shape (batch, num_classes).
        """
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(
                f"ResNet1D expects (batch, length) or (batch, length, channels), got {x.shape}"
            )
        norm = _norm_partial(self, train)
        x = jnp.asarray(x, self.dtype)
        x = _conv(self.num_filters, self.stem_kernel_size, 1, 1, self.dtype, "conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = BasicBlock(
                    filters=self.num_filters,
                    strides=2 if i > 0 and j == 0 else 1,
                    norm=norm,
                    gamma_0=self.gamma_0,
                    kernel_size=self.kernel_size,
                    dtype=self.dtype,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x)
        x = jnp.mean(x, axis=1)
        x = nn.Dense(
            self.num_classes,
            kernel_init=dense_kernel_init,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="head",
        )(x)
        return x.astype(jnp.float32)


ResNet18: Callable[..., ResNet] = functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock
)
ResNet34: Callable[..., ResNet] = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock
)
ResNet50: Callable[..., ResNet] = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock
)
# CIFAR ResNet-20 (He et al. 2016, Section 4.2) with projection shortcuts instead of zero padding,
# so that every block has the same structure as the ImageNet models.
ResNet20: Callable[..., ResNet] = functools.partial(
    ResNet,
    stage_sizes=(3, 3, 3),
    block_cls=BasicBlock,
    num_filters=16,
    num_classes=10,
    stem="cifar",
)

"""Attention Free Transformer (AFT) vision models for timm.

A PyTorch implementation of the AFT ViTs of `An Attention Free Transformer`
(Zhai et al., 2021) - https://arxiv.org/abs/2105.14103 - written the way timm's
``vision_transformer.py`` is: one model class, ``_cfg`` / ``generate_default_cfgs``,
``checkpoint_filter_fn``, ``build_model_with_cfg`` and ``@register_model``
entrypoints. DeiT's layout is kept (patch 16, pre-norm blocks, MLP ratio 4,
DeiT / timm init, drop path); only attention is replaced by an AFT token mixer:

* ``full``: AFT-full, one bias per token pair, factorized ``w = U V^T`` (rank 128).
  Class token + learned position embedding, class-token pooling (as DeiT).
* ``local``: AFT-local over the 2-D patch grid, the same factorized bias kept
  inside a 7 x 7 window and 0 outside. Class token + position embedding.
* ``simple``: AFT-simple, no position bias. Class token + position embedding.
* ``conv``: AFT-conv, ``num_heads`` heads with one key channel each and a
  per-head ``kernel_size``^2 bias. No class token, no position embedding, global
  average pooling: fully convolutional, so it runs at any input size that is a
  multiple of the patch size with no resampling at all.

Choices the paper leaves open, made here:

* AFT-conv's raw kernel starts as N(0, 1); its scale is normalized away by the
  re-parameterization ``gamma * (w - mean) / std + beta`` (gamma = beta = 0 at init,
  so every AFT-conv block starts as AFT-simple). The std is the population std
  over the s x s window, with eps = 1e-5 inside the square root. The raw kernel
  is excluded from weight decay: decay would only shrink it towards that eps.
* AFT-full / AFT-local bias factors start as truncated N(0, .02), like timm's
  ``pos_embed`` (so w ~ 0 at init), one (T, 128) pair per block, and are excluded
  from weight decay like ``pos_embed``.
* AFT-local's window is the centred 7 x 7 square of patches (``|dy|, |dx| <= 3``,
  the same convention as AFT-conv's kernel). The class token is inside every
  window, as query and as key: it has no grid position, so its learned bias
  always applies.
* AFT-conv applies the final LayerNorm to the tokens before average pooling (as
  DeiT does before its class token), so ``forward_features`` returns normalized
  tokens for every variant.
* q, k, v come from one fused ``qkv`` linear layer (ordered q, k, v; for AFT-conv
  k has ``num_heads`` channels), as timm's Attention does.
* Parameter counts follow from these choices and match the paper's Table 7 within
  0.1M (0.17M for the base model).

Hacked together by the aft_vit developers; layout after timm's vision_transformer.py
by Ross Wightman.
"""
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.jit import Final

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    HybridEmbed,
    LayerNorm,
    LayerScale,
    Mlp,
    PatchEmbed,
    calculate_drop_path_rates,
    get_act_layer,
    get_device_dtype,
    get_norm_layer,
    register_notrace_function,
    resample_abs_pos_embed,
    resample_patch_embed,
    to_2tuple,
    trunc_normal_,
)
from timm.layers.pool1d import global_pool_nlc
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, named_apply
from timm.models._input import get_pretrained_grid_size, update_model_args, update_model_input_size
from timm.models.vision_transformer import get_init_weights_vit
from timm.models.vision_transformer_hybrid import ConvStem

from aft_vit.checkpoint import check_weights_fit, explain_pretrained_errors
from aft_vit.labels import imagenet_descriptions
from aft_vit.layers import MixerArgs, get_mixer

__all__ = ['AftVisionTransformer', 'AftBlock', 'checkpoint_filter_fn', 'check_image_input']

_logger = logging.getLogger(__name__)

POOL_TYPES = ('', 'avg', 'avgmax', 'max', 'token')


@register_notrace_function
def check_image_input(
        x: torch.Tensor,
        in_chans: int,
        img_size: Tuple[int, int],
        patch_size: Tuple[int, int],
        fixed_size: bool,
        pad: bool,
) -> None:
    """Raise a ValueError that says what is wrong with an input batch and how to fix it."""
    if x.dim() != 4:
        raise ValueError(f'expected a (B, C, H, W) image batch, got a tensor of shape {x.shape}')
    height, width = x.shape[-2], x.shape[-1]
    if x.shape[1] != in_chans:
        raise ValueError(
            f'expected {in_chans} input channels, got {x.shape[1]} (input shape {x.shape}); '
            f'create the model with in_chans={x.shape[1]} (pretrained weights are adapted to it)')
    if fixed_size and (height != img_size[0] or width != img_size[1]):
        raise ValueError(
            f'this model takes a fixed input size of {img_size[0]}x{img_size[1]}, got {height}x{width}; '
            f'create it with img_size=({height}, {width}), call model.set_input_size(img_size=({height}, {width})), '
            'or create it with dynamic_img_size=True')
    if not pad and (height % patch_size[0] != 0 or width % patch_size[1] != 0):
        raise ValueError(
            f'input size {height}x{width} is not a multiple of the patch size {patch_size[0]}x{patch_size[1]}; '
            'resize or crop the image, or create the model with dynamic_img_pad=True')


def conv_stem_embed(
        img_size: Union[int, Tuple[int, int]],
        patch_size: Union[int, Tuple[int, int]],
        in_chans: int,
        embed_dim: int,
        stem_channels: Sequence[int],
        **embed_args,
) -> HybridEmbed:
    """A small convolutional stem in place of the patchify convolution, as timm's hybrid ViTs build theirs
    (``ConvStem`` in a ``HybridEmbed``): one 3x3 stride-2 conv-BN-ReLU layer per entry of ``stem_channels``, then
    a 1x1 convolution to ``embed_dim``. Its total stride is ``patch_size``, so the tokens are the patches'."""
    img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
    depth, stride = len(stem_channels), 2 ** len(stem_channels)
    if patch_size != (stride, stride):
        raise ValueError(f'a conv stem of {depth} stride-2 layers (stem_channels={tuple(stem_channels)}) has a stride '
                         f'of {stride}, but patch_size={patch_size}: pass patch_size={stride}, or one stem channel '
                         'count per halving of the patch size')
    dd = {k: embed_args.pop(k) for k in ('device', 'dtype') if k in embed_args}
    stem = ConvStem(in_chans, depth=depth + 1, channels=(*stem_channels, embed_dim), kernel_size=(3,) * depth + (1,),
                    stride=(2,) * depth + (1,), **dd)
    stem.num_features = embed_dim  # the width HybridEmbed reads when it is not told the feature size by a probe
    feature_size = (img_size[0] // stride, img_size[1] // stride)
    return HybridEmbed(stem, img_size=img_size, patch_size=1, feature_size=feature_size, feature_ratio=stride,
                       in_chans=in_chans, embed_dim=embed_dim, proj=False, **embed_args, **dd)


def _token_layout(mixer_cls: type, class_token: Optional[bool], pos_embed: Optional[str], global_pool: Optional[str]
                  ) -> Tuple[bool, str, str]:
    """Class token, position embedding and pooling, each defaulted from what the mixer declares, and checked."""
    class_token = mixer_cls.default_class_token if class_token is None else class_token
    pos_embed = ('learn' if mixer_cls.default_class_token else 'none') if pos_embed is None else pos_embed
    global_pool = ('token' if class_token else 'avg') if global_pool is None else global_pool
    if global_pool not in POOL_TYPES:
        raise ValueError(f'Unknown global_pool {global_pool!r}, expected one of {POOL_TYPES}')
    if global_pool == 'token' and not class_token:
        raise ValueError("global_pool='token' needs a class token (class_token=True)")
    if pos_embed not in ('', 'none', 'learn'):
        raise ValueError(f"pos_embed must be 'learn' or 'none', got {pos_embed!r}")
    return class_token, pos_embed, global_pool


class AftBlock(nn.Module):
    """Pre-norm transformer block with an AFT token mixer in place of attention."""

    def __init__(
            self,
            dim: int,
            mixer_layer: Callable[..., nn.Module],
            mlp_ratio: float = 4.,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            init_values: Optional[float] = None,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = LayerNorm,
            mlp_layer: Type[nn.Module] = Mlp,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.mixer = mixer_layer(dim, proj_drop=proj_drop, **dd)
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            bias=proj_bias,
            drop=proj_drop,
            **dd,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.mixer(self.norm1(x), feat_size)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class AftVisionTransformer(nn.Module):
    """Vision Transformer with AFT token mixers (AFT-full, -local, -simple or -conv).

    Args:
        img_size: Input image size (the nominal size for AFT-conv, which takes any multiple of the patch).
        patch_size: Patch size (the stride from pixels to tokens).
        stem_channels: A conv stem in place of the patchify convolution (:func:`conv_stem_embed`): the widths of
            its stride-2 3x3 layers, one per halving of ``patch_size``. None: the paper's patchify convolution.
        in_chans: Number of image input channels.
        num_classes: Number of classes for classification head (0 for none).
        global_pool: 'token', 'avg', 'avgmax', 'max' or '' (none); default 'token' with a class token, else 'avg'.
        embed_dim: Embedding dimension.
        depth: Number of blocks.
        mixer: Token mixer, a name registered in ``aft_vit.layers.MIXERS`` ('full', 'local', 'simple', 'conv').
        num_heads: AFT-conv heads (key channels, one kernel each).
        kernel_size: AFT-conv kernel size s (odd).
        bias_rank: Rank of the factorized AFT-full / AFT-local bias.
        local_window: AFT-local window size in patches (odd).
        mlp_ratio: Ratio of MLP hidden dim to embedding dim.
        qkv_bias: Bias in the q, k, v projection.
        proj_bias: Bias in the output projections.
        init_values: LayerScale init value (disabled if None).
        class_token: Use a class token; default: the mixer's ``default_class_token`` (False for conv).
        pos_embed: 'learn' or 'none'; default 'learn' with a class token by default, else 'none'.
        dynamic_img_size: Accept any input size by resampling position embedding and biases on the fly
            (always on for AFT-conv, which needs no resampling).
        dynamic_img_pad: Pad inputs that are not a multiple of the patch size.
        drop_rate: Head dropout rate.
        pos_drop_rate: Dropout after the position embedding.
        proj_drop_rate: Dropout after projections and in the MLP.
        drop_path_rate: Stochastic depth rate (linear decay over depth).
        weight_init: timm ViT init mode ('', 'jax', 'jax_nlhb', 'moco', 'reset' or 'skip').
        norm_layer: Normalization layer (LayerNorm).
        act_layer: MLP activation (GELU).
    """
    dynamic_img_size: Final[bool]

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            stem_channels: Optional[Sequence[int]] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Optional[str] = None,
            embed_dim: int = 384,
            depth: int = 12,
            mixer: str = 'conv',
            num_heads: int = 16,
            kernel_size: int = 11,
            bias_rank: int = 128,
            local_window: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_bias: bool = True,
            init_values: Optional[float] = None,
            class_token: Optional[bool] = None,
            pos_embed: Optional[str] = None,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            weight_init: str = '',
            norm_layer: Optional[Union[str, Type[nn.Module]]] = None,
            act_layer: Optional[Union[str, Type[nn.Module]]] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        mixer_cls = get_mixer(mixer)
        class_token, pos_embed, global_pool = _token_layout(mixer_cls, class_token, pos_embed, global_pool)
        norm_layer = get_norm_layer(norm_layer) or LayerNorm
        act_layer = get_act_layer(act_layer) or nn.GELU

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.mixer_type = mixer
        self.num_prefix_tokens = 1 if class_token else 0
        self.has_class_token = class_token
        # without position embedding or per-token mixer parameters nothing depends on the grid (AFT-conv)
        self.dynamic_img_size = dynamic_img_size or (pos_embed in ('', 'none') and not mixer_cls.grid_params)
        self.grad_checkpointing = False

        self._init_embeddings(img_size, patch_size, in_chans, embed_dim, dynamic_img_pad, class_token, pos_embed,
                              pos_drop_rate, stem_channels, dd)
        reduction = self.patch_embed.feat_ratio()

        mixer_layer = mixer_cls.layer(MixerArgs(
            grid_size=self.patch_embed.grid_size,
            num_prefix_tokens=self.num_prefix_tokens,
            num_heads=num_heads,
            kernel_size=kernel_size,
            bias_rank=bias_rank,
            local_window=local_window,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
        ))

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            AftBlock(embed_dim, mixer_layer, mlp_ratio=mlp_ratio, proj_bias=proj_bias, proj_drop=proj_drop_rate,
                     init_values=init_values, drop_path=dpr[i], act_layer=act_layer, norm_layer=norm_layer, **dd)
            for i in range(depth)])
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.weight_init_mode = 'reset' if weight_init == 'skip' else weight_init
        if weight_init != 'skip':
            self.init_weights(needs_reset=False)

    def _init_embeddings(self, img_size, patch_size, in_chans: int, embed_dim: int, dynamic_img_pad: bool,
                         class_token: bool, pos_embed: str, pos_drop_rate: float,
                         stem_channels: Optional[Sequence[int]], dd: Dict[str, Any]) -> None:
        """The patch embedding (or conv stem; NHWC out when the input size is dynamic), class token and position
        embedding."""
        embed_args = dict(strict_img_size=False, output_fmt='NHWC') if self.dynamic_img_size else {}
        if stem_channels:
            self.patch_embed = conv_stem_embed(img_size, patch_size, in_chans, embed_dim, stem_channels,
                                               dynamic_img_pad=dynamic_img_pad, **embed_args, **dd)
        else:
            self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          embed_dim=embed_dim, dynamic_img_pad=dynamic_img_pad, **embed_args, **dd)
        self.input_stride = self.patch_embed.feat_ratio(as_scalar=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        if pos_embed == 'learn':
            self.pos_embed = nn.Parameter(torch.empty(1, num_patches + self.num_prefix_tokens, embed_dim, **dd))
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """DeiT / timm ViT init: trunc-normal(.02) linear weights and pos_embed, class token N(0, 1e-6)."""
        mode = mode or self.weight_init_mode
        if mode not in ('jax', 'jax_nlhb', 'moco', 'reset', ''):
            raise ValueError(f'Unknown weight_init mode {mode!r}')
        head_bias = -math.log(self.num_classes) if 'nlhb' in mode and self.num_classes > 0 else 0.
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        named_apply(get_init_weights_vit(mode, head_bias, needs_reset=needs_reset), self)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Position parameters: pos_embed, class token and those the mixer declares (bias factors, raw kernels)."""
        mixer_params = get_mixer(self.mixer_type).no_weight_decay_params
        return {'pos_embed', 'cls_token'} | {f'blocks.*.mixer.{name}' for name in mixer_params}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay: embeddings, then one group per block, then the final norm."""
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f'Unknown global_pool {global_pool!r}, expected one of {POOL_TYPES}')
            if global_pool == 'token' and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token; this model has none")
            self.global_pool = global_pool
            update_model_args(self, global_pool=global_pool)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def set_input_size(
            self,
            img_size: Optional[Tuple[int, int]] = None,
            patch_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        """Change the nominal input size (and patch size), resampling pos_embed and the AFT bias factors."""
        prev_grid_size = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        self.input_stride = self.patch_embed.feat_ratio(as_scalar=False)
        new_grid_size = self.patch_embed.grid_size
        if self.pos_embed is not None and new_grid_size != prev_grid_size:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(
                self.pos_embed.detach(),
                new_size=new_grid_size,
                old_size=prev_grid_size,
                num_prefix_tokens=self.num_prefix_tokens,
                verbose=True,
            ), requires_grad=self.pos_embed.requires_grad)
        for blk in self.blocks:
            blk.mixer.set_grid_size(new_grid_size)
        update_model_input_size(self, self.patch_embed.img_size, patch_size=patch_size)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patchify, add prefix tokens and position embedding; returns (B, N, C) tokens and the patch grid."""
        check_image_input(
            x,
            self.in_chans,
            self.patch_embed.img_size,
            self.input_stride,
            not self.dynamic_img_size,
            self.patch_embed.dynamic_img_pad,
        )
        x = self.patch_embed(x)
        if self.dynamic_img_size:
            feat_size = (x.shape[1], x.shape[2])
            pos_embed = self.pos_embed
            if pos_embed is not None:
                pos_embed = resample_abs_pos_embed(
                    pos_embed,
                    new_size=[x.shape[1], x.shape[2]],
                    old_size=[self.patch_embed.grid_size[0], self.patch_embed.grid_size[1]],
                    num_prefix_tokens=self.num_prefix_tokens,
                )
            x = x.flatten(1, 2).contiguous()  # NHWC out of the conv is a strided view: every later op would pay
        else:
            feat_size = (self.patch_embed.grid_size[0], self.patch_embed.grid_size[1])
            pos_embed = self.pos_embed
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if pos_embed is not None:
            x = x + pos_embed
        return self.pos_drop(x), feat_size

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that also returns the outputs of the blocks in ``indices``.

        Args:
            x: Input image tensor.
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            return_prefix_tokens: Return (spatial, prefix) pairs for models with a class token.
            norm: Apply the final norm to intermediates.
            stop_early: Stop after the last block needed.
            output_fmt: 'NCHW' (spatial maps) or 'NLC' (tokens).
            intermediates_only: Only return intermediates.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        x, feat_size = self._embed(x)
        if torch.jit.is_scripting() or not stop_early:
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, feat_size)
            else:
                x = blk(x, feat_size)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix_tokens = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == 'NCHW':
            batch = x.shape[0]
            intermediates = [
                y.reshape(batch, feat_size[0], feat_size[1], -1).permute(0, 3, 1, 2).contiguous()
                for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens and self.num_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally norm and head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images to normalized (B, N, C) tokens (class token first where there is one)."""
        x, feat_size = self._embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, feat_size)
            else:
                x = blk(x, feat_size)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


def _resample_token_grid(
        value: torch.Tensor,
        model: AftVisionTransformer,
        patch_weight: Optional[torch.Tensor],
        interpolation: str,
        antialias: bool,
) -> torch.Tensor:
    """Resample a (1, T, D) or (T, D) per-token tensor (pos_embed, bias factor) to the model's grid."""
    squeeze = value.dim() == 2
    value = value.unsqueeze(0) if squeeze else value
    num_prefix = model.num_prefix_tokens
    old_grid = get_pretrained_grid_size(model, patch_weight, value.shape[1] - num_prefix)
    new_grid = model.patch_embed.grid_size
    if value.shape[1] != num_prefix + new_grid[0] * new_grid[1] or (old_grid is not None and old_grid != new_grid):
        value = resample_abs_pos_embed(
            value,
            new_size=new_grid,
            old_size=old_grid,
            num_prefix_tokens=num_prefix,
            interpolation=interpolation,
            antialias=antialias,
            verbose=True,
        )
    return value.squeeze(0) if squeeze else value


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: AftVisionTransformer,
        interpolation: str = 'bicubic',
        antialias: bool = True,
) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: unwrap training checkpoints, resample the patch embedding,
    ``pos_embed`` and the AFT-full / AFT-local bias factors when the grid (image or patch size) differs,
    and refuse weights that belong to another architecture."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    patch_weight = state_dict.get('patch_embed.proj.weight')
    grid_params = tuple(f'mixer.{name}' for name in get_mixer(model.mixer_type).grid_params)
    out_dict = {}
    for k, v in state_dict.items():
        if k == 'patch_embed.proj.weight':
            out_h, out_w = model.patch_embed.proj.weight.shape[-2:]
            if v.shape[-2:] != (out_h, out_w):
                v = resample_patch_embed(v, [out_h, out_w], interpolation=interpolation, antialias=antialias, verbose=True)
        elif (k == 'pos_embed' and model.pos_embed is not None) or (grid_params and k.endswith(grid_params)):
            v = _resample_token_grid(v, model, patch_weight, interpolation, antialias)
        out_dict[k] = v
    check_weights_fit(out_dict, model)
    return out_dict


def _create_aft_vit(variant: str, pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    with explain_pretrained_errors(variant, pretrained, kwargs):
        return build_model_with_cfg(
            AftVisionTransformer,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'paper_ids': 'arXiv:2105.14103',
        'paper_name': 'An Attention Free Transformer',
        'license': 'apache-2.0',
        **kwargs,
    }


def _conv_cfg(**kwargs) -> Dict[str, Any]:
    """AFT-conv is fully convolutional: any input size that is a multiple of the patch size."""
    return _cfg(fixed_input_size=False, **kwargs)


# The first convolution of the conv-stem variants (conv_stem_embed: timm's ConvStem inside a HybridEmbed)
CONV_STEM_FIRST_CONV = 'patch_embed.backbone.0.conv'

# The small datasets the published weights were trained on (../shared/data/README.md): class folders in sorted order.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def _cifar10_cfg(**kwargs) -> Dict[str, Any]:
    """An AFT-conv tag trained on CIFAR-10 at 32 px: its classes, statistics and input, shared by every such tag."""
    return _conv_cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                     label_names=CIFAR10_CLASSES, **kwargs)


IMAGENETTE_WNIDS = ('n01440764', 'n02102040', 'n02979186', 'n03000684', 'n03028079', 'n03394916', 'n03417042',
                    'n03425413', 'n03445777', 'n03888257')

# No ImageNet-1k weights exist: each ImageNet-geometry architecture's default tag is its untrained ImageNet-1k config.
# Weights trained here on small datasets (weights/<model>.<tag>/, README "Results") have their own tags; their Hub
# repositories hold exactly those folders. As in timm, a tag never changes the architecture: small-image
# geometries (patch size, nominal input) have their own model names, e.g. aft_conv_tiny_patch4_32 for 32 px images.
default_cfgs = generate_default_cfgs({
    'aft_full_tiny.untrained': _cfg(),
    'aft_full_small.untrained': _cfg(),
    # AFT-conv has no position parameters, so Imagenette's 128 px weights are aft_conv_tiny's, like timm's '_384' tags
    'aft_conv_tiny.imagenette': _conv_cfg(
        hf_hub_id='aft-vit/aft_conv_tiny.imagenette', num_classes=10, input_size=(3, 128, 128), crop_pct=0.875,
        label_names=IMAGENETTE_WNIDS, label_descriptions=imagenet_descriptions(IMAGENETTE_WNIDS),
        description='Trained from scratch on Imagenette at 128 px (2-core CPU budget).'),
    'aft_conv_tiny.untrained*': _conv_cfg(),  # '*': the default tag, although the one above has weights
    'aft_conv_tiny_patch4_32.cifar10': _cifar10_cfg(
        hf_hub_id='aft-vit/aft_conv_tiny_patch4_32.cifar10',
        description='Trained from scratch on CIFAR-10 (JPEG q75 copy) at 32 px (2-core CPU budget).'),
    'aft_conv_tiny_stem4_32.cifar10': _cifar10_cfg(
        hf_hub_id='aft-vit/aft_conv_tiny_stem4_32.cifar10', first_conv=CONV_STEM_FIRST_CONV,
        description='Trained from scratch on CIFAR-10 (JPEG q75 copy) at 32 px: one 32-epoch schedule on a 2-core CPU '
                    '(long run 2, README "Results").'),
    'aft_conv_tiny_stem4_32.h200_cifar10': _cifar10_cfg(
        hf_hub_id='aft-vit/aft_conv_tiny_stem4_32.h200_cifar10', first_conv=CONV_STEM_FIRST_CONV,
        description='Trained from scratch on CIFAR-10 (JPEG q75 copy) at 32 px: one 27-epoch schedule in a few '
                    'minutes of a lent NVIDIA H200 (README "Results"); below the CPU-trained .cifar10 tag.'),
    'aft_conv_tiny_stem8_32.cifar10': _cifar10_cfg(
        hf_hub_id='aft-vit/aft_conv_tiny_stem8_32.cifar10', first_conv=CONV_STEM_FIRST_CONV,
        description='Trained from scratch on CIFAR-10 (JPEG q75 copy) at 32 px: one 80-epoch schedule on a 2-core CPU '
                    '(long run 3, README "Results").'),
    'aft_conv_tiny_stem16_224.imagenette': _conv_cfg(
        hf_hub_id='aft-vit/aft_conv_tiny_stem16_224.imagenette', num_classes=10, crop_pct=0.875,
        label_names=IMAGENETTE_WNIDS, label_descriptions=imagenet_descriptions(IMAGENETTE_WNIDS),
        first_conv=CONV_STEM_FIRST_CONV,
        description='Trained from scratch on Imagenette at 128, 160, then 224 px: one 84-epoch schedule on a '
                    '2-core CPU (README "Results").'),
    'aft_conv_tiny_stem16_224.untrained*': _conv_cfg(first_conv=CONV_STEM_FIRST_CONV),  # default: ImageNet-1k config
    'aft_conv_tiny_h192.untrained': _conv_cfg(),
    'aft_conv_small.untrained': _conv_cfg(),
    'aft_conv_small_h384.untrained': _conv_cfg(),
    'aft_conv_small_k15_h384.untrained': _conv_cfg(),
    'aft_conv_base_k25.untrained': _conv_cfg(),
    'aft_simple_tiny.untrained': _cfg(),
    'aft_simple_small.untrained': _cfg(),
    'aft_local_tiny.untrained': _cfg(),
    'aft_local_small.untrained': _cfg(),
})


@register_model
def aft_full_tiny(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-full tiny: DeiT-tiny with AFT-full (rank-128 bias). Paper: 72.4 top-1, 6.3M params."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, mixer='full', bias_rank=128)
    return _create_aft_vit('aft_full_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_full_small(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-full small: DeiT-small with AFT-full (rank-128 bias). Paper: 79.8 top-1, 22.6M params."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, mixer='full', bias_rank=128)
    return _create_aft_vit('aft_full_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_tiny(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv tiny, 32 heads, kernel 11. Paper: 73.9 top-1, 5.4M params."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, mixer='conv', num_heads=32, kernel_size=11)
    return _create_aft_vit('aft_conv_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_tiny_patch4_32(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv tiny for 32 px images (CIFAR): 4 px patches, an 8 x 8 grid. Not in the paper's tables."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, mixer='conv', num_heads=32, kernel_size=11)
    return _create_aft_vit('aft_conv_tiny_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_tiny_stem4_32(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """aft_conv_tiny_patch4_32 with a conv stem (two 3x3 stride-2 conv-BN-ReLU layers, 48 and 96 wide, and a 1x1
    projection) in place of the 4 px patchify: the same 8 x 8 tokens. Not in the paper (small-data tokenizers as in
    CCT); it earned its place on CIFAR-10 at equal wall time: +5.3 points of held-out top-1 at the same training
    speed in the 2-epoch recipe study (results/cifar10/study.md, row aft-stem-fp32)."""
    model_args = dict(img_size=32, patch_size=4, stem_channels=(48, 96), embed_dim=192, depth=12, mixer='conv',
                      num_heads=32, kernel_size=11)
    return _create_aft_vit('aft_conv_tiny_stem4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_tiny_stem8_32(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """aft_conv_tiny_stem4_32 with a third stride-2 stem layer (24, 48, 96 wide): 4 x 4 tokens at 32 px, which
    trains ~2.5x faster on a CPU. Not in the paper; it earned its place on CIFAR-10 at equal wall time: +7.0 points
    of held-out top-1 over the 8 x 8-token model (5 epochs against 2 in ~20 minutes each, results/cifar10/study.md,
    row aft-combined-patch8-5ep). Over a full schedule it ends lower: 79.73 on the test split after 80 epochs
    against 81.72 for the 8 x 8-token model's 32 (README "Results", long runs 3 and 2)."""
    model_args = dict(img_size=32, patch_size=8, stem_channels=(24, 48, 96), embed_dim=192, depth=12, mixer='conv',
                      num_heads=32, kernel_size=11)
    return _create_aft_vit('aft_conv_tiny_stem8_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_tiny_stem16_224(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """aft_conv_tiny with a conv stem (four 3x3 stride-2 conv-BN-ReLU layers, 24 to 192 wide, and a 1x1
    projection) in place of the 16 px patchify: the same 14 x 14 tokens at 224 px. Not in the paper (small-data
    tokenizers as in CCT); it earned its place on Imagenette at about equal wall time: +15.8 points of held-out
    top-1 after 8 epochs at 128 px, 8.5 minutes against 7.9 (results/imagenette/study.md, row aft-stem)."""
    model_args = dict(patch_size=16, stem_channels=(24, 48, 96, 192), embed_dim=192, depth=12, mixer='conv',
                      num_heads=32, kernel_size=11)
    return _create_aft_vit('aft_conv_tiny_stem16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_tiny_h192(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv tiny, 192 heads, kernel 11. Paper: 74.8 top-1, 5.9M params."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, mixer='conv', num_heads=192, kernel_size=11)
    return _create_aft_vit('aft_conv_tiny_h192', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_small(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv small, 16 heads, kernel 11. Paper: 80.2 top-1, 20.3M params."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, mixer='conv', num_heads=16, kernel_size=11)
    return _create_aft_vit('aft_conv_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_small_h384(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv small, 384 heads, kernel 11. Paper: 80.8 top-1, 22.5M params."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, mixer='conv', num_heads=384, kernel_size=11)
    return _create_aft_vit('aft_conv_small_h384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_small_k15_h384(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv small, 384 heads, kernel 15. Paper: 81.0 top-1, 23.0M params."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, mixer='conv', num_heads=384, kernel_size=15)
    return _create_aft_vit('aft_conv_small_k15_h384', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_conv_base_k25(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-conv base, 32 heads, kernel 25. Paper: 83.4 top-1 when initialized from DeiT-base, 79.7M params."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, mixer='conv', num_heads=32, kernel_size=25)
    return _create_aft_vit('aft_conv_base_k25', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_simple_tiny(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-simple tiny: DeiT-tiny with AFT-simple (no position bias). Not in the paper's tables."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, mixer='simple')
    return _create_aft_vit('aft_simple_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_simple_small(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-simple small: DeiT-small with AFT-simple (no position bias). Not in the paper's tables."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, mixer='simple')
    return _create_aft_vit('aft_simple_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_local_tiny(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-local tiny: rank-128 bias inside a 7x7 patch window, 0 outside. Not in the paper's tables."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, mixer='local', bias_rank=128, local_window=7)
    return _create_aft_vit('aft_local_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def aft_local_small(pretrained: bool = False, **kwargs) -> AftVisionTransformer:
    """AFT-local small: rank-128 bias inside a 7x7 patch window, 0 outside. Not in the paper's tables."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, mixer='local', bias_rank=128, local_window=7)
    return _create_aft_vit('aft_local_small', pretrained=pretrained, **dict(model_args, **kwargs))

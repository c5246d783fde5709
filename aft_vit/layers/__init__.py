"""AFT operators (functional) and the token mixers built on them."""
from .functional import (
    aft_conv2d, aft_conv2d_dense, aft_full, aft_full_dense, aft_local, aft_simple, conv_window_weights,
    dense_is_cheaper, full_bias_weights, is_exporting, local_window_mask, local_window_mask_2d)
from .mixers import MIXERS, AftConv, AftFull, AftLocal, AftMixer, AftSimple, MixerArgs, get_mixer

__all__ = ['aft_conv2d', 'aft_conv2d_dense', 'aft_full', 'aft_full_dense', 'aft_local', 'aft_simple',
           'conv_window_weights', 'dense_is_cheaper', 'full_bias_weights', 'is_exporting', 'local_window_mask',
           'local_window_mask_2d', 'MIXERS', 'AftConv', 'AftFull', 'AftLocal', 'AftMixer', 'AftSimple', 'MixerArgs',
           'get_mixer']

"""HetConv (Singh et al., CVPR 2019): the layer and its cost accounting."""

from hetconv.layer import HetConv2d, shift_permutation

__all__ = ["HetConv2d", "shift_permutation"]

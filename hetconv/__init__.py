"""HetConv (Singh et al., CVPR 2019): the layer (layer.py) and its cost accounting (flops.py), with the parts of a
training run that train.py, eval.py and the scripts share."""

from hetconv.layer import HetConv2d, shift_permutation

__all__ = ["HetConv2d", "shift_permutation"]

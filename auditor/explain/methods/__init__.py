"""Explanation methods. Each is a function registered in ``METHODS`` with one signature:

    heatmaps = method(model, x, target, **params)

``model`` is an ``nn.Module`` in eval mode returning logits [B, K]; ``x`` is the normalised
input [B, C, H, W] on the model's device; ``target`` is a LongTensor [B] of class indices.
The result is a float32 tensor [B, H, W] on the same device: non-negative, finite, at input
resolution, where larger means "more evidence for ``target``".

Methods that need a layer (Grad-CAM and kin) receive ``layer=`` (an ``nn.Module``); methods
that draw random numbers take ``seed=`` and give the same result for the same seed.
Importing this package registers every method below.
"""
from auditor.registry import METHODS

__all__ = ["METHODS"]

# Importing the method modules registers them (one decorated function per method).
from auditor.explain.methods import cam, class_map, deeplift, gradient, layer_shap, perturbation, surrogate  # noqa: E402,F401

"""Generative (density-model) OOD detection on images: family ``generative`` of the one registry.

One module per detector (:mod:`.pixelcnn_nll`, :mod:`.likelihood_ratio`, :mod:`.input_complexity`,
:mod:`.typicality`), the shared base in :mod:`.base`, the density model in :mod:`.pixelcnn`.
"""

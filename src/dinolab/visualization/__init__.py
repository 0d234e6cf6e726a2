"""Looking at what a backbone learned: attention maps, PCA of patch features, training curves.

``attention`` and ``pca`` compute maps with torch and write PNGs with Pillow alone; ``plots``
needs matplotlib (the ``viz`` extra) and imports it only when called.
"""

"""Image attributions over a grid of cells for image-text models (see methods.py)."""

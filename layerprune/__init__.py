"""layerprune: find the redundant top layers of a fine-tuned encoder with CKA and drop them."""

__version__ = "0.1.0"

"""skipbench: layer-skipping experiments on pre-trained decoder-only LLMs."""
__version__ = "0.1.0"

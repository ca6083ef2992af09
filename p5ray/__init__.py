"""p5ray: a P5-style multi-task recommender trained, swept and served on Ray."""

__version__ = "0.1.0"

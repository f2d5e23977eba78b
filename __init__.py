"""tokens: extract full patch-token maps of frozen encoders once, then train many probes from them."""

__version__ = "0.1.0"

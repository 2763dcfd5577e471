"""vmrouter: a virtual-model router for LLM traffic, running as an Envoy external processor."""

__version__ = "0.1.0"

"""rlaif: Constitutional AI and RLAIF, from a YAML constitution to an aligned model."""

__version__ = "0.1.0"

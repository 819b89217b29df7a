"""udpbindd: UDP listeners from one YAML file, clash-checked before they are bound."""

__version__ = "0.1.0"

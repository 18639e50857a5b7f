"""moegrok: find grokking inside MoE pretraining from the routing pathways of training samples."""

__version__ = "0.1.0"

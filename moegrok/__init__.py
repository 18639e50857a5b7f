"""moegrok: find grokking inside MoE pretraining from the routing pathways of training samples.

Array and tensor names carry their shape as a suffix of capital letters, one per axis:
B batch, T tokens of a sample (positions), N rows flattened across samples (tokens; samples
where a table has one row per sample), L MoE layers, K experts per token (top-k), E experts,
D hidden size, V vocabulary, P residues (toy zoo), C checkpoints. `ids_LNK` is (layers,
tokens, k).
"""

__version__ = "0.1.0"

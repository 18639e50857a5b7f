"""Reading routing out of an HF MoE model: the per-family adapters (where the router sits, what it
returns), the recorder that turns a model and tokenized samples into the routing table (and its
fast path: fused experts kernels, the compiled decoder), and the OLMoE paper's routing analyses
(saturation, co-activation, specialization, load) over those tables.

Imports: `moegrok.data` and the top-level modules (`config`, `errors`, `store`).
"""

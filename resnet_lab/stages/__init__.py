"""Each notebook's orchestration: which links its params make, the techniques it registers, its own tables.

The mechanism they share (a step, a chain, one evaluation protocol, one table) is `resnet_lab.steps`;
the transforms they call are the technique modules (`quantize`, `prune`, `factorize`).
"""

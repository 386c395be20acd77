"""Measuring models: accuracy, parameters, FLOPs, latency, and the paper's protocol (Base,
Masked-Base, Disa, Asse) on a task's test images."""

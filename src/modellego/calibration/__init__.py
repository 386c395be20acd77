"""Training-free repair of a cut model from the source's own activations: layer-wise least-squares
refits (recon), BatchNorm re-estimation and last-layer logit calibration."""

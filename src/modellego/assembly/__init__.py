"""Assembling components into one model for the union of their classes: alignment padding,
parallel bodies, parameter scaling (Eqs. 12-14) and the density head."""

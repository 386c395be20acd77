"""Stage 1 of disassembling: select samples, measure relative contributions (Eqs. 3-5) and locate
each class's channels backwards through the traced graph (Eqs. 6-10), as a `Profile`."""

"""Stage 2 of disassembling: turn located channels into a pruning plan (optionally under a FLOPs
budget), physically cut the model, and hand the cut to calibration (`disassemble`, `merge`)."""

"""Training and fine-tuning (zoo source models, the optional fine-tune of an assembly)."""

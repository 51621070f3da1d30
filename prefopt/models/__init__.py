"""Model loading (any HF causal LM by path) and the offline tiny model builder."""

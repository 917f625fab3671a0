"""Model configs, the causal LM built from registered parts, and named presets."""

"""nn.Modules built on the ops: token mixers, FFNs, norms, rotary embeddings, short convolutions."""

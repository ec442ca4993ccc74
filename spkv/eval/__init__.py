"""The harness that measures the method: held-out NLL, quality at matched density, the KVzap-style
surrogate, the density analysis, the RULER-style task suite and lm-evaluation-harness. Nothing in
the method (spkv's top-level modules) imports from here."""

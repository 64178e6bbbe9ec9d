"""The models Museum runs on: the embedded pipeline's components and tokenizer, its pretraining, loading any
pipeline folder or checkpoint (``loading``), the CLIP-style evaluator model, and ICGen's image-context adapter."""

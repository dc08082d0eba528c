"""Layer 2: tokenizers, model loading (the lab's own base, Hugging Face models, GGUF files), sampling (rollout)."""

"""A zoo of tiny Qwen2 experts trained here, and the paper's merge study run on it."""

"""LLaVA registration hooks: the only package of llava-getok that imports `llava`."""

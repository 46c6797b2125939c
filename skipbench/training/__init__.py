"""Training skip methods: the loop, its examples and teacher cache, resume and saves (loop)."""

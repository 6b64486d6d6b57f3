"""lmjax: language models in JAX and Flax."""

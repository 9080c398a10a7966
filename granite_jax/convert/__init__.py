"""`python -m granite_jax.convert`: the conversion command (export a run to a format, import a directory as a
run). The formats themselves are `granite_jax.formats`."""

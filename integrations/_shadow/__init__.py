"""The float64 shadow of a torch model, on which a check evaluates J and its gradient.

The copy whose trainable tensors are numpy views (`model`), the mode that makes its
float32 requests float64 (`mode`), the training's random draws replayed (`draws`), J and
dθ on the copy (`loss`), and many perturbations per ``vmap`` call (`batched`).
"""

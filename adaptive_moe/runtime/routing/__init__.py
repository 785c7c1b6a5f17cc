"""The route phase: the router (scores, top-k, capacity, losses) and its matmul and
selection kernels."""

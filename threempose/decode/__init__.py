"""Decoding network outputs into people: NMS + top-k, tag grouping, adjust and refine."""

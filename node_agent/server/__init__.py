"""The inference server behind ``edgefleet-serve`` (entry point: :mod:`node_agent.serve`).

- ``settings``: flags and ``EDGEFLEET_SERVE_*`` variables
- ``model``: one loaded, warmed-up version; loading from the cache or a file
- ``tensors``: the body forms (JSON, npz, one npy array, raw bytes with dtype and shape
  headers): decoding, validation against the signature, encoding
- ``npz``: the zero-copy fast path for what ``np.savez`` / ``np.save`` write (numpy's
  own readers otherwise)
- ``metrics``: the Prometheus metrics, in a per-server registry
- ``app``: the HTTP server and the model slot (hot swap, drain)
"""

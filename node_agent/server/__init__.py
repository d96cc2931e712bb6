"""The inference server behind ``edgefleet-serve`` (entry point: :mod:`node_agent.serve`).

- ``settings``: flags and ``EDGEFLEET_SERVE_*`` variables
- ``app``: ``InferenceServer``, the model slot behind a listener; requests in flight, drain
- ``model``: one loaded, warmed-up version, loading it from the cache or a file, and the
  slot that serves one (hot swap)
- ``connection``: the listener (connection limits) and HTTP/1.1 on each connection
- ``router``: a connection's requests, in order, to their endpoints; responses, bodies
- ``endpoints``: the endpoints and their routes
- ``fastpath``: an inference's run and answer, and the raw form's hot path through them
- ``tensors``: the body forms (JSON, npz, one npy array, raw bytes with dtype and shape
  headers): decoding, validation against the signature, encoding
- ``npz``: the zero-copy fast path for what ``np.savez`` / ``np.save`` write (numpy's
  own readers otherwise)
- ``metrics``: the Prometheus metrics, in a per-server registry
"""

"""Standard protocols as thin adapters over the Service: TensorFlow Serving's REST API
(``tfserving.py``, ``/v1/...``) and the Open Inference Protocol, KServe v2 (``kserve.py``,
``/v2/...``). Each parses its wire format into one call of the data plane
(``Service.infer_images`` / ``Service.infer_tensor``) and writes the answer back in that
protocol's shapes, errors included; ``base.py`` holds what both need."""

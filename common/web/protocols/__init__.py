"""Standard protocols as thin adapters over the DataPlane: TensorFlow Serving's REST API
(``tfserving.py``, ``/v1/...``) and the Open Inference Protocol, KServe v2 (``kserve.py``,
``/v2/...``). Each is handed the DataPlane when its ``blueprint(dataplane)`` is built, makes
one call of the data plane's pipeline, ``DataPlane.infer``, with a function that parses its wire
format (called only once the request is admitted, so a refused request never reads its body),
and writes the answer back in that protocol's shapes, errors included; ``base.py`` holds what
both need."""

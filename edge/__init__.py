"""The edge side: ``EdgeClient`` and the ``splitnet-edge`` command.

Modules: ``client`` (``EdgeClient``), ``config`` (``EdgeConfig``), ``transport`` (the
channel, retries, status codes to errors), ``tls`` (naming TLS mismatches), ``route``
(request bytes of a cut and codec), ``stream`` (the pipelined ``InferStream``),
``auto`` (``cut="auto"`` planning), ``model`` (what the device holds), ``results``
(``InferResult``, ``Timing``), ``inputs`` (input files), ``cli`` (``splitnet-edge``).
"""

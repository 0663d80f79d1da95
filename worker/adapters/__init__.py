"""Adapters: thin shells that turn a carrier's input into an event for the dispatcher, and its
response back into the carrier's answer.

HTTP (:mod:`.http`) and Lambda (:mod:`.lambda_`) answer one call each. Queues share one seam,
:mod:`.queue` (the ``Source`` Protocol, the intake loop, ``open_source``/``consume``); the brokers
behind it, :mod:`.redis_streams`, :mod:`.rabbitmq` and :mod:`.memory`, are loaded by URL scheme
only when a queue is used.
"""

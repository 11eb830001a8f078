"""The exceptions queue as a service: assign, resolve and retry (:mod:`.service`), used by
``/v1/ops/exceptions`` and the ops console alike."""

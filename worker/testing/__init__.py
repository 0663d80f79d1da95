"""The plugin author's test kit: signed events, a handler's context, the emulator.

::

    from worker.testing import make_context, pre_event, run_event

    response = await run_event(build_routes(), pre_event(body={"_name": {...}}))

- events of every hook, signed as BioT signs them: :func:`notification_event`,
  :func:`pre_event`, :func:`post_event`, :func:`adapt_entity_event`, :func:`nonspecific_event`;
- a handler's ``ctx`` and view for calling it directly: :func:`make_context` (with
  :class:`FakeApi` recording what the handler asked of BioT and :class:`CapturingLog` what it
  logged) and :func:`view_of`;
- one event through a router in one call: :func:`run_event`;
- BioT in a box with a worker in front: :func:`emulated_biot`, and the ``biot`` pytest fixture
  of :mod:`worker.testing.pytest_plugin`.

The runtime never imports this package.
"""

from worker.logs import CapturingLog
from worker.testing.biot import EmulatedBiot, EmulatorSigner, emulated_biot
from worker.testing.events import (
    INTERCEPTION_SCOPE,
    NOTIFICATION_SCOPE,
    TRACE_ID,
    TRACEPARENT,
    KeyPair,
    Signer,
    adapt_entity_event,
    api_id_for,
    default_keys,
    entity,
    make_key_pair,
    nonspecific_event,
    notification_event,
    post_event,
    pre_event,
)
from worker.testing.fake_api import ApiCall, FakeApi
from worker.testing.kit import kit_settings, make_context, make_dispatcher, run_event, view_of

__all__ = [
    "INTERCEPTION_SCOPE",
    "NOTIFICATION_SCOPE",
    "TRACEPARENT",
    "TRACE_ID",
    "ApiCall",
    "CapturingLog",
    "EmulatedBiot",
    "EmulatorSigner",
    "FakeApi",
    "KeyPair",
    "Signer",
    "adapt_entity_event",
    "api_id_for",
    "default_keys",
    "emulated_biot",
    "entity",
    "kit_settings",
    "make_context",
    "make_dispatcher",
    "make_key_pair",
    "nonspecific_event",
    "notification_event",
    "post_event",
    "pre_event",
    "run_event",
    "view_of",
]

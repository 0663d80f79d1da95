"""From handlers to a plugin running on BioT: package, deploy, subscribe (a tool, like
:mod:`worker.testing` and :mod:`worker.bench`: the runtime never imports it).

- :mod:`worker.deploy.package`: ``biot-worker package``, the Lambda ZIP (runtime dependencies as
  binary wheels for the target Python, ``worker``, ``config``, the plugin, ``index.py``),
  reproducible byte for byte;
- :mod:`worker.deploy.subscriptions`: a :class:`~worker.routing.Router` as BioT's
  ``subscriptions`` object, and as the dispatcher's self-hosted subscription requests;
- :mod:`worker.deploy.admin`: the BioT APIs these commands call as a BioT user (user login,
  ``/settings/v2/plugins``, ``/settings/v1/interceptions``, the dispatcher's subscriptions),
  BioT's errors as :class:`~worker.deploy.admin.BiotAdminError` (``code``, ``message``);
- :mod:`worker.deploy.deploy`: ``biot-worker deploy`` (create or update the plugin);
- :mod:`worker.deploy.subscribe`: ``biot-worker subscribe`` / ``unsubscribe`` for a
  self-hosted worker.
"""

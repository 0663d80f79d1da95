"""The interceptor latency benchmark (``biot-worker bench``, issue 5).

Processes: the emulator (BioT in a box, ``--latency``) on CPU1 with the load generator (this
process); the targets on CPU0, each its own process: the worker (``python -m worker run`` with
``WORKER_ROUTES=worker.bench.scenarios:build_routes``), the floor (:mod:`.floor`) and the two
Lambda-style baselines (:mod:`.lambda_style` over :mod:`.seed`).

Modules: :mod:`.cli` (flags, outputs), :mod:`.plan` (scenarios, variants, levels, order),
:mod:`.orchestrate` (one run), :mod:`.procs` / :mod:`.upstream` (processes, emulator fixtures),
:mod:`.payloads` (events as BioT sends them, answer checks), :mod:`.logic` (the plugin logic
every variant shares), :mod:`.httpload` / :mod:`.load` (raw keep-alive client, closed and open
loops), :mod:`.procstat` (CPU and RSS from ``/proc``), :mod:`.stats` / :mod:`.report` /
:mod:`.table` / :mod:`.chart` (figures, ratios, targets, output), :mod:`.extras` /
:mod:`.profiles` / :mod:`.worker_proc` (memory trend, cProfile summary), :mod:`.spin` (keeps
vCPUs out of idle), :mod:`.queue_hook` / :mod:`.redisload` (scenario (e): the worker consuming a
Redis stream, lean channels publishing to it and reading the replies, the run's stream cleanup),
:mod:`.collector` (the stand-in OpenTelemetry collector the ``worker-otel`` rows export to, and
the span check of their points), :mod:`.peers` (what a team would build instead: (f) FastAPI on
uvicorn, (g) FastStream on Redis Streams), :mod:`.check` (``--check``, the regression guard and
its stored limits).
"""

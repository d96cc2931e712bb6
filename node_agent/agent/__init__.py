"""``edgefleet-agent``: the node agent daemon, one per edge node (a DaemonSet pod).

Every interval it builds one heartbeat (node status, and per local inference server
the model it serves with that window's inference numbers), appends it to the durable
outbox (:mod:`node_agent.queue`) and sends the outbox, oldest first, in batches. The
controller acknowledges a sequence number and everything up to it leaves the outbox,
so an agent cut off for hours replays its backlog in order when the link comes back,
and a batch sent twice (a lost response) is counted once.

Identity: the agent enrols once with the fleet's join token and keeps the credential
of its own node (``<state_dir>/credential``, mode 0600). A credential the controller no
longer accepts (rotated, node re-created) makes it enrol again when it still has the
join token.

On-node benchmarks: the controller keeps model benchmarks per node class (architecture,
accelerator, CPU model: the heartbeat reports ``cpu_model``) and asks one node of each
class to measure. A heartbeat answer with ``benchmarks_pending > 0`` makes the agent,
when no benchmark is running, fetch its jobs (``GET /v1/agents/benchmarks``) and hand
them to one background thread (:mod:`node_agent.benchmarks`), so heartbeats keep their
schedule while a benchmark takes minutes. For each job in order the thread fetches the
artifact into the node-local cache (``EDGEFLEET_MODEL_CACHE_DIR``, the inference
servers' cache; sha256 verified) and measures it in a child process
(:mod:`node_agent.probe`, killed after ``EDGEFLEET_BENCHMARK_TIMEOUT_S``). The agent's
loop posts each result (``POST /v1/agents/benchmarks/{id}``; latencies and peak memory,
or ``ok: false`` with the download, validation or runtime error). A post that does not
get through is retried at the next heartbeat, never measured again; 404/409 (job
withdrawn or already answered) drops it. At most one benchmark runs at a time; on
shutdown the running one is killed after a short grace. After a start the agent fetches
its jobs once whatever the count says: the controller counts jobs handed out as fetched,
so one interrupted by a restart would otherwise wait forever.

Light on purpose: no numpy, no runtime, no server; a few file reads and two HTTP
requests per interval (bench/bench_agent.py measures it). The model runtime is loaded
only by a benchmark's child process, never by the agent.

Modules: ``settings`` (``EDGEFLEET_*``), ``client`` (the controller's agent API),
``credentials`` (the node credential on disk and on the wire), ``backoff``, ``loop``
(the agent: enrolment, outbox, benchmarks, the heartbeat loop), ``cli`` (the
``edgefleet-agent`` entry point; also ``python -m node_agent.agent``)."""

"""Edge agent benchmarks: memory, gossip latency, chunked throughput, a fleet of agents.

What they measure, each part runnable alone with ``--part``:

- ``rss`` (:mod:`.rss`): memory of the serving daemon (``edge_agent.cli run``) with several
  artifacts, and where it goes (import-only baselines, start-up step by step).
- ``learn-rss`` (:mod:`.learn_rss`): memory of the same daemon while it learns.
- ``latency`` (:mod:`.latency`): first publish -> decoded of a signed 1 MiB / 1 KiB gossip
  frame between two processes, with and without TCP_NODELAY.
- ``throughput`` (:mod:`.throughput`): MiB/s of a large chunked, signed, verified artifact
  frame, and bursts beyond the transport's QoS 1 queue.
- ``fleet`` (:mod:`.fleet`): many in-process agents against one Mosquitto: all online, a
  gossip storm (frames lost, broker CPU), then gossip learning.

Every part starts its own Mosquitto on a free loopback port and talks to real agents through
the real protocol (signed frames, ``MqttTransport``, ``toolkit.fleet.FleetClient``). Helper
processes are functions of these modules, started as ``python -m benchmarks.agent.MODULE
--worker NAME ...``. Output: one JSON object per line on stdout (also appended to ``--out``),
then a summary. Run from the repository root::

    python -m benchmarks.agent --part all --out runs/agent_bench.jsonl
    python -m benchmarks.agent --part fleet --agents 100 --fleet-workers 4
    python -m benchmarks.agent --help
"""

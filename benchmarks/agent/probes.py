"""Memory probes that run in a fresh interpreter, so what they measure is only what they import.

This module imports nothing but ``sys`` and ``json`` at the top (argparse alone would add ~1 MB
to the bare-interpreter baseline), so its command line is read by hand. It is run as a script
(``-m`` would load runpy and the package first, ~0.2 MB), with the repository on
``PYTHONPATH``::

    PYTHONPATH=. python benchmarks/agent/probes.py --worker imports numpy paho.mqtt.client
    PYTHONPATH=. python benchmarks/agent/probes.py --worker stages path/to/lenet-artifact

``imports`` imports the modules named, then prints one JSON object (VmRSS, VmHWM, RssAnon,
RssFile, threads, torch_loaded). ``stages`` loads what the serving daemon loads, step by step,
and prints one JSON object per step. :func:`proc_status` is the ``/proc`` reader every
benchmark uses.
"""

from __future__ import annotations

import json
import sys

_MEMORY_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem (MiB) and Threads of a process, from /proc."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in _MEMORY_KEYS:
                out[key + "_mb"] = round(int(rest.split()[0]) / 1024, 1)
            elif key == "Threads":
                out["threads"] = int(rest.split()[0])
    return out


def _pick(*keys: str) -> dict[str, float]:
    status = proc_status()
    return {key: status[key] for key in keys}


def imports(modules: list[str]) -> dict[str, object]:
    """Memory of this interpreter after importing ``modules`` (and json, as always)."""
    for name in modules:
        __import__(name)
    return {
        **_pick("VmRSS_mb", "VmHWM_mb", "RssAnon_mb", "RssFile_mb", "threads"),
        "torch_loaded": "torch" in sys.modules,
    }


def stages(artifact: str) -> list[dict[str, object]]:
    """RSS after each thing the serving daemon loads, in start-up order (no broker, no threads)."""
    rows: list[dict[str, object]] = []

    def rss(label: str) -> None:
        rows.append({"stage": label, **_pick("VmRSS_mb", "RssAnon_mb", "RssFile_mb", "threads")})

    rss("python, nothing imported")
    import edge_agent.daemon  # noqa: F401

    rss("+ edge_agent.daemon (after the CLI's exec)")
    import edge_agent.agent  # noqa: F401

    rss("+ edge_agent.agent (numpy, paho, protocol)")
    import onnxruntime  # noqa: F401

    rss("+ onnxruntime")
    import numpy as np

    from exporters import runtime

    predictor = runtime.load(artifact, threads=1)
    rss("+ runtime.load(LeNet portable)")
    predictor.predict(np.zeros((2, 1, 32, 32), np.float32))
    rss("+ health-check predict")
    import psutil

    psutil.Process().memory_info()
    rss("+ psutil (telemetry)")
    return rows


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--worker" or argv[1] not in ("imports", "stages"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "imports":
        print(json.dumps(imports(argv[2:])), flush=True)
    else:
        for row in stages(argv[2]):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    # Run as a script, Python put this folder first on sys.path: its modules (common, fleet,
    # ...) must not shadow a top-level module of the same name that an import probe loads.
    del sys.path[0]
    sys.exit(main(sys.argv[1:]))

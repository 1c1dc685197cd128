"""ServerApp: time hops of each payload size, one in-band base, and the report of a killed node."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from deploy_bench.payload import from_record, payload_spec, payload_state, to_record
from fedem_flwr.hub.manifest import digest
from fedem_flwr.protocol.messages import BASE_FILES, folder_to_arrays

app = ServerApp()


def _one_node(grid: Grid, deadline: float) -> int:
    while time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        if nodes:
            return nodes[0]
        time.sleep(0.2)
    raise TimeoutError("no SuperNode connected")


def _hop(grid: Grid, message: Message, deadline: float) -> tuple[float, Message]:
    """Push one message and poll (every 50 ms) for its reply: seconds and the reply."""
    started = time.perf_counter()
    (message_id,) = grid.push_messages([message])
    while time.monotonic() < deadline:
        replies = list(grid.pull_messages([message_id]))
        if replies:
            return time.perf_counter() - started, replies[0]
        time.sleep(0.05)
    raise TimeoutError(f"no reply to {message.metadata.message_type}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    timeout = float(cfg["timeout"])
    deadline = time.monotonic() + timeout
    node = _one_node(grid, deadline)
    result: dict = {"hops": [], "node-id": str(node)}
    wire, count = str(cfg["wire"]), int(cfg["arrays"])
    for size in [float(s) for s in str(cfg["sizes-mb"]).split(",") if s]:
        spec = payload_spec(size, count)
        state = payload_state(spec)
        for _ in range(int(cfg["repeats"])):
            content = RecordDict({"arrays": to_record(state, wire),
                                  "config": ConfigRecord({"wire": wire, "mb": size, "arrays": count})})
            seconds, reply = _hop(grid, Message(content, node, "train", ttl=timeout), deadline)
            if reply.has_error():
                raise RuntimeError(f"hop of {size} MB failed: {reply.error}")
            from_record(reply.content["arrays"], spec, wire)  # the hub reads it back as it reads a push
            client = float(reply.content["metrics"]["client-s"])
            result["hops"].append({"mb": size, "wire": wire, "tensors": count, "arrays": len(content["arrays"]),
                                   "seconds": seconds, "client_s": client, "overhead_s": seconds - client,
                                   "client_pid": int(reply.content["metrics"]["pid"])})
    if cfg["base-path"]:
        base = Path(str(cfg["base-path"]))
        started = time.perf_counter()
        content = RecordDict({"config": ConfigRecord({"cache-dir": str(cfg["cache-dir"]), "digest": digest(base)}),
                              BASE_FILES: folder_to_arrays(base)})
        packed = time.perf_counter() - started
        seconds, reply = _hop(grid, Message(content, node, "query.base", ttl=timeout), deadline)
        if reply.has_error():
            raise RuntimeError(f"base transfer failed: {reply.error}")
        result["base"] = {"mb": sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) / 1e6,
                          "pack_s": packed, "seconds": seconds + packed,
                          "client_s": float(reply.content["metrics"]["client-s"])}
    if cfg["hold-marker"]:
        config = ConfigRecord({"marker": str(cfg["hold-marker"])})
        (message_id,) = grid.push_messages([Message(RecordDict({"config": config}), node, "query.hold", ttl=timeout)])
        while time.monotonic() < deadline:
            replies = list(grid.pull_messages([message_id]))
            if replies:
                result["hold"] = {"reported_at": time.time(),
                                  "error_code": replies[0].error.code if replies[0].has_error() else None}
                break
            time.sleep(0.1)
    path = Path(str(cfg["result-path"]))
    path.with_suffix(".tmp").write_text(json.dumps(result, indent=2))
    path.with_suffix(".tmp").replace(path)

"""ClientApp: echo an adapter-sized payload, cache a base sent in-band, or hold a message until killed."""

import os
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def echo(msg: Message, context: Context) -> Message:
    """Send the payload back as a relay node sends its adapter; report the time spent here and this
    process's id (a new ``flwr-clientapp`` per message, or one that lives on)."""
    started = time.perf_counter()
    from deploy_bench.payload import from_record, payload_spec, to_record  # torch's import: the node's time

    config = msg.content["config"]
    wire = str(config["wire"])
    spec = payload_spec(float(config["mb"]), int(config["arrays"]))  # the layout both sides derive
    arrays = to_record(from_record(msg.content["arrays"], spec, wire), wire)
    metrics = MetricRecord({"client-s": time.perf_counter() - started, "pid": os.getpid()})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.query("base")
def cache_base(msg: Message, context: Context) -> Message:
    """Write a base sent in-band into a node cache, digest checked, as a relay node does."""
    from fedem_flwr.node.cache import BaseCache  # imported here: the echo hops time Flower alone
    from fedem_flwr.protocol.messages import BASE_FILES, arrays_to_folder

    started = time.perf_counter()
    config = msg.content["config"]
    cache = BaseCache(Path(str(config["cache-dir"])))
    record = msg.content[BASE_FILES]
    cache.add(str(config["digest"]), lambda folder: arrays_to_folder(record, folder))
    return Message(RecordDict({"metrics": MetricRecord({"client-s": time.perf_counter() - started})}), reply_to=msg)


@app.query("hold")
def hold(msg: Message, context: Context) -> Message:
    """Hold the message (as a node holds a lease) until this node is killed."""
    Path(str(msg.content["config"]["marker"])).write_text(str(time.time()))
    time.sleep(float(msg.metadata.ttl))
    return Message(RecordDict({}), reply_to=msg)

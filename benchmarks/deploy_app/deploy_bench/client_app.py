"""ClientApp: echo an adapter-sized payload, cache a base sent in-band, or hold a message until killed."""

import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def echo(msg: Message, context: Context) -> Message:
    """Send the payload back as a relay node sends its adapter; report the time spent here."""
    started = time.perf_counter()
    received = {key: array.numpy() for key, array in msg.content["arrays"].items()}  # decoded, as an adapter
    arrays = ArrayRecord({key: Array(value) for key, value in received.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"client-s": time.perf_counter() - started})}),
                   reply_to=msg)


@app.query("base")
def cache_base(msg: Message, context: Context) -> Message:
    """Write a base sent in-band into a node cache, digest checked, as a relay node does."""
    from fedem_flwr.base_cache import BaseCache  # imported here: the echo hops time Flower alone
    from fedem_flwr.relay.messages import BASE_FILES, arrays_to_folder

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

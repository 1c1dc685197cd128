"""What a deployment on the internet costs: relay hops through a real SuperLink on loopback with TLS and
SuperNode authentication, the base transfer a new node waits for, and how long a killed node holds
its adapter.

    python benchmarks/deploy.py                        # 1 MB and 50 MB hops, seshu-130m base, a SIGKILL
    python benchmarks/deploy.py --sizes 1 --no-base    # quicker
    python benchmarks/deploy.py --save deploy.json     # keep the numbers
    python benchmarks/deploy.py --baseline deploy.json # compare; exit 1 on a regression
    python benchmarks/deploy.py --sizes 1 --no-base --no-loss --isolation process  # a SuperExec started apart

Measured (the app in benchmarks/deploy_app: Flower's transport only, no training):

- hop overhead: push -> the SuperNode pulls it -> its ClientApp decodes and re-encodes the payload ->
  the reply is pulled by the ServerApp (polling every 50 ms), minus the time inside the ClientApp
  function. The payload is `--arrays` tensors (48, as a LoRA on seshu-130m's in_proj), sent as the
  relay sends an adapter (`--wire packed`: one float32 Array) or one Array per tensor (`per-tensor`):
  Flower moves each Array as its own object, so the tensor count costs more than the bytes.
  `--isolation subprocess` (the default): the SuperNode starts its own SuperExec, which starts a new
  `flwr-clientapp` process per message. `process`: the SuperNode starts none, and a `flower-superexec`
  started apart against its Runtime API does the same. In Flower 1.42 a `flwr-clientapp` needs the
  one-message `--token` the Runtime API hands its SuperExec and exits after that message, so no
  ClientApp outlives a message: `clientapp_processes` counts the distinct ClientApp pids over the hops.
  Goal: a 1 MB hop adds at most the SuperNode's polling interval (3 s when idle in Flower 1.42) + 0.5 s.
- first lease of a new node: from `flower-supernode` starting to it being online, plus one hop
  carrying the seshu-130m base in-band and its digest-checked write into the node's cache.
- node loss: from SIGKILL of a SuperNode holding a message to the SuperLink reporting it gone to the
  ServerApp (error code 5); the relay leases the adapter again on its next turn (`relay.poll_interval_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.support
from baseline import regressions  # noqa: E402

from fedem_flwr.deploy.credentials import node_key, server_credentials  # noqa: E402
from fedem_flwr.launch import flwr_cli  # noqa: E402
from fedem_flwr.launch.processes import (  # noqa: E402
    FlowerProcess,
    flower_bin,
    kill_tree,
    spawn,
    start_superlink,
    start_supernode,
)
from tests.support.flower import SuperLink, node_ids  # noqa: E402

APP = Path(__file__).resolve().parent / "deploy_app"
SUPERNODE_POLL_S = 3.0  # flwr 1.42 supernode: sleeps 3 s after an empty pull
METRICS = {  # name -> (unit, higher is better)
    "hop_1mb_overhead_s": ("s", False),
    "hop_50mb_overhead_s": ("s", False),
    "node_online_s": ("s", False),
    "base_transfer_s": ("s", False),
    "first_lease_s": ("s", False),
    "node_gone_s": ("s", False),
}


def seshu_base(folder: Path) -> Path:
    """A random-init seshu-130m saved as the hub saves a base (safetensors, config, tokenizer)."""
    from fedem_flwr.config.loader import load_config
    from fedem_flwr.model.factory import build_model, save_base
    from fedem_flwr.model.tokenizer import load_tokenizer

    cfg = load_config(["model=seshu-130m"])
    tokenizer = load_tokenizer(cfg.tokenizer)
    return save_base(build_model(cfg.model, tokenizer), tokenizer, folder)


def start_superexec(node: FlowerProcess) -> FlowerProcess:
    """The SuperExec a `--isolation process` SuperNode leaves to its operator: it asks the node's Runtime
    API (plain HTTP on loopback) for work and starts a `flwr-clientapp` per message, in the node's home."""
    argv = [flower_bin("flower-superexec"), "--insecure", "--runtime-api-address", node.address,
            "--parent-pid", str(node.pid)]
    return spawn("superexec", argv, node.flwr_home, node.port, node.flwr_home)


def kill_when_held(marker: Path, node_pid: int, killed: dict, deadline: float) -> None:
    """SIGKILL the SuperNode and all below it once its ClientApp holds the message."""
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(0.05)
    if not marker.exists():
        return
    time.sleep(1.0)  # it holds the message for a moment, as a node holds a lease
    killed["at"] = time.time()
    kill_tree(node_pid)


def measure(root: Path, sizes: list[float], repeats: int, with_base: bool, timeout: float,
            arrays: int = 48, wire: str = "packed", isolation: str = "subprocess", with_loss: bool = True) -> dict:
    tls = server_credentials(root / "certs", ["localhost"])
    key = node_key(root / "node-key")
    home = root / "flwr"
    link = start_superlink(home, simulation=False, tls=tls, supernode_auth=True)
    node = executor = None
    try:
        flwr_cli.write_connection(home, "bench", link.address, tls.ca_cert)
        flwr_cli.register_supernode(home, "bench", key.public)
        started = time.monotonic()
        node = start_supernode(home, link.address, "", root_certificates=tls.ca_cert, private_key=key.private,
                               isolation=isolation)
        if isolation == "process":
            executor = start_superexec(node)
        superlink = SuperLink(link, "bench")
        while not node_ids(superlink):
            if time.monotonic() - started > 120:
                raise TimeoutError(f"the SuperNode did not come online:\n{node.log_tail()}")
            time.sleep(0.2)
        online = time.monotonic() - started
        base = seshu_base(root / "base") if with_base else None
        marker, result_path, killed = root / "held", root / "result.json", {}
        run_config = {"result-path": str(result_path), "sizes-mb": ",".join(f"{s:g}" for s in sizes),
                      "repeats": repeats, "arrays": arrays, "wire": wire, "base-path": str(base or ""),
                      "cache-dir": str(root / "node-cache"), "hold-marker": str(marker) if with_loss else "",
                      "timeout": timeout}
        run_id = flwr_cli.submit_run(APP, home, "bench", run_config=run_config)
        if with_loss:
            threading.Thread(target=kill_when_held, args=(marker, node.pid, killed, time.monotonic() + timeout),
                             daemon=True).start()
        status = flwr_cli.wait_for_run(home, "bench", run_id, timeout)
        if status["status"] != flwr_cli.COMPLETED or not result_path.exists():
            logs = flwr_cli.flwr(["log", str(run_id), "bench", "--show"], home).stdout
            raise RuntimeError(f"benchmark run ended {status['status']}:\n{logs[-3000:]}")
        raw = json.loads(result_path.read_text())
    finally:
        for process in (executor, node):
            if process is not None:
                process.stop()
        link.stop()
    return summarise(raw, online, killed.get("at"))


def summarise(raw: dict, online: float, killed_at: float | None) -> dict:
    results: dict = {"node_online_s": online}
    for size in sorted({hop["mb"] for hop in raw["hops"]}):
        hops = [hop for hop in raw["hops"] if hop["mb"] == size]
        results[f"hop_{size:g}mb_s"] = statistics.median(h["seconds"] for h in hops)
        results[f"hop_{size:g}mb_overhead_s"] = statistics.median(h["overhead_s"] for h in hops)
        results[f"hop_{size:g}mb_overheads_s"] = [round(h["overhead_s"], 2) for h in hops]
    results["hops"] = len(raw["hops"])
    results["clientapp_processes"] = len({hop["client_pid"] for hop in raw["hops"]})
    if "base" in raw:
        results["base_mb"] = raw["base"]["mb"]
        results["base_transfer_s"] = raw["base"]["seconds"]
        results["first_lease_s"] = online + raw["base"]["seconds"]
    if killed_at is not None and "hold" in raw:
        results["node_gone_s"] = raw["hold"]["reported_at"] - killed_at
        results["node_gone_error_code"] = raw["hold"]["error_code"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,50", help="Hop payloads in MB, comma-separated.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arrays", type=int, default=48, help="Tensors per payload (48: a LoRA on seshu-130m).")
    parser.add_argument("--wire", choices=["packed", "per-tensor"], default="packed",
                        help="One float32 Array per payload, as the relay sends adapters, or one Array per tensor.")
    parser.add_argument("--isolation", choices=["subprocess", "process"], default="subprocess",
                        help="The SuperNode starts its SuperExec (subprocess) or one is started apart (process).")
    parser.add_argument("--superexec-poll", type=float,
                        help="Seconds between the SuperExec's requests for work (Flower's default: 1).")
    parser.add_argument("--no-base", action="store_true", help="Skip the seshu-130m base transfer.")
    parser.add_argument("--no-loss", action="store_true", help="Skip the SIGKILL of a node holding a message.")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.25)
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s]
    if args.superexec_poll is not None:  # read by every SuperExec this benchmark starts (they inherit it)
        os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(args.superexec_poll)
    with tempfile.TemporaryDirectory(prefix="fedem-deploy-bench-") as tmp:
        results = measure(Path(tmp), sizes, args.repeats, not args.no_base, args.timeout, args.arrays, args.wire,
                          args.isolation, not args.no_loss)
    results.update(wire=args.wire, isolation=args.isolation, superexec_poll_s=args.superexec_poll or 1.0)
    for name, value in results.items():
        print(f"{name:24s} {value:10.3f}" if isinstance(value, float) else f"{name:24s} {value}")
    failed = []
    if "hop_1mb_overhead_s" in results:
        goal = SUPERNODE_POLL_S + 0.5
        ok = results["hop_1mb_overhead_s"] <= goal
        print(f"goal: a 1 MB hop adds at most {goal:.1f} s: {'met' if ok else 'MISSED'}")
        failed += [] if ok else ["hop_1mb_overhead_s above the goal"]
    if args.save:
        args.save.write_text(json.dumps({"results": results}, indent=2))
    if args.baseline:
        baseline = json.loads(args.baseline.read_text())
        worse = regressions({k: v for k, v in results.items() if k in METRICS},
                            baseline, {k: m for k, m in METRICS.items() if k in results}, args.tolerance)
        failed += worse
        print("\n".join(worse) or "no regression against the baseline")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serve a run with a real TensorBoard on 127.0.0.1 and list what each dashboard holds for it, over HTTP.

python scripts/check_dashboards.py runs/<name>
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def fetch(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    a = p.parse_args(argv)
    run = Path(a.run_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(run.parent),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if run.name in fetch(f"{base}/runs") and run.name in fetch(f"{base}/plugin/scalars/tags"):
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                sys.exit("TensorBoard did not come up")
            time.sleep(0.5)
        listing = fetch(f"{base}/plugins_listing")
        active = ", ".join(k for k, v in listing.items() if v.get("enabled"))
        print(f"TensorBoard on 127.0.0.1:{port}, run {run.name}; active plugins: {active}")
        for plugin in ("scalars", "histograms", "images", "pr_curves", "text"):
            tags = fetch(f"{base}/plugin/{plugin}/tags").get(run.name, {})
            print(f"{plugin:<11} {len(tags):>3} tags: {', '.join(sorted(tags))}")
        experiment = fetch(f"{base}/plugin/hparams/experiment", {"experimentName": ""})
        names = [h["name"] for h in experiment.get("hparamInfos", [])]
        metrics = ", ".join(m["name"]["tag"] for m in experiment.get("metricInfos", []))
        print(f"{'hparams':<11} {len(names)} hparams: {', '.join(names)}; metrics: {metrics}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

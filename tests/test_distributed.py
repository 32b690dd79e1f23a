"""Distributed training of panther.convert-ed models on CPU (gloo, 2 processes on 127.0.0.1).

One pair of worker processes (tests/_dist_worker.py) runs every check on a single process group, so the
import and rendezvous cost is paid once per module; each test below asserts on one check's result.
Checked against single-process training on the same global batch (mean loss over it):
DDP eager, DDP + torch.compile(backend="panther") with Dynamo's graph splitting, FSDP2 (fully_shard),
and torch.distributed.checkpoint save/load round trips.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

WORLD = 2
TIMEOUT_S = 120  # hard cap for the worker pair; they normally finish in well under a minute
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # The parent owns the rendezvous store on a port the OS picks (port 0): no fixed port, no collisions
    # between concurrent test runs; workers join it as clients.
    store = dist.TCPStore("127.0.0.1", 0, WORLD + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    procs = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "_dist_worker.py"), str(r), str(WORLD),
                          str(store.port), str(out)],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=TIMEOUT_S)[0])
            except subprocess.TimeoutExpired:
                logs.append("(timed out)")
    finally:
        for p in procs:  # never leave a worker behind, whatever happened above
            if p.poll() is None:
                p.kill()
                p.wait()
        del store
    per_rank = []
    for r in range(WORLD):
        f = out / f"rank{r}.json"
        if not f.exists():
            pytest.fail(f"rank {r} wrote no results (rc={procs[r].returncode}):\n" + "\n".join(logs)[-4000:])
        per_rank.append(json.loads(f.read_text()))
    return per_rank


def _check(results, name):
    for r, res in enumerate(results):
        assert name in res, f"rank {r} did not run {name!r}"
        c = res[name]
        assert c["error"] is None, f"rank {r}: {c['error']}\n{c.get('traceback', '')}"
        assert c["ok"], f"rank {r}: {c['detail']}"
    return [res[name]["detail"] for res in results]


def test_workers_use_this_checkout(results):
    for res in results:
        assert os.path.commonpath([res["setup"]["panther_file"], ROOT]) == ROOT, res["setup"]


def test_ddp_eager_matches_single_process(results):
    for d in _check(results, "ddp_eager"):
        assert d["grad_err"] < 1e-5 and d["param_err"] < 1e-5
        assert d["local_only_grad_err"] > 1e-3  # without the all-reduce the same comparison fails


def test_ddp_broadcasts_sketch_buffers_of_unseeded_conversion(results):
    for d in _check(results, "ddp_syncs_unseeded"):
        assert d["differ_before"] > 0.1 and d["differ_after"] == 0


def test_ddp_compiled_panther_backend_matches_single_process(results):
    details = _check(results, "ddp_compiled")
    for d in details:
        assert d["grad_err"] < 1e-5 and d["param_err"] < 1e-5
        # DDPOptimizer split the graph at bucket boundaries: the backend ran once per piece
        assert d["backend_calls"] >= 2, d
        rows = {name: (replaced, reason) for name, _, replaced, reason in d["rows"]}
        # a dense layer convert left alone stays dense under training, with the backend's reason
        assert "mid" in rows and rows["mid"][0] is False and "panther.convert" in rows["mid"][1], rows
        # the converted layers are already panther ops: nothing weight-bearing is rewritten again
        assert not any(replaced for replaced, _ in rows.values()), rows


def test_fsdp2_matches_single_process(results):
    for d in _check(results, "fsdp2"):
        assert d["param_types"] == ["DTensor"]
        assert d["grad_err"] < 1e-5 and d["param_err"] < 1e-5


def test_dcp_roundtrip_ddp(results):
    for d in _check(results, "dcp_plain"):
        assert d["differs_before_load"] > 0.1
        assert d["state_dict_err"] == 0 and d["output_err"] == 0


def test_dcp_roundtrip_fsdp2(results):
    for d in _check(results, "dcp_fsdp2"):
        assert d["differs_before_load"] > 0.1
        assert d["state_dict_err"] == 0 and d["output_err"] == 0

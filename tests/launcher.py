"""The tests' launcher: one Python process with torch, megatron-core, transformers and MLflow
imported once forks the processes of each command the tests run (`qwen3kd ARGS` or a torchrun
worker script, one process per rank).

Why: a fresh interpreter per process imports those libraries again, ~10-17 s of CPU each on 2
cores, which was most of a small test's time and half of the suite's. What a rank sees is what
torchrun gives it: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, its
module run as `__main__` (so vLLM's spawned processes import it as torchrun's would), its own
stdout/stderr; when one rank fails the others are stopped and the command exits 1, as torchrun
does. Nothing of qwen3kd is imported before the fork. The real launchers are tested where the
launch is the subject: launch/torchrun.sh and the SLURM script (tests/slurm).

Protocol: the client sends one JSON request over a Unix socket with two file descriptors per rank
(stdout, stderr), gets back the pid of the command's process group, then one JSON line with every
rank's exit status.
"""

from __future__ import annotations

import array
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported once, before any fork: third-party only (qwen3kd's own modules keep import-time state,
# e.g. qwen3kd.stop's process start time).
PRELOAD = ("torch", "torch.distributed", "torch.distributed.checkpoint", "numpy", "omegaconf",
           "safetensors.torch", "transformers", "mlflow", "mlflow.entities", "megatron.core",
           "megatron.core.models.gpt", "megatron.core.optimizer", "megatron.core.pipeline_parallel",
           "megatron.core.dist_checkpointing")
GRACE_S = 5  # after a rank fails, the others get SIGTERM, then SIGKILL this much later


# ---------------------------------------------------------------- server (the preloaded process)

def _serve(path: str):
    """Accept requests forever; returns only in a forked child, with its request."""
    import importlib
    import warnings

    with warnings.catch_warnings():  # megatron's "Transformer Engine and Apex are not installed"
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(1.0)
    print("ready", flush=True)
    while True:
        while True:  # reap the supervisors of finished commands
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        msg, fds = _recv(conn)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            return conn, msg, fds
        conn.close()
        for fd in fds:
            os.close(fd)


def _recv(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data = b""
    while not data.endswith(b"\n"):
        chunk, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_LEN(64 * fds.itemsize))
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return json.loads(data), list(fds)


def _supervise(conn: socket.socket, req: dict, fds: list[int]):
    """The command's process group leader: fork the ranks, wait, report. Returns only in a rank."""
    os.setsid()
    conn.sendall(f"{os.getpid()}\n".encode())
    pids = {}
    for rank, env in enumerate(req["envs"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            return rank, env, fds[2 * rank], fds[2 * rank + 1]
        pids[pid] = rank
    for fd in fds:
        os.close(fd)
    codes: dict[int, int] = {}
    deadline = None
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG) if deadline else os.waitpid(-1, 0)
        if pid == 0:
            if time.monotonic() > deadline:
                _signal(pids, codes, signal.SIGKILL)
            time.sleep(0.05)
            continue
        if pid not in pids:
            continue
        codes[pids[pid]] = os.waitstatus_to_exitcode(status)
        if codes[pids[pid]] != 0 and req["stop_others"] and deadline is None:
            _signal(pids, codes, signal.SIGTERM)  # as torchrun stops the other workers
            deadline = time.monotonic() + GRACE_S
    conn.sendall((json.dumps([codes[r] for r in range(len(pids))]) + "\n").encode())
    os._exit(0)


def _signal(pids: dict[int, int], codes: dict[int, int], sig: int) -> None:
    for pid, rank in pids.items():
        if rank not in codes:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _rank(req: dict, env: dict, out: int, err: int) -> int:
    """Become the command's process: its environment, stdio, working directory and __main__."""
    import random
    import runpy

    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    sys.stdout.reconfigure(line_buffering=True, write_through=True)
    sys.stderr.reconfigure(line_buffering=True, write_through=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(req["cwd"])
    random.seed()  # a fresh process's seeds, not the server's
    import numpy as np
    import torch

    np.random.seed()
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    target = req["target"]
    try:
        sys.argv = [target, *req["args"]]
        if target.endswith(".py"):  # a worker script, run as `python SCRIPT ARGS`
            sys.path[0] = str(Path(target).parent)
            runpy.run_path(target, run_name="__main__")
        else:  # a module, run as `python -m MODULE ARGS`
            sys.path[0] = req["cwd"]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def main(path: str) -> int:
    conn, req, fds = _serve(path)
    rank, env, out, err = _supervise(conn, req, fds)
    return _rank(req, env, out, err)


# ---------------------------------------------------------------- client (the pytest process)

_server: subprocess.Popen | None = None
_socket = ""
_lock = threading.Lock()


def _start(env: dict[str, str]) -> str:
    global _server, _socket
    with _lock:
        if _server is None or _server.poll() is not None:
            _socket = os.path.join(tempfile.mkdtemp(prefix="qwen3kd-launcher-"), "sock")
            _server = subprocess.Popen([sys.executable, __file__, _socket], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, text=True)
            line = _server.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"the test launcher did not start (exit {_server.wait()})")
            atexit.register(_server.kill)
        return _socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(target: str, args: list[str], env: dict[str, str], *, nproc: int = 1,
           timeout: float = 300, separate: bool = False, cwd: Path = ROOT,
           stop_others: bool = True) -> list[subprocess.CompletedProcess]:
    """Run `python -m TARGET ARGS` (or `python TARGET.py ARGS`) as NPROC ranks. nproc == 1 without
    the rank variables (a plain process). Returns one CompletedProcess per rank with its own
    output if `separate`, else one for the whole command (the ranks' output together, exit 0 or,
    for nproc > 1, 1 if any rank failed, as torchrun)."""
    path = _start(env)
    if nproc > 1:
        port = str(free_port())
        envs = [{**env, "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0",
                 "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for r in range(nproc)]
    else:
        envs = [env]
    files = [tempfile.TemporaryFile() for _ in range(2 * (nproc if separate else 1))]
    fds = [f.fileno() for f in files] if separate else [f.fileno() for f in files] * nproc
    req = {"target": target, "args": list(args), "envs": envs, "cwd": str(cwd),
           "stop_others": stop_others}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        conn.sendmsg([(json.dumps(req) + "\n").encode()],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        conn.settimeout(timeout)
        reader = conn.makefile("r")
        pgid, line = None, ""
        try:
            pgid = int(reader.readline())
            line = reader.readline()
        except TimeoutError:
            pass
        if not line:
            if pgid:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise subprocess.TimeoutExpired([target, *args], timeout)
        codes = json.loads(line)
    finally:
        conn.close()
    outputs = []
    for f in files:
        f.seek(0)
        outputs.append(f.read().decode(errors="replace"))
        f.close()
    cmd = [target, *args]
    if separate:
        return [subprocess.CompletedProcess(cmd, c, outputs[2 * r], outputs[2 * r + 1])
                for r, c in enumerate(codes)]
    code = codes[0] if nproc == 1 else int(any(codes))
    if nproc > 1 and code:
        failed = ", ".join(f"rank {r} exited {c}" for r, c in enumerate(codes) if c)
        outputs[1] += f"\nlauncher: {failed}\n"
    return [subprocess.CompletedProcess(cmd, code, outputs[0], outputs[1])]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

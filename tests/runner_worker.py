"""Subprocess for the kill-and-resume tests: imports and loads ONCE, then forks one child per attempt.

    python tests/runner_worker.py MODEL_DIR SOURCE PLAN_JSON

PLAN_JSON: a list of attempts ``{"out": dir, "shard": null | [i, n], "job": "run_dataset" | "evaluate",
"kill": null | {"kind": "write", "n": int,
"phase": "before" | "mid" | "after"} | {"kind": "time", "delay": seconds}}``, or ``{"parallel": [attempt, ...]}``:
those attempts (no kills) forked at once, several writer processes on one store, all waited for.
Each attempt runs ``run_dataset`` (or, with ``"job": "evaluate"``, ``evaluate`` of a VQA source under two
conditions) in a forked child; a "write" kill
makes the child SIGKILL itself at its n-th atomic write (before writing, with the temp file written but not yet
renamed, or just after the rename: the only moments the store on disk changes); a "progress" kill is ``os.kill``
from this process ``delay`` s after the manifest has gained ``parts`` more committed batches (a random point inside
a later batch: forward, writes). Prints one JSON line: the children's exit statuses (negative = killed by that
signal). Threads are pinned to 1 before torch runs anything, so forking is safe and every child computes bit for bit
the same floats.
"""

import json
import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(__file__))
from netguard import block_network  # noqa: E402

block_network()  # the suite runs with sockets blocked: its subprocesses too

import mech_vtokens as mv  # noqa: E402
from mech_vtokens import evaluate, runner, store  # noqa: E402
from mech_vtokens.interventions import AllVisual, ZeroSublayer  # noqa: E402
from mech_vtokens.probes import EmbedLens  # noqa: E402

PROBES = lambda: ["norms", EmbedLens(k=2)]  # noqa: E731


CONDITIONS = lambda: {"baseline": [], "-vFFN": [ZeroSublayer(AllVisual(), [0, 1], "mlp")]}  # noqa: E731


def child(vlm, source, out, kill, shard=None, job="run_dataset"):
    if kill and kill["kind"] == "write":
        real, count = store.atomic_write_bytes, [0]

        def write(path, data):
            count[0] += 1
            if count[0] == kill["n"]:
                if kill["phase"] == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                if kill["phase"] == "mid":
                    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                    tmp.write_bytes(data[: len(data) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
            if count[0] == kill["n"]:
                os.kill(os.getpid(), signal.SIGKILL)

        store.atomic_write_bytes = write
    shard = tuple(shard) if shard else None
    if job == "evaluate":
        evaluate.evaluate(vlm, source, CONDITIONS(), max_new_tokens=3, batch_size=2, out=out, progress=False,
                          shard=shard)
    else:
        runner.run_dataset(vlm, source, probes=PROBES(), out=out, batch_size=2, progress=False, shard=shard)


def fork(vlm, source, attempt):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child(vlm, source, attempt["out"], attempt.get("kill"), attempt.get("shard"),
                  attempt.get("job", "run_dataset"))
        except BaseException as err:  # noqa: BLE001
            print(f"child error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            code = 3
        os._exit(code)
    return pid


def status_of(status):
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main():
    model_dir, source, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    vlm = mv.load(model_dir)
    statuses = []
    for attempt in plan:
        if "parallel" in attempt:
            pids = [fork(vlm, source, a) for a in attempt["parallel"]]
            statuses.append([status_of(os.waitpid(p, 0)[1]) for p in pids])
            continue
        pid = fork(vlm, source, attempt)
        kill = attempt.get("kill")
        if kill and kill["kind"] == "progress":
            manifest = os.path.join(attempt["out"], "manifest.json")

            def parts():
                try:
                    with open(manifest) as f:
                        return len(json.load(f)["parts"])
                except (OSError, ValueError):
                    return 0

            target = parts() + kill["parts"]
            while parts() < target:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:  # finished (or died) before the kill point
                    break
                time.sleep(0.005)
            else:
                done = 0
            if not done:
                time.sleep(kill["delay"])
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status = os.waitpid(pid, 0)
        else:
            _, status = os.waitpid(pid, 0)
        statuses.append(status_of(status))
    print(json.dumps(statuses), flush=True)


if __name__ == "__main__":
    main()

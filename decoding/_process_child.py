"""The child side of `decoding.ProcessBackend`: `python -m decoding._process_child FD`.

Loads an `HFBackend` from the arguments the parent sends first, then serves pickled
calls from the socket at file descriptor FD until told to stop or the socket closes.
"""

from __future__ import annotations

import queue
import sys
import threading
from multiprocessing.connection import Connection

from decoding.types import BackendError


def _child_main(conn) -> None:
    """The child: load the model, then serve calls until told to stop or the socket closes."""
    import torch

    from decoding.hf import HFBackend

    model, kwargs, threads = conn.recv()
    torch.set_num_threads(threads)
    try:
        backend = HFBackend.from_pretrained(model, **kwargs)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"could not load model {model!r}: {error}".split("\n")[0]))
        return
    conn.send(("ready", backend.info))
    # A reader thread keeps the socket drained while the model runs, so the parent never
    # blocks on a full socket; the main thread batches what it queued and is the only
    # one that sends.
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("stop", None)
            inbox.put(message)
            if message[0] == "stop":
                return

    threading.Thread(target=read, name="reader", daemon=True).start()

    # Per-call batching, as in the parent: every call queued while the model was busy
    # goes to it as one batch (one for steps, one for scores). Forks take effect before
    # the batch (a fork always precedes its branch's calls), releases after it (a release
    # may follow a call of a cancelled request that is still queued).
    while True:
        messages = [inbox.get()]
        while True:
            try:
                messages.append(inbox.get_nowait())
            except queue.Empty:
                break
        for message in messages:
            if message[0] == "fork":
                backend.fork(*message[1])
        for kind, run in (("step", backend.next_steps), ("score", backend.score_steps)):
            calls = [(m[1], m[2]) for m in messages if m[0] == kind]
            if not calls:
                continue
            try:
                outputs = run([request for _, request in calls])
            except Exception as error:  # noqa: BLE001 - every call of the batch learns of it
                text = str(error) if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"
                for call, _ in calls:
                    conn.send(("error", call, text))
                continue
            for (call, _), output in zip(calls, outputs, strict=False):
                conn.send(("ok", call, output))
        for message in messages:
            if message[0] == "release":
                backend.release(message[1])
        if any(message[0] == "stop" for message in messages):
            return


if __name__ == "__main__":
    _child_main(Connection(int(sys.argv[1])))

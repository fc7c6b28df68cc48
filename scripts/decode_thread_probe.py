"""Is the decode step slower off the main thread? A probe, not a benchmark.

    python scripts/decode_thread_probe.py

`t2r serve` decodes in a thread of its own (the event loop keeps the main one). This times the
shipped model's compiled int4 step at batch 1 (the kept step, `Decoder` with its artifacts; the
server's 32-row slots) on the main thread, on a new thread, and on a new thread limited to one
intra-op thread. The closing note of 2026-12-07 quotes it: the server's steps took ~3x the main
thread's.
"""

from __future__ import annotations

import threading
import time

import torch

from t2r.caches import compiled_steps_folder, decode_weights_folder
from t2r.hub import load_model, model_weights_identity
from t2r.inference.state_slots import StateSlots
from t2r.modeling.decode_weights import decoding_model
from t2r.modeling.fast_decode import Decoder, FastState

MODEL = "t2r-smollm2-135m"
STEPS = 20


def main() -> None:
    torch.set_num_threads(2)
    model, _ = load_model(MODEL)
    model = decoding_model(model, "int4", decode_weights_folder(), model_weights_identity(MODEL))
    decoder = Decoder(compile=True, artifacts=compiled_steps_folder())
    decoder.warm_up(model, 32)
    slots = StateSlots(FastState.from_model_state(model.init_state(1)), 32)
    slots.add(FastState.from_model_state(model.init_state(1)))

    def timed(where: str, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        ids = torch.tensor([5])
        with torch.no_grad():
            for _ in range(3):
                decoder(model, ids, slots.view())
            started = time.perf_counter()
            for _ in range(STEPS):
                decoder(model, ids, slots.view())
        print(f"{where}: {(time.perf_counter() - started) / STEPS * 1000:.1f} ms a step", flush=True)

    timed("main thread, 2 intra-op threads")
    for args in (("new thread, 2 intra-op threads",), ("new thread, 1 intra-op thread", 1)):
        thread = threading.Thread(target=timed, args=args)
        thread.start()
        thread.join()


if __name__ == "__main__":
    main()

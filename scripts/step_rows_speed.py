"""How a decode step's time grows with its rows: the shipped model's compiled int4 step, with and
without dense copies for many rows (t2r.ops.rows_matmul), on the main thread. A probe, not a benchmark.

    python scripts/step_rows_speed.py [--copies-only] [ROWS ...]

`t2r serve` decodes with the dense copies; the 32-client bar of its load test needs a 32-row step
within 4x of a 1-row step.
"""

from __future__ import annotations

import sys
import time

import torch

from t2r.caches import compiled_steps_folder, decode_weights_folder
from t2r.hub import load_model, model_weights_identity
from t2r.inference.state_slots import StateSlots
from t2r.modeling.decode_weights import decoding_model
from t2r.modeling.fast_decode import Decoder, FastState
from t2r.modeling.quantize import with_dense_copies

MODEL = "t2r-smollm2-135m"
STEPS = 20


def step_ms(model: torch.nn.Module, decoder: Decoder, rows: int) -> float:
    slots = StateSlots(FastState.from_model_state(model.init_state(1)), 32)
    for _ in range(rows):
        slots.add(FastState.from_model_state(model.init_state(1)))
    ids = torch.full((rows,), 5)
    for _ in range(3):
        decoder(model, ids, slots.view())
    started = time.perf_counter()
    for _ in range(STEPS):
        decoder(model, ids, slots.view())
    return (time.perf_counter() - started) / STEPS * 1000


def main() -> None:
    copies_only = "--copies-only" in sys.argv
    rows_list = [int(r) for r in sys.argv[1:] if r != "--copies-only"] or [1, 4, 8, 12, 16, 32]
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    model, _ = load_model(MODEL)
    model = decoding_model(model, "int4", decode_weights_folder(), model_weights_identity(MODEL))
    for label, dense in (("int4", False), ("int4 + dense copies", True))[copies_only:]:
        if dense:
            print(with_dense_copies(model), flush=True)
        decoder = Decoder(compile=True, artifacts=compiled_steps_folder())
        decoder.warm_up(model, 32)
        times = {rows: step_ms(model, decoder, rows) for rows in rows_list}
        line = ", ".join(f"{rows} rows {ms:.1f} ms" for rows, ms in times.items())
        print(f"{label}: {line}", flush=True)


if __name__ == "__main__":
    main()

"""The maths of causal linear attention, with no transformers and nothing of t2r above it.

Every form shares one signature, `op(q, k, v, initial_state=None, eps=...) -> (out, final_state)`:
    reference.py         the spec: quadratic parallel form and the one-token recurrent step, fp32
    chunked.py           exact chunked form, memory O(T * C)
    windowed.py          the spec of the hybrid (softmax over sinks + a window, linear before it)
    windowed_step.py     the hybrid one token at a time (the read and the eviction every step shares)
    windowed_chunked.py  exact chunked hybrid, memory O(T * (C + W))
    windowed_ring.py     the hybrid's step in place on a ring buffer: the decode path's form
    global_cache.py      a sparse global cache (LoLA): the exchange by self-recall error
    windowed_scan.py     a state with a global cache over a prefill, token by token
    global_select.py     a global cache chosen by the prompt's last queries (SnapKV), for prefill
    state.py             the state types passed in and returned
    dispatch.py          `attention_op(form, chunk_size, hybrid, compiled)`: one op by name
    toolchain.py         whether native code can be built here (a C++ compiler)
    int4_matmul.py       4-bit weight blocks: reference and the AVX2 kernel for decoding
    denormals.py         flushing subnormals for the decode step

An empty sequence (T = 0) gives an empty output [B, H, 0, D] and the state it was given, in every form.

This file imports nothing, so that the names of the forms are known without loading torch.
"""

FORMS = ("parallel", "chunked", "recurrent")
GLOBAL_SELECTS = ("recall", "prompt")  # how a prefill fills a global cache: `dispatch.attention_op`

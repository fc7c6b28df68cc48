"""The load test's plot and BENCHMARKS.md section (scripts/serve_load.py; rerun alone with
`python scripts/serve_load_report.py` to redraw from benchmarks/serve/load.json)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from t2r.evaluation.markdown import replace_section  # noqa: E402


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(results["levels"], key=int)
    engines = sorted({e for level in levels for e in results["levels"][level]})
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        rows = [results["levels"][level].get(engine) for level in levels]
        xs = [j + i * width for j in range(len(levels))]
        left.bar(xs, [r["tokens_per_s"] if r else 0 for r in rows], width, label=engine)
        right.bar(xs, [r["ttft_p50_s"] if r else 0 for r in rows], width, label=f"{engine} p50")
    for axis, label in ((left, "aggregate output tokens/s"), (right, "time to first token p50 (s)")):
        axis.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(levels))], levels)
        axis.set_xlabel("concurrent streaming clients")
        axis.set_ylabel(label)
        axis.legend()
    right.set_yscale("log")
    settings = results["settings"]
    figure.suptitle(
        f"t2r serve ({settings['model']}, {decode_path(results)}) vs llama.cpp server; "
        f"{settings['requests']} requests/level, {settings['max_tokens']} tokens each"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def decode_path(results: dict) -> str:
    """How t2r decoded: the flags given, or the server's default (its start-up line, in the JSON)."""
    settings = results["settings"]
    if settings.get("weights") is None and settings.get("compile") is None:
        return "default path: " + results.get("t2r_decode", "as its start-up line says")
    return f"--weights {settings.get('weights')} compile={settings.get('compile')}"


def flags(settings: dict) -> str:
    out = f"--threads {settings['threads']}"
    if settings.get("weights") is not None:
        out += f" --weights {settings['weights']}"
    if settings.get("compile") is not None:
        out += " --compile" if settings["compile"] else " --no-compile"
    return out


def section(results: dict) -> str:
    settings = results["settings"]
    levels = sorted(results["levels"], key=int)
    lines = [
        f"`python scripts/serve_load.py {flags(settings)}` (t2r's {decode_path(results)}) — "
        f"{settings['requests']} streaming completions per level "
        f"(prompts of ~{settings['prompt_tokens']} tokens from Pride and Prejudice, {settings['max_tokens']} greedy "
        "tokens each, end of text suppressed), the real `openai` client with asyncio; each server its own "
        f"process with {settings['threads']} threads; engines alternate level by level. Plot: "
        "[benchmarks/serve/load.png](benchmarks/serve/load.png), figures: benchmarks/serve/load.json.",
        "",
        "| clients | engine | tokens/s (aggregate) | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | failed | cut short |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        for engine, row in sorted(results["levels"][level].items()):
            lines.append(
                f"| {level} | {engine} | {row['tokens_per_s']:.1f} | {row['ttft_p50_s']:.2f} s | "
                f"{row['ttft_p99_s']:.2f} s | {row['itl_p50_s'] * 1000:.0f} ms | {row['itl_p99_s'] * 1000:.0f} ms | "
                f"{row['failed']} | {row.get('incomplete', 0)} |"
            )
    t2r = {level: results["levels"][level]["t2r"]["tokens_per_s"] for level in levels}
    low, high = levels[0], levels[-1]
    ratio = t2r[high] / t2r[low]
    bar = f"bar ≥ 8x: {'met' if ratio >= 8 else 'not met'}" if int(high) >= 32 else "the bar, ≥ 8x, is at 32 clients"
    lines += ["", f"- **t2r aggregate tokens/s at {high} clients / at {low}: {ratio:.2f}x** ({bar})."]
    if all("llama.cpp" in results["levels"][level] for level in levels):
        llama = {level: results["levels"][level]["llama.cpp"]["tokens_per_s"] for level in levels}
        lines.append(
            f"- llama.cpp server (llama-cpp-python, one sequence at a time): {llama[high] / llama[low]:.2f}x "
            f"from {low} to {high} clients; t2r / llama.cpp at {high} clients: "
            f"{t2r[high] / llama[high]:.2f}x, at {low}: {t2r[low] / llama[low]:.2f}x."
        )
        ours, theirs = (results["levels"][low][e]["itl_p50_s"] for e in ("t2r", "llama.cpp"))
        lines.append(
            f"- **Inter-token latency p50 at {low} client: t2r {ours * 1000:.1f} ms, llama.cpp "
            f"{theirs * 1000:.1f} ms: {ours / theirs:.2f}x** (bar ≤ 2x: {'met' if ours <= 2 * theirs else 'not met'})."
        )
    rss = results.get("rss_bytes", {})
    if len(rss) == 2:
        (a, ra), (b, rb) = sorted(rss.items(), key=lambda kv: int(kv[0]))
        change = rb / ra - 1
        soak = results.get("soak", {})
        lines.append(
            f"- t2r server RSS, after a warm-up of {settings.get('warm_up', '?')} requests at {high} clients, "
            f"then {soak.get('requests', b)} more at {high} ({soak.get('failed', '?')} failed, "
            f"{soak.get('tokens_per_s', float('nan')):.1f} tokens/s): after {a} of them {ra / 2**20:.0f} MiB, after "
            f"{b}: {rb / 2**20:.0f} MiB (**{change * 100:+.1f}%**; bar within 5%: "
            f"{'met' if abs(change) <= 0.05 else 'not met'})."
        )
    long = results.get("long_prompt")
    if long:
        alone, loaded = long["alone"], long["with_long_prompt"]
        ratio = loaded["itl_p99_s"] / alone["itl_p99_s"]
        during = loaded.get("itl_p99_while_prefilling_s")
        lines.append(
            f"- A {settings.get('long_prompt', '?')}-token prompt arriving while {settings.get('streams', '?')} "
            f"streams decode {settings.get('stream_tokens', '?')} tokens each: their inter-token p99 "
            f"{loaded['itl_p99_s'] * 1000:.0f} ms against {alone['itl_p99_s'] * 1000:.0f} ms without it "
            f"(**{ratio:.2f}x**; bar ≤ 2x: {'met' if ratio <= 2 else 'not met'}); p50 "
            f"{loaded['itl_p50_s'] * 1000:.0f} vs {alone['itl_p50_s'] * 1000:.0f} ms; over the "
            f"{loaded['gaps_while_prefilling']} gaps while it was prefilled, p99 "
            + ("-" if during is None else f"{during * 1000:.0f} ms")
            + f"; its own time to first token {loaded['long_prompt_ttft_s']:.1f} s."
        )
    sessions = results.get("sessions", {})
    if sessions:
        long, short = (statistics.median(sessions[k]) for k in ("long_history_ttft_s", "short_history_ttft_s"))
        lines.append(
            f"- Sessions: next-turn time to first token after a {settings['long_history']}-token history "
            f"{long:.3f} s, after a 50-token one {short:.3f} s (medians of 5): **{long / short:.2f}x** "
            f"(bar ≤ 1.2x: {'met' if long / short <= 1.2 else 'not met'}). Without a kept state the whole "
            "history is sent again: "
            + ", ".join(
                f"{k.removesuffix('_whole_history_ttft_s')} "
                + (f"{v:.2f} s" if v is not None else "failed (history past its context)")
                for k, v in sessions.items()
                if k.endswith("whole_history_ttft_s")
            )
            + "."
        )
    failed = sum(row["failed"] for level in levels for row in results["levels"][level].values())
    lines.append(f"- Failed requests, all engines and levels: {failed}.")
    if results.get("partial"):
        lines.append(
            "- **A partial run**: it was stopped after the phases above (the JSON keeps what each phase measured "
            "as it ended); the soak's RSS, the long prompt and the sessions are missing where not listed."
        )
    return "\n".join(lines)


def write_section(results: dict, path: Path) -> None:
    replace_section(path, "serve-load", section(results), "Serving: `t2r serve` under load, beside llama.cpp's server")


if __name__ == "__main__":
    data = json.loads((ROOT / "benchmarks" / "serve" / "load.json").read_text())
    plot(data, ROOT / "benchmarks" / "serve" / "load.png")
    write_section(data, ROOT / "BENCHMARKS.md")

"""Generation end to end on the GPU: a power model against a Llama of the same shape.

    python benchmarks/bench_generate.py [--parts table,floor,fit,profile,timeline] [--contexts 4096,16384,65536,131072]
                                        [--batches 1,8] [--out DIR]

Both models: 12 layers, hidden 768, 12 heads of 64, vocab 32k, random weights, bf16.
For each (context, batch): prefill time (the prompt fed through the cache in chunks of
min(4096, 32768 / batch) tokens, at least 128, the same for both models, so that prefill
activations do not decide what fits), decode tokens/s and peak memory, in these settings:

    llama eager     DynamicCache, one eager forward per token (what plain generate() runs)
    llama static    StaticCache + torch.compile(mode="reduce-overhead", or --compile-mode) of the decode step
    power eager     dynamic PowerCache, one eager forward per token
    power static    static PowerCache + torch.compile(mode="reduce-overhead", or --compile-mode) of the decode step
    llama graphed,  (only when asked for in --settings) the static cache and the step compiled without CUDA graphs,
    power graphed   then --steps-per-graph steps (each feeding its argmax to the next) captured as one CUDA
                    graph and replayed. At batch 1 a compiled step's host side (guards, the graph tree's
                    bookkeeping, the loop) took about as long as the power model's GPU work, so the static
                    rows measure the host as much as the model; these rows measure the GPU.

Also (--parts):
    floor    the power model's compiled decode step at batch 64 against its memory floor: weights +
             every layer's state (and decode tail) read once, at the copy bandwidth measured in this run
    fit      the largest batch each model fits at 64k context (prefill + decode steps). The Llama
             is prefilled with the whole context. The power model's memory does not depend on the
             context (its state has one size; the table's rows show it), so its search prefills
             4k tokens; --confirm-fit then runs the batch it finds with the whole 64k prefill.
    profile  the GPU kernels of one compiled power decode step at batch 1 (torch.profiler)
    timeline where a graphed power decode step's time goes at batch 1: each kernel's share of the
             critical path (how far its end moved past every earlier kernel's end), by kernel and
             its place in the layer. With programmatic dependent launch a kernel starts while the one
             before runs, so its own duration (the profile part's figure) counts that wait too.
Prints markdown; writes it under --out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # after PYTHONPATH: a tree named there is the one imported
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache, StaticCache  # noqa: E402

from power_transformers import PowerCache, PowerConfig, PowerForCausalLM  # noqa: E402
from power_transformers.compat import CACHE_NAME  # noqa: E402
from power_transformers.kernels.reference import DECODE_TAIL  # noqa: E402
from power_transformers.kernels.triton_common import dependent_launch  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, head_dim=64, max_position_embeddings=140_000)
PREFILL_TOKENS = 32768  # tokens per prefill forward (batch x chunk), chunks of 128 to 4096
# Decode steps timed: one fold cycle. A power layer's step folds its tail into the state once
# every DECODE_TAIL tokens (the step that fills it); a timed window of fewer steps could miss that
# step (32 steps after a prefill, which leaves the tail empty, did: runs before L left it out).
DECODE_STEPS = DECODE_TAIL
COMPILE_MODE = "reduce-overhead"  # of the static rows' decode step (--compile-mode)
STEPS_PER_GRAPH = 8  # decode steps per CUDA graph in the graphed rows (--steps-per-graph)
WITHOUT_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def build(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa"))
    else:
        model = PowerForCausalLM(PowerConfig(**SHAPE))
    return model.to("cuda", torch.bfloat16).eval()


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (start.elapsed_time(end) / 1e3)


def make_cache(kind: str, model, static: bool, batch: int, max_len: int):
    if kind == "llama":
        return StaticCache(config=model.config, max_cache_len=max_len) if static else DynamicCache(config=model.config)
    return PowerCache(model.config, max_cache_len=max_len if static else None)


@torch.no_grad()
def prefill(model, cache, batch: int, context: int) -> torch.Tensor:
    """Feed `context` random tokens in chunks; returns the last logits' argmax [B, 1]."""
    ids = torch.randint(100, 32000, (batch, context), device="cuda")
    step = max(128, min(4096, PREFILL_TOKENS // batch))
    for start in range(0, context, step):
        chunk = ids[:, start : start + step]
        positions = torch.arange(start, start + chunk.shape[1], device="cuda")[None].expand(batch, -1)
        out = model(chunk, position_ids=positions, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})
    return out.logits[:, -1:].argmax(-1)


def decode_step_fn(model, cache):
    def step(token, position):
        logits = model(token, position_ids=position, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache}).logits
        return logits[:, -1:].argmax(-1)

    return step


def capture_steps(step, token: torch.Tensor, position: torch.Tensor, n: int) -> torch.cuda.CUDAGraph:
    """n decode steps as one CUDA graph: each step's argmax is the next one's token, `position`
    advances in place, and the last token is written back to `token`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a step on a side stream before the capture, as torch.cuda.graph asks
        token.copy_(step(token, position))
        position += 1
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        t = token
        for _ in range(n):
            t = step(t, position)
            position += 1
        token.copy_(t)
    return graph


def warmed_up(model, cache, token: torch.Tensor, batch: int, context: int, mode: str):
    """After a prompt of `context` tokens: the decode step for `mode` ("eager"; "static": compiled
    with COMPILE_MODE; "graphed": compiled without CUDA graphs, and STEPS_PER_GRAPH steps then
    captured as one graph, capture_steps) run 4 times (compilation, graph capture). Returns the
    step, the graph (None unless graphed), the last token and the position tensor."""
    step = decode_step_fn(model, cache)
    if mode != "eager":
        step = torch.compile(step, mode=COMPILE_MODE if mode == "static" else WITHOUT_GRAPHS[COMPILE_MODE],
                             fullgraph=False)
    position = torch.full((batch, 1), context, device="cuda", dtype=torch.long)
    for _ in range(4):
        token = step(token, position).clone()
        position += 1
    graph = capture_steps(step, token, position, STEPS_PER_GRAPH) if mode == "graphed" else None
    return step, graph, token, position


@torch.no_grad()
def measure(kind: str, model, mode: str, batch: int, context: int) -> dict:
    """Prefill and DECODE_STEPS decode steps; mode "eager", "static" or "graphed" (the module docstring)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = make_cache(kind, model, mode != "eager", batch, context + 3 * DECODE_STEPS + 8)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    token = prefill(model, cache, batch, context)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    step, graph, token, position = warmed_up(model, cache, token, batch, context, mode)
    if mode == "graphed":
        replays = -(-DECODE_STEPS // STEPS_PER_GRAPH)
        graph.replay()  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        per_token = (time.perf_counter() - t0) / (replays * STEPS_PER_GRAPH)
        # the replays advanced the cache: 4 warm-up steps, capture_steps' side step, 1 + replays graphs
        seen = int(cache.get_seq_length())
        if seen != context + 5 + (1 + replays) * STEPS_PER_GRAPH:
            raise RuntimeError(f"the graphed steps did not advance the cache: {seen} tokens after {context}")
    else:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            token = step(token, position).clone()
            position += 1
        torch.cuda.synchronize()
        per_token = (time.perf_counter() - t0) / DECODE_STEPS
    return dict(prefill_s=prefill_s, ms_per_step=per_token * 1e3, tokens_per_s=batch / per_token,
                peak_gb=torch.cuda.max_memory_allocated() / 1e9)


def fits(kind: str, model, batch: int, context: int) -> dict | None:
    """measure() of eager decoding at this batch, or None where it runs out of memory."""
    try:
        return measure(kind, model, "eager", batch, context)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def largest_batch(kind: str, model, context: int, start: int, limit: int) -> tuple[int, dict]:
    """Doubling then bisection (to within 1/8) on the batch size that completes prefill + decode:
    (that batch, its measurement)."""
    good, best, b = 0, {}, start
    while b <= limit and (r := fits(kind, model, b, context)) is not None:
        good, best, b = b, r, b * 2
    bad = b if b <= limit else None
    while bad is not None and bad - good > max(1, good // 8):
        mid = (good + bad) // 2
        if (r := fits(kind, model, mid, context)) is not None:
            good, best = mid, r
        else:
            bad = mid
    return good, best


@torch.no_grad()  # as generate() runs (the fused layer step needs it)
def profile_step(model, context: int = 4096, steps: int = 5) -> list[str]:
    """The GPU kernels of the compiled power decode step at batch 1: count and time per step."""
    from torch.profiler import ProfilerActivity, profile

    cache = make_cache("power", model, True, 1, context + 64)
    token = prefill(model, cache, 1, context)
    step, _, token, position = warmed_up(model, cache, token, 1, context, "static")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = step(token, position).clone()
            position += 1
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / steps, e.count / steps, e.key))
    rows.sort(reverse=True)
    total_us, kernels = sum(r[0] for r in rows), sum(r[1] for r in rows)
    lines = [f"Compiled power decode step, batch 1, {context} context: {kernels:.0f} GPU kernels per step, "
             f"{total_us / 1e3:.3f} ms of kernel time per step", "", "| kernel | per step | us per step |", "|---|---|---|"]
    lines += [f"| {name[:90]} | {count:.0f} | {us:.1f} |" for us, count, name in rows]
    return lines


@torch.no_grad()
def timeline_step(model, context: int = 4096, replays: int | None = None) -> list[str]:
    """The timeline part (module docstring): kernels of `replays` replays of STEPS_PER_GRAPH graphed
    steps at batch 1 (by default a fold cycle), sorted by start; each kernel's advance is its end
    minus the latest end before it (0 if it ended earlier), its gap the idle time before its start.
    Summed per kernel name and its occurrence since the layer's first kernel (_qkvg_kernel), per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    replays = replays or -(-DECODE_TAIL // STEPS_PER_GRAPH)
    cache = make_cache("power", model, True, 1, context + (replays + 8) * STEPS_PER_GRAPH + 16)
    token = prefill(model, cache, 1, context)
    _, graph, _, _ = warmed_up(model, cache, token, 1, context, "graphed")
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    steps = replays * STEPS_PER_GRAPH
    rows: dict[str, list[float]] = {}  # name -> [count, advance, gap, duration]
    latest, seen = events[0].time_range.start, 0
    for e in events:
        if e.name == "_qkvg_kernel":
            seen = 0
        label = e.name if e.name in ("_qkvg_kernel", "_tail_step_kernel", "_fold_kernel") else f"{e.name[:70]} #{seen}"
        seen += 1
        r = rows.setdefault(label, [0, 0.0, 0.0, 0.0])
        r[0] += 1
        r[1] += max(0.0, e.time_range.end - latest)
        r[2] += max(0.0, e.time_range.start - latest)
        r[3] += e.time_range.end - e.time_range.start
        latest = max(latest, e.time_range.end)
    span = (latest - events[0].time_range.start) / steps
    lines = [f"Graphed power decode step, batch 1, {context} context ({steps} steps profiled): {span:.1f} us a step "
             f"from first start to last end, {len(events) / steps:.0f} kernels a step", "",
             "| kernel (#n: its place after the layer's first kernel) | per step | advance us per step | of which idle before it | duration us (with waits) |",
             "|---|---|---|---|---|"]
    for label, (n, adv, gap, dur) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {label} | {n / steps:.0f} | {adv / steps:.1f} | {gap / steps:.1f} | {dur / steps:.1f} |")
    return lines


def floor_ms(kind: str, model, batch: int, context: int, bandwidth: float) -> float:
    """Fewest bytes a decode step must read: the weights, plus each layer's state / KV once."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    if kind == "llama":
        per_row = c.num_hidden_layers * 2 * context * c.num_key_value_heads * c.head_dim * 2
    else:
        # the fp32 state and its tail read once (a step writes the state only once every DECODE_TAIL tokens)
        per_row = PowerCache(c).power_state_bytes_per_row()
    return (weights + batch * per_row) / bandwidth * 1e3


def main():
    global COMPILE_MODE, STEPS_PER_GRAPH
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="table,floor,fit,profile")
    parser.add_argument("--contexts", default="4096,16384,65536,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--llama-static-contexts", default="65536", help="contexts of the compiled static Llama rows")
    parser.add_argument("--settings", default="llama eager,llama static,power eager,power static",
                        help="the table's settings (of: llama eager, llama static, llama graphed, power eager, "
                             "power static, power graphed)")
    parser.add_argument("--steps-per-graph", type=int, default=STEPS_PER_GRAPH, help="decode steps per CUDA graph (graphed rows)")
    parser.add_argument("--fit-context", type=int, default=65536)
    parser.add_argument("--floor-batch", type=int, default=64)
    parser.add_argument("--confirm-fit", action="store_true", help="run the power model's largest batch with the whole prefill")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=("reduce-overhead", "max-autotune"),
                        help="torch.compile mode of the static rows, for both models (max-autotune: inductor's own "
                             "Triton matrix kernels with fused epilogues, and CUDA graphs)")
    parser.add_argument("--fused-step", default="on", choices=("on", "off", "both"),
                        help="the power model's one-token layer step through the fused kernels (config.fused_decode_step), "
                             "through its modules, or both in turn")
    args = parser.parse_args()
    COMPILE_MODE, STEPS_PER_GRAPH = args.compile_mode, args.steps_per_graph
    parts = set(args.parts.split(","))
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    llama_static = {int(x) for x in args.llama_static_contexts.split(",")}
    settings = {x.strip() for x in args.settings.split(",")}
    unknown = settings - {f"{kind} {mode}" for kind in ("llama", "power") for mode in ("eager", "static", "graphed")}
    if unknown:
        parser.error(f"unknown --settings {sorted(unknown)}")
    bandwidth = copy_bandwidth()
    models = {kind: build(kind) for kind in ("llama", "power")}
    fused_settings = {"on": (True,), "off": (False,), "both": (True, False)}[args.fused_step]
    runs = [("llama", models["llama"], None)] + [("power", models["power"], fused) for fused in fused_settings]
    out = [f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; date {datetime.date.today()}; "
           f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write); static rows compiled with mode={COMPILE_MODE}; "
           f"decode kernels with programmatic dependent launch: {dependent_launch(torch.device('cuda'))}", ""]

    def write():
        text = "\n".join(out)
        os.makedirs(args.out, exist_ok=True)  # (a folder under $OUT, for one run among several)
        with open(os.path.join(args.out, "generate_table.md"), "w") as f:
            f.write(text + "\n")
        return text

    if "table" in parts:
        out += ["| context | batch | setting | prefill (s) | decode ms/step | tokens/s | peak GB | floor ms/step |",
                "|---|---|---|---|---|---|---|---|"]
        for context in contexts:
            for batch in batches:
                for kind, model, fused in runs:
                    for mode in ("eager", "static", "graphed"):
                        if mode != "eager" and kind == "llama" and context not in llama_static:
                            continue
                        if f"{kind} {mode}" not in settings:
                            continue
                        setting = {"eager": f"{kind} eager", "static": f"{kind} static+compiled",
                                   "graphed": f"{kind} static+compiled, {STEPS_PER_GRAPH} steps per CUDA graph"}[mode]
                        if kind == "power":
                            model.config.fused_decode_step = fused
                            setting += ", fused step" if fused else ", modules' step"
                        try:
                            r = measure(kind, model, mode, batch, context)
                            r["floor_ms"] = floor_ms(kind, model, batch, context, bandwidth)
                            out.append(f"| {context} | {batch} | {setting} | {r['prefill_s']:.2f} | {r['ms_per_step']:.3f} | "
                                       f"{r['tokens_per_s']:.0f} | {r['peak_gb']:.1f} | {r['floor_ms']:.3f} |")
                        except torch.cuda.OutOfMemoryError:
                            out.append(f"| {context} | {batch} | {setting} | OOM | | | | |")
                        except Exception as e:  # a setting that does not work is reported, not hidden
                            out.append(f"| {context} | {batch} | {setting} | {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | |")
                        torch.cuda.empty_cache()
                        print(out[-1], flush=True)
                        write()
        out.append("")
    models["power"].config.fused_decode_step = fused_settings[0]  # the floor and profile parts' setting
    if "floor" in parts:
        try:
            r = measure("power", models["power"], "static", args.floor_batch, 4096)
            floor = floor_ms("power", models["power"], args.floor_batch, 4096, bandwidth)
            out.append(f"Power decode step at batch {args.floor_batch} (static+compiled, 4k context): {r['ms_per_step']:.3f} ms "
                       f"({r['tokens_per_s']:.0f} tokens/s) against a floor of {floor:.3f} ms: {r['ms_per_step'] / floor:.2f}x")
        except Exception as e:  # noqa: BLE001
            out.append(f"Power decode at batch {args.floor_batch}: {type(e).__name__}: {str(e)[:120]}")
        print(out[-1], flush=True)
        write()
    if "fit" in parts:
        largest = {}
        for kind, context in (("llama", args.fit_context), ("power", 4096)):
            largest[kind], r = largest_batch(kind, models[kind], context, 8, 2048)
            out.append(f"Largest batch, {kind}, {context} context prefilled ({DECODE_STEPS + 4} eager decode steps): "
                       f"{largest[kind]}" + (f"; there {r['tokens_per_s']:.0f} tokens/s, peak {r['peak_gb']:.1f} GB" if r else ""))
            print(out[-1], flush=True)
        write()
    if "fit" in parts and args.confirm_fit:
        power = largest["power"]
        try:
            r = measure("power", models["power"], "eager", power, args.fit_context)
            out.append(f"Power at batch {power} with the whole {args.fit_context}-token prefill: prefill {r['prefill_s']:.1f} s, "
                       f"decode {r['ms_per_step']:.2f} ms/step ({r['tokens_per_s']:.0f} tokens/s, eager), peak {r['peak_gb']:.1f} GB")
        except torch.cuda.OutOfMemoryError:
            out.append(f"Power at batch {power} with the whole {args.fit_context}-token prefill: OOM")
        print(out[-1], flush=True)
        write()
    if "profile" in parts:
        lines = profile_step(models["power"])
        out += [""] + lines
        print("\n".join(lines), flush=True)
    if "timeline" in parts:
        lines = timeline_step(models["power"])
        out += [""] + lines
        print("\n".join(lines), flush=True)
    print(write())


if __name__ == "__main__":
    main()

